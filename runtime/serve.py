"""The device's local endpoint (HTTP on loopback or a Unix socket) and the replay driver;
both run inferences through `Device`, so telemetry sees exactly what a real app would.

Endpoints:
  GET  /v1/health    bundle, telemetry connection, spool state
  GET  /metrics      the same and the endpoint's counters, in Prometheus' text format
  POST /v1/predict   JSON {"inputs": [...]} or a .npy body (Content-Type application/x-npy);
                     for an audio bundle also one clip as audio/wav or audio/L16;rate=N;
                     answers {"predictions", "labels", "confidence", "inference_ids"}
  POST /v1/feedback  JSON {"inference_id": ID, "label": INDEX or NAME} or {"feedback": [{...},
                     ...]} (at most MAX_FEEDBACK_ITEMS); answers {"accepted", "correct",
                     "refused": [{"index", "error"}]} (Device.feedback's refusals)
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import selectors
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from runtime.contents import _checked_header, one_line
from runtime.device import Device
from runtime.feedback import FeedbackError
from runtime.metrics import CONTENT_TYPE, ServeMetrics
from runtime.telemetry import strict_json

log = logging.getLogger("edgepack.serve")

# Limits of the endpoint; the README's "Security model" states them.
MAX_BODY = 16 * 1024 * 1024  # a .npy body
MAX_JSON_BODY = 4 * 1024 * 1024  # JSON numbers cost ~8x their text as Python objects
MAX_BODIES_IN_FLIGHT = 48 * 1024 * 1024  # bodies held in memory at once, all requests
MAX_BATCH = 1024  # samples in one request
MAX_FEEDBACK_BODY = 256 * 1024  # a feedback body: ~60 bytes per label
MAX_FEEDBACK_ITEMS = 1024  # labels in one request
MAX_JSON_DEPTH = 32
READ_DEADLINE_S = 10.0  # a request (line, headers, body) arrives within this, or 408
WRITE_TIMEOUT_S = 10.0
WORKERS = 16  # handler threads; inference is serialized by the model anyway
MAX_QUEUED = 256  # requests that arrived and wait for a worker; beyond: 503 at once
MAX_IDLE = 1024  # open connections that sent nothing yet; beyond: the oldest is closed
LISTEN_BACKLOG = 512
STACK_BYTES = 1024 * 1024  # per handler thread
LINGER_S, LINGER_BYTES = 2.0, 4 * 1024 * 1024  # after answering, read what still comes
_DIGITS = re.compile(r"[0-9]+")
_PATHS = {"/v1/health": "GET", "/v1/predict": "POST", "/v1/feedback": "POST",
          "/metrics": "GET"}


class InputError(ValueError):
    """A request body that is not a valid input; the message is one line for the client."""


def health(device: Device) -> dict[str, Any]:
    tel = device.telemetry
    return {
        "status": "ok",
        "bundle": device.info,
        "uptime_s": round(time.monotonic() - device.started, 3),
        "telemetry": None if tel is None else {
            "device_id": tel.opts.device_id,
            "broker": tel.opts.broker.url if tel.opts.broker else None,
            "connected": bool(tel.conn and tel.conn.connected.is_set()),
            "last_error": tel.conn.last_error if tel.conn else None,
            "spool": tel.spool.stats(),
        },
    }


def parse_inputs(raw: bytes, content_type: str,
                 preprocessing: dict[str, Any] | None = None) -> np.ndarray:
    """A request body -> the input array. InputError (one line) for anything else: a .npy
    body is checked from its header (plain numbers, declared size = bytes present, no
    pickles); JSON must be {"inputs": nested lists of numbers}, nested at most
    MAX_JSON_DEPTH deep, without NaN/Infinity. For an audio bundle (`preprocessing` of kind
    log-mel) also one clip as a WAV file (audio/wav) or raw PCM (audio/L16, see
    `parse_audio`)."""
    media = content_type.split(";")[0].strip().lower()
    if media in AUDIO_TYPES:
        return parse_audio(raw, content_type, preprocessing or {})
    if media == "application/x-npy":
        f = io.BytesIO(raw)
        try:
            _checked_header(f, ".npy body", MAX_BODY, len(raw))
            f.seek(0)
            x = np.lib.format.read_array(f, allow_pickle=False)
            with np.errstate(over="raise"):
                return x.astype(np.float32, copy=False)
        except FloatingPointError as exc:
            raise InputError(".npy body holds numbers beyond float32's range (+-3.4e38)") \
                from exc
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(one_line(exc)) from exc
    usage = ('body must be JSON {"inputs": [...]} (numbers, shaped like the model input or a '
             "batch) or a .npy array with Content-Type application/x-npy")
    if len(raw) > MAX_JSON_BODY:
        raise InputError(f"JSON body of {len(raw)} bytes: at most {MAX_JSON_BODY} (send "
                         f"larger batches as .npy, up to {MAX_BODY})")
    try:
        doc = strict_json(raw, MAX_JSON_DEPTH)
    except ValueError as exc:
        raise InputError(f"{usage}: {exc}") from exc
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise InputError(usage)
    try:
        with np.errstate(over="raise"):
            return np.asarray(doc["inputs"], dtype=np.float32)
    except FloatingPointError as exc:
        raise InputError(f"inputs hold numbers beyond float32's range (+-3.4e38): {usage}") \
            from exc
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"{usage} ({one_line(exc)})") from exc


AUDIO_TYPES = ("audio/wav", "audio/wave", "audio/x-wav", "audio/vnd.wave", "audio/l16")


def parse_audio(raw: bytes, content_type: str, preprocessing: dict[str, Any]) -> np.ndarray:
    """One clip, as a batch of one: a WAV file (audio/wav; any rate, resampled), or raw PCM
    as `audio/L16; rate=16000` (RFC 2586: 16-bit signed big-endian, one channel; the rate
    defaults to the bundle's). InputError (one line) for anything else."""
    from runtime import audio

    media, _, params = content_type.partition(";")
    fields = {}
    for part in params.split(";"):
        key, _, value = part.partition("=")
        if key.strip():
            fields[key.strip().lower()] = value.strip().strip('"')
    try:
        rate = None
        if media.strip().lower() == "audio/l16":
            if fields.get("channels", "1") != "1":
                raise ValueError(f"audio/L16 with channels={fields['channels']}: send one "
                                 "channel")
            if "rate" in fields:
                if not _DIGITS.fullmatch(fields["rate"]) or len(fields["rate"]) > 6:
                    raise ValueError(f"audio/L16 rate {_clip(fields['rate'])!r}: a whole "
                                     "number of Hz")
                rate = int(fields["rate"])
        clip = audio.clip_of(raw, preprocessing, wav=media.strip().lower() != "audio/l16",
                             what="audio body", rate=rate, big_endian=True)
    except ValueError as exc:
        raise InputError(one_line(exc)) from exc
    return clip[None]


FEEDBACK_USAGE = ('body must be JSON {"inference_id": ID, "label": CLASS INDEX or LABEL NAME} '
                  f'or {{"feedback": [{{...}}, ...]}} (1 to {MAX_FEEDBACK_ITEMS} of them)')
_FEEDBACK_KEYS = {"inference_id", "label"}


def parse_feedback(raw: bytes) -> list[Any]:
    """A /v1/feedback body -> its items (each checked by Device.feedback, refused one by
    one); InputError (one line) for a body of neither form."""
    try:
        doc = strict_json(raw, 4)  # {"feedback": [{"label": ...}]}: 3 levels
    except ValueError as exc:
        raise InputError(f"{FEEDBACK_USAGE}: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError(FEEDBACK_USAGE)
    if set(doc) == _FEEDBACK_KEYS:
        return [doc]
    if set(doc) != {"feedback"} or not isinstance(doc["feedback"], list):
        keys = ", ".join(repr(_clip(str(k), 20)) for k in list(doc)[:5])
        raise InputError(f"{FEEDBACK_USAGE}; got an object with {keys or 'no keys'}")
    items = doc["feedback"]
    if not 1 <= len(items) <= MAX_FEEDBACK_ITEMS:
        raise InputError(f"{len(items)} feedback items: send 1 to {MAX_FEEDBACK_ITEMS}")
    return items


def give_feedback(device: Device, items: list[Any]) -> dict[str, Any]:
    """Each item through Device.feedback; what it refuses is listed by index."""
    accepted, correct, refused = 0, 0, []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, dict) or set(item) != _FEEDBACK_KEYS:
                raise FeedbackError('an item must be {"inference_id": ID, "label": INDEX or '
                                    'NAME} and nothing else')
            result = device.feedback(item["inference_id"], item["label"])
        except FeedbackError as exc:
            refused.append({"index": i, "error": one_line(exc)})
            continue
        accepted += 1
        correct += result["correct"]
    return {"accepted": accepted, "correct": correct, "refused": refused}


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _DeadlineReader(io.RawIOBase):
    """The socket's reads, each given what is left of one deadline for the whole request:
    a client that trickles bytes cannot hold a worker longer than READ_DEADLINE_S."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + READ_DEADLINE_S
        self.expired = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError(f"request not received within {READ_DEADLINE_S:g} s")
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buf)
        except TimeoutError:
            self.expired = True
            raise


def _handler(device: Device) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgepack-runtime"
        protocol_version = "HTTP/1.1"
        server: _BoundedServer

        def setup(self) -> None:
            super().setup()
            self.rfile.close()
            self.reader = _DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self.reader, 64 * 1024)
            self.answered = False
            # what an answer needs before a request line has been read (a 408 can come first)
            self.command, self.requestline, self.request_version = "", "", ""

        def handle(self) -> None:
            self.close_connection = True  # one request per connection: no idle keep-alive
            self.handle_one_request()
            if self.reader.expired and not self.answered:
                self.send_error(408, f"request not received within {READ_DEADLINE_S:g} s")

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug(fmt, *args)

        def send_error(self, code: int, message: str | None = None,
                       explain: str | None = None) -> None:
            """http.server's own refusals (bad request line, too many headers) as JSON."""
            try:
                text = message or explain or self.responses.get(code, ("error",))[0]
                self._send(code, {"error": one_line(text)})
            except OSError:
                pass

        def _send(self, code: int, body: dict[str, Any] | str, **headers: str) -> None:
            """Answer with JSON, or with text (a str body: the metrics)."""
            text = isinstance(body, str)
            data = body.encode() if text else json.dumps(body).encode()
            self.connection.settimeout(WRITE_TIMEOUT_S)
            self.answered = True
            path = getattr(self, "path", "").split("?")[0]
            self.server.metrics.answered(path if path in _PATHS else "other", code)
            self.send_response(code)
            self.send_header("Content-Type", CONTENT_TYPE if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def __getattr__(self, name: str) -> Any:
            if name.startswith("do_"):  # any other method: 405 (404 on unknown paths)
                return self._wrong_method
            raise AttributeError(name)

        def _route(self, method: str) -> bool:
            allowed = _PATHS.get(self.path.split("?")[0])
            if allowed is None:
                self._send(404, {"error": f"no such endpoint {_clip(self.path)!r}; try GET "
                                          "/v1/health, GET /metrics, POST /v1/predict or "
                                          "POST /v1/feedback"})
            elif allowed != method:
                self._send(405, {"error": f"{_clip(self.command, 20)} is not allowed on "
                                          f"{self.path.split('?')[0]}; use {allowed}"},
                           Allow=allowed)
            return allowed == method

        def _wrong_method(self) -> None:
            self._route("")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if not self._route("GET"):
                return
            if self.path.split("?")[0] == "/metrics":
                self._send(200, self.server.metrics.render(device))
            else:
                self._send(200, health(device))

        def do_POST(self) -> None:  # noqa: N802
            if not self._route("POST"):
                return
            feedback = self.path.split("?")[0] == "/v1/feedback"
            length = self._content_length(MAX_FEEDBACK_BODY if feedback else MAX_BODY)
            if length is None:
                return
            if not self.server.bodies.reserve(length):
                self._send(503, {"error": "busy: too many request bodies in flight; retry"},
                           **{"Retry-After": "1"})
                return
            try:
                if feedback:
                    self._feedback(length)
                else:
                    self._predict(length)
            finally:
                self.server.bodies.release(length)

        def _content_length(self, limit: int) -> int | None:
            """The declared body size, checked before a byte of the body is read."""
            if self.headers.get("Transfer-Encoding"):
                self._send(411, {"error": "chunked bodies are not accepted; send a "
                                          "Content-Length"})
                return None
            values = self.headers.get_all("Content-Length") or []
            if not values:
                self._send(411, {"error": "Content-Length required"})
                return None
            if len(set(values)) != 1 or not _DIGITS.fullmatch(values[0].strip()):
                self._send(400, {"error": f"Content-Length {_clip(', '.join(values), 40)!r} "
                                          "must be one non-negative integer"})
                return None
            digits = values[0].strip()
            length = int(digits) if len(digits) <= 18 else limit + 1
            if length > limit:
                self._send(413, {"error": f"body of {_clip(digits, 24)} bytes is larger than "
                                          f"the limit of {limit} bytes "
                                          f"({limit / 2**20:g} MiB)"})
                return None
            if length == 0:
                self._send(400, {"error": f"empty body; {FEEDBACK_USAGE}"
                                 if limit == MAX_FEEDBACK_BODY else
                                 "empty body; send JSON {\"inputs\": [...]} or a .npy array"})
                return None
            return length

        def _body(self, length: int) -> bytes | None:
            """The body, or None when an error was answered."""
            try:
                raw = self.rfile.read(length)
            except TimeoutError:
                self._send(408, {"error": f"body not received within {READ_DEADLINE_S:g} s"})
                return None
            if len(raw) != length:
                self._send(400, {"error": f"body ended after {len(raw)} of {length} bytes"})
                return None
            return raw

        def _feedback(self, length: int) -> None:
            if (raw := self._body(length)) is None:
                return
            try:
                items = parse_feedback(raw)
            except InputError as exc:
                self._send(400, {"error": one_line(exc)})
                return
            self._send(200, give_feedback(device, items))

        def _predict(self, length: int) -> None:
            if (raw := self._body(length)) is None:
                return
            try:
                x = parse_inputs(raw, self.headers.get("Content-Type", ""),
                                 device.model.manifest.input.preprocessing)
                del raw
                n = len(x) if x.ndim == len(device.model.raw_shape) + 1 else 1
                if not 1 <= n <= MAX_BATCH:
                    raise InputError(f"a batch of {n} samples: send 1 to {MAX_BATCH}")
                started = time.perf_counter()
                ids, conf, inference_ids = device.classify(x, with_ids=True)
                self.server.metrics.inferred(n, time.perf_counter() - started)
            except ValueError as exc:  # InputError, and the model's own shape/NaN checks
                self._send(400, {"error": one_line(exc)})
                return
            except Exception as exc:  # the endpoint stays up; the error is counted
                self._send(500, {"error": f"{type(exc).__name__}: {one_line(exc)}"})
                return
            labels = device.model.labels
            self._send(200, {"predictions": ids.tolist(),
                             "labels": [labels[i] if i < len(labels) else str(i)
                                        for i in ids.tolist()],
                             "confidence": [round(float(c), 6) for c in conf],
                             "inference_ids": inference_ids})

    return Handler


class _Budget:
    """Bytes of request bodies held at once: a cap on memory whatever the concurrency."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self._lock = limit, 0, threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 51\r\n\r\n"
         b'{"error": "busy: too many requests waiting; retry"}')


class _BoundedServer:
    """Mixed into a socketserver server: accepted connections wait in one selector thread
    until their request starts arriving (idle ones cost no thread and are closed after
    READ_DEADLINE_S), then go to a fixed pool of WORKERS threads through a queue of
    MAX_QUEUED; when the queue is full the client gets a 503 at once."""

    request_queue_size = LISTEN_BACKLOG
    bodies: _Budget
    metrics: ServeMetrics

    def _start_pool(self) -> None:
        handler_count = WORKERS
        self.bodies = _Budget(MAX_BODIES_IN_FLIGHT)
        self.metrics = ServeMetrics()
        self._ready: queue.Queue[tuple[Any, Any] | None] = queue.Queue(MAX_QUEUED)
        self._idle = selectors.DefaultSelector()
        self._idle_lock = threading.Lock()
        self._closing = threading.Event()
        self._pool = [threading.Thread(target=self._work, name=f"serve-worker-{i}",
                                       daemon=True) for i in range(handler_count)]
        self._pool.append(threading.Thread(target=self._wait_room, name="serve-idle",
                                           daemon=True))
        # small stacks: the default (8 MiB each, reserved) counts against a device's
        # address-space limit, and a handler's recursion is bounded (JSON depth is capped)
        previous = threading.stack_size(STACK_BYTES)
        try:
            for t in self._pool:
                t.start()
        except RuntimeError as exc:  # no memory for another thread
            self._closing.set()
            raise OSError(f"cannot start {handler_count} handler threads ({exc}); is the "
                          "address-space limit (ulimit -v) too low?") from exc
        finally:
            threading.stack_size(previous)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._idle_lock:
            if len(self._idle.get_map()) >= MAX_IDLE:  # the oldest idle one makes room
                oldest = min(self._idle.get_map().values(), key=lambda k: k.data[1])
                self._idle.unregister(oldest.fileobj)
                self.shutdown_request(oldest.fileobj)
            self._idle.register(request, selectors.EVENT_READ,
                                (client_address, time.monotonic()))

    def _wait_room(self) -> None:
        try:
            self._wait_loop()
        finally:
            self._idle.close()

    def _wait_loop(self) -> None:
        while not self._closing.is_set():
            events = self._idle.select(0.2)
            now = time.monotonic()
            with self._idle_lock:
                if self._closing.is_set():
                    return
                gone: dict[Any, Any] = {k.fileobj: None for k in self._idle.get_map().values()
                                        if now - k.data[1] > READ_DEADLINE_S}
                gone.update((k.fileobj, k.data) for k, _ in events)  # ready wins over stale
                for sock in gone:
                    self._idle.unregister(sock)
            for sock, data in gone.items():
                if data is None:  # idle too long: nothing was asked, nothing to answer
                    self.shutdown_request(sock)
                    continue
                try:
                    self._ready.put_nowait((sock, data[0]))
                except queue.Full:
                    self._refuse_busy(sock)

    def _refuse_busy(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(False)
            try:
                sock.recv(1 << 16)  # what has arrived, so that closing does not reset it
            except OSError:
                pass
            sock.send(_BUSY)
        except OSError:
            pass
        self.metrics.answered("other", 503)  # refused before its request line was read
        self.shutdown_request(sock)

    def _work(self) -> None:
        while not self._closing.is_set():
            try:
                item = self._ready.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            sock, address = item
            try:
                self.finish_request(sock, address)
            except Exception:  # a broken connection must not end the worker
                log.debug("request from %s failed", address, exc_info=True)
            finally:
                self._linger_close(sock)

    def _linger_close(self, sock: socket.socket) -> None:
        """Close after our answer, reading for a moment what the client still sends (a body
        we refused): closing with unread bytes resets the connection, and the client might
        lose the answer."""
        try:
            sock.shutdown(socket.SHUT_WR)
            end, got = time.monotonic() + LINGER_S, 0
            while (left := end - time.monotonic()) > 0 and got < LINGER_BYTES:
                sock.settimeout(left)
                if not (chunk := sock.recv(1 << 16)):
                    break
                got += len(chunk)
        except OSError:
            pass
        self.close_request(sock)

    def _stop_pool(self) -> None:
        if not hasattr(self, "_closing"):  # closed before it was activated (bind failed)
            return
        self._closing.set()  # the workers see it within half a second
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        with self._idle_lock:
            for key in list(self._idle.get_map().values()):
                self._idle.unregister(key.fileobj)
                self.shutdown_request(key.fileobj)


class BoundedHTTPServer(_BoundedServer, HTTPServer):
    def server_bind(self) -> None:  # HTTPServer's also looks the host up in DNS: not needed
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def server_activate(self) -> None:
        super().server_activate()
        self._start_pool()

    def server_close(self) -> None:
        super().server_close()
        self._stop_pool()


class _UnixHTTPServer(_BoundedServer, socketserver.UnixStreamServer):
    """The same server on a Unix socket; on close it removes the socket it made, and only
    that (the inode it bound)."""

    def __init__(self, path: Path, handler: type[BaseHTTPRequestHandler]) -> None:
        self.path = path
        super().__init__(str(path), handler)
        st = os.lstat(path)
        self._made = (st.st_dev, st.st_ino)
        os.chmod(path, 0o660)

    def server_activate(self) -> None:
        super().server_activate()
        self._start_pool()

    def get_request(self):  # http.server expects (host, port)-like client addresses
        request, _ = super().get_request()
        return request, ("unix", 0)

    def server_close(self) -> None:
        super().server_close()
        self._stop_pool()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._made:
                self.path.unlink()
        except OSError:
            pass


def check_socket_path(path: Path) -> None:
    """Clear the way for a Unix socket at `path`: only a stale socket (nobody listening)
    is removed; a regular file, a link, a folder or a live socket make a ValueError."""
    if not path.parent.is_dir():
        raise ValueError(f"{path.parent} is not a folder")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path} exists and is not a socket; refusing to replace it "
                         "(remove it or choose another --socket path)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: left by a server that is gone
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise ValueError(f"{path} is a socket another server is listening on")


def make_server(device: Device, *, http: str | None = None,
                socket_path: Path | None = None) -> socketserver.BaseServer:
    handler = _handler(device)
    if socket_path is not None:
        check_socket_path(Path(socket_path))
        return _UnixHTTPServer(Path(socket_path), handler)
    return BoundedHTTPServer(http_address(http or "127.0.0.1:8080"), handler)


def http_address(text: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port); ValueError naming what is valid."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--http {_clip(text, 80)!r} must be HOST:PORT (a port from 0 to "
                         "65535)")
    return host or "127.0.0.1", int(port)


def replay(device: Device, x: np.ndarray, *, rate: float | None = None, batch: int = 1,
           repeat: int = 1, on_progress: Callable[[int, int], None] | None = None,
           should_stop: Callable[[], bool] = lambda: False, y: np.ndarray | None = None,
           feedback_share: float = 0.0) -> int:
    """Push recorded inputs through the device at `rate` inferences per second (None: as fast
    as it goes), `batch` samples per call; with labels `y` and a `feedback_share` (0..1),
    report the true label of that share of the inferences (on a stride; Device.feedback_stats
    counts them). Returns the number of samples run."""
    if feedback_share and (y is None or len(y) != len(x)):
        raise ValueError("feedback needs one label per input")
    total = len(x) * repeat
    done = 0
    start = time.monotonic()
    for _ in range(repeat):
        for i in range(0, len(x), batch):
            if should_stop():
                return done
            chunk = x[i:i + batch]
            if feedback_share:
                _, _, ids = device.classify(chunk, with_ids=True)
                for j, inference_id in enumerate(ids):
                    k = done + j + 1  # this run's k-th inference: labelled on the stride
                    if int(k * feedback_share) > int((k - 1) * feedback_share):
                        try:
                            device.feedback(inference_id, int(y[i + j]))
                        except FeedbackError:  # a reload replaced the bundle that served
                            pass  # it (counted in feedback_stats): the replay goes on
            else:
                device.classify(chunk)
            done += len(chunk)
            if on_progress:
                on_progress(done, total)
            if rate:
                ahead = start + done / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    return done
