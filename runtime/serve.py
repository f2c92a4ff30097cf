"""The device's local endpoint (HTTP on loopback or a Unix socket) and the replay driver;
both run inferences through `Device`, so telemetry sees exactly what a real app would.

Endpoints:
  GET  /v1/health    bundle, telemetry connection, spool state
  POST /v1/predict   JSON {"inputs": [...]} or a .npy body (Content-Type application/x-npy);
                     answers {"predictions", "labels", "confidence"}
"""

from __future__ import annotations

import io
import json
import logging
import os
import socketserver
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from runtime.device import Device

log = logging.getLogger("edgepack.serve")
MAX_BODY = 64 * 1024 * 1024


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


def _handler(device: Device) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgepack-runtime"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug(fmt, *args)

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/v1/health":
                self._send(200, health(device))
            else:
                self._send(404, {"error": f"no such endpoint {self.path}; "
                                          "try GET /v1/health or POST /v1/predict"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/predict":
                self._send(404, {"error": f"no such endpoint {self.path}; try POST /v1/predict"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self._send(413 if length > MAX_BODY else 400,
                           {"error": f"body must be 1 B to {MAX_BODY >> 20} MiB"})
                return
            raw = self.rfile.read(length)
            try:
                x = parse_inputs(raw, self.headers.get("Content-Type", ""))
                ids, conf = device.classify(x)
            except ValueError as exc:
                self._send(400, {"error": str(exc)})
                return
            except Exception as exc:  # the endpoint stays up; the error is counted
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})
                return
            labels = device.model.labels
            self._send(200, {"predictions": ids.tolist(),
                             "labels": [labels[i] if i < len(labels) else str(i)
                                        for i in ids.tolist()],
                             "confidence": [round(float(c), 6) for c in conf]})

    return Handler


def parse_inputs(raw: bytes, content_type: str) -> np.ndarray:
    if content_type.startswith("application/x-npy"):
        try:
            return np.load(io.BytesIO(raw), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"body is not a .npy array: {exc}") from exc
    try:
        doc = json.loads(raw)
        return np.asarray(doc["inputs"], dtype=np.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError('body must be JSON {"inputs": [...]} (numbers, shaped like the '
                         'model input or a batch) or a .npy array with Content-Type '
                         f'application/x-npy ({exc})') from exc


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # http.server expects (host, port)-like client addresses
        request, _ = super().get_request()
        return request, ("unix", 0)


def make_server(device: Device, *, http: str | None = None,
                socket_path: Path | None = None) -> socketserver.BaseServer:
    handler = _handler(device)
    if socket_path is not None:
        if socket_path.exists():
            socket_path.unlink()
        server = _UnixHTTPServer(str(socket_path), handler)
        os.chmod(socket_path, 0o660)
        return server
    host, _, port = (http or "127.0.0.1:8080").rpartition(":")
    try:
        return ThreadingHTTPServer((host or "127.0.0.1", int(port)), handler)
    except ValueError as exc:
        raise ValueError(f"--http {http!r} must be HOST:PORT") from exc


def replay(device: Device, x: np.ndarray, *, rate: float | None = None, batch: int = 1,
           repeat: int = 1, on_progress: Callable[[int, int], None] | None = None,
           should_stop: Callable[[], bool] = lambda: False) -> int:
    """Push recorded inputs through the device at `rate` inferences per second (None: as fast
    as it goes), `batch` samples per call. Returns the number of samples run."""
    total = len(x) * repeat
    done = 0
    start = time.monotonic()
    for _ in range(repeat):
        for i in range(0, len(x), batch):
            if should_stop():
                return done
            chunk = x[i:i + batch]
            device.classify(chunk)
            done += len(chunk)
            if on_progress:
                on_progress(done, total)
            if rate:
                ahead = start + done / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    return done
