"""Device telemetry: windows, events and command results go through the on-disk spool and
out over MQTT (QoS 1); the retained status with its last will says whether the device is
online. The topics and the message envelope are runtime.protocol's.

Delivery guarantee. The spool is the source of truth, and a record leaves it only when it is
acknowledged end to end:
- `ack="listener"` (the default): when a listener's ack (`<prefix>/<device>/acks`) says the
  store holds it. The broker's PUBACK only moves it from "in flight" to "awaiting the
  listener"; a record no listener acknowledged `ack_timeout_s` after its PUBACK is sent again
  (then after 2x, 4x, up to 8x the timeout), and every such record is sent again at once after
  a reconnect to a broker that lost our session. So whatever the broker does (a restart that
  forgets shared subscriptions or queued messages, a listener that never got the message),
  every record is stored at least once while it is in the spool, and the listener's (device,
  seq) key stores it exactly once. Acks may come in any order and from several listeners.
- `ack="broker"`: when the broker PUBACKs it (for a fleet without our listener): a broker
  outage or a restart of this process loses nothing, but a broker that drops an
  acknowledged message (no subscriber, lost state) loses it.
Either way, what the size cap drops is counted and shows as a sequence gap; records are
sent again after a restart of this process unless acknowledged before it (duplicates, never
losses). At most `inflight` records await the broker's PUBACK at any time, resends included.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime import protocol
from runtime.capture import check_options as check_capture_options
from runtime.contents import one_line
from runtime.mqtt import BrokerConfig, Connection
from runtime.spool import Record, Spool
from runtime.window import Window

log = logging.getLogger("edgepack.telemetry")
COMMAND_WORKERS = 4  # commands run at the same time; more wait for a slot
ACK_MODES = ("listener", "broker")
RESEND_BACKOFF_MAX = 8  # the n-th resend waits min(2^n, 8) x the ack timeout
RESEND_SCAN_S = 0.2  # how often the records awaiting a listener are checked for resending
UNMATCHED_PUBACK_S = 10.0

def boot_id() -> str:
    """Monotonic times compare only within one boot of the device."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@dataclass
class TelemetryOptions:
    device_id: str
    spool_dir: Path
    broker: BrokerConfig | None = None  # None: spool only, sent by a later run with a broker
    prefix: str = protocol.DEFAULT_PREFIX
    window_seconds: float = 60.0
    window_inferences: int = 1000
    fsync: str = "interval"
    spool_max_bytes: int = 64 * 1024 * 1024
    inflight: int = 50
    client_id: str | None = None
    ack: str = "listener"  # who releases a record from the spool: a listener, or the broker
    ack_timeout_s: float = 30.0  # resend what no listener acknowledged this long after PUBACK
    capture_rate: float = 0.0  # share of inferences whose inputs are captured (0: none)
    capture_max_mb: float = 16.0  # the most sample bytes (MiB) this process captures

    def validate(self) -> None:
        protocol.check_names(self.device_id, self.prefix)
        if self.window_seconds <= 0 or self.window_inferences < 1:
            raise ValueError("a telemetry window needs a positive length in seconds and at "
                             "least one inference")
        if self.inflight < 1:
            raise ValueError("inflight must be at least 1")
        if self.ack not in ACK_MODES:
            raise ValueError(f"ack {self.ack!r} is not one of {', '.join(ACK_MODES)}")
        if not self.ack_timeout_s > 0:
            raise ValueError("the ack timeout must be a positive number of seconds")
        check_capture_options(self.capture_rate, self.capture_max_mb)


class Telemetry:
    """Feeds windows from the inference path and drains the spool to the broker.
    `on_command(command: dict) -> dict` runs on a worker thread for every command."""

    def __init__(self, opts: TelemetryOptions, bundle: dict[str, Any],
                 reference: dict[str, Any] | None, n_classes: int, budgets: dict[str, Any],
                 on_command: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 view: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        opts.validate()
        self.opts = opts
        self.spool = Spool(opts.spool_dir, max_bytes=opts.spool_max_bytes, fsync=opts.fsync)
        self._boot = boot_id()
        self._bundle = bundle
        self._reference = reference
        self._n_classes = n_classes
        self._budgets = budgets  # the profile's, from the manifest: the listener's latency rule
        self._view = view  # what input drift reads of a raw input (runtime.window.Window)
        self._window = Window(reference, n_classes, opts.window_inferences, view=view)
        self._window_lock = threading.Lock()
        self.window_seqs: list[int] = []  # this process's windows, for replay's summary
        self._dropped_reported = self.spool.dropped
        self._lost_reported = 0  # records this process could not write, already reported
        self._on_command = on_command
        # name -> fn() giving the window body's section of that name (None: none this time),
        # called under the window lock as each window closes (feedback, shadow runs)
        self._sections: dict[str, Callable[[], dict[str, Any] | None]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()  # PUBACKed mids
        self._listener_acks: queue.SimpleQueue[list[tuple[int, int]]] = queue.SimpleQueue()
        self._commands: queue.Queue[bytes | None] = queue.Queue()
        self._inflight: dict[int, tuple[int, int]] = {}  # mid -> (seq, resends so far)
        self._awaiting: dict[int, tuple[float, int]] = {}  # seq -> (resend at, resends so far)
        self._handed = self.spool.acked  # every seq up to here was handed to the broker once
        self._next_due = math.inf  # the earliest resend time in _awaiting (or later)
        self._resend_all = False  # the broker lost our session: resend what awaits at once
        self._subscribed_on = 0  # the connection (Connection.connects) we subscribed on
        self.resent = 0
        self.bad_acks = 0
        self.conn: Connection | None = None
        if opts.broker:
            self.conn = Connection(
                opts.broker, opts.client_id or f"edgepack-dev-{opts.device_id}",
                on_connect=self._connected, on_message=self._message,
                on_publish=self._published, max_inflight=opts.inflight,
                will=(self.topic("status"), self._status_payload("offline", "connection lost")))
        self._threads = [threading.Thread(target=self._drain_loop, name="telemetry-drain",
                                          daemon=True),
                         threading.Thread(target=self._timer_loop, name="telemetry-timer",
                                          daemon=True),
                         threading.Thread(target=self._command_loop, name="telemetry-commands",
                                          daemon=True)]

    def topic(self, kind: str) -> str:
        return protocol.topic(self.opts.prefix, self.opts.device_id, kind)

    # -- messages ---------------------------------------------------------------------------
    def _envelope(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        return protocol.envelope(kind, self.opts.device_id, self._bundle, body,
                                 boot=self._boot)

    def _status_payload(self, state: str, reason: str) -> bytes:
        # the last spooled record's seq: status is not spooled and takes none of its own
        msg = protocol.envelope("status", self.opts.device_id, self._bundle,
                                {"state": state, "reason": reason}, boot=self._boot,
                                seq=self.spool.next_seq - 1)
        return json.dumps(msg).encode()

    def event(self, name: str, **data: Any) -> int:
        seq = self.spool.append(self.topic("events"),
                                self._envelope("event", {"event": name, **data}))
        self._wake.set()
        return seq

    def result(self, body: dict[str, Any]) -> int:
        seq = self.spool.append(self.topic("results"), self._envelope("result", body))
        self._wake.set()
        return seq

    def capture(self, body: dict[str, Any], bundle: dict[str, Any] | None = None) -> int:
        """A capture message (runtime.capture) of samples `bundle` (default: the current
        one) served."""
        msg = protocol.envelope("capture", self.opts.device_id, bundle or self._bundle, body,
                                boot=self._boot)
        seq = self.spool.append(self.topic("capture"), msg)
        self._wake.set()
        return seq

    @property
    def bundle(self) -> dict[str, Any]:
        """The bundle serving now, as the envelope of every message names it."""
        return self._bundle

    # -- the inference path -----------------------------------------------------------------
    def record(self, x: np.ndarray, ids: np.ndarray, confidence: np.ndarray,
               latency_s: float) -> None:
        """One inference: a few stores into the window's preallocated arrays (runtime.window);
        the window's statistics are computed when it closes."""
        lock = self._window_lock
        lock.acquire()
        try:
            if self._window.record(x, ids, confidence, latency_s):  # full: window_inferences
                self._emit_locked()
        finally:
            lock.release()

    def record_error(self, kind: str) -> None:
        with self._window_lock:
            if self._window.record_error(kind):
                self._emit_locked()

    def add_section(self, name: str, section: Callable[[], dict[str, Any] | None]) -> None:
        """Every window from now on carries body[name] = section() (when not None); called
        under the window lock as the window closes, so it may take and reset counters."""
        with self._window_lock:
            self._sections[name] = section

    def remove_section(self, name: str) -> None:
        with self._window_lock:
            self._sections.pop(name, None)

    def flush(self, force: bool = False) -> int | None:
        """Close the current window now if it has anything in it (or `force`: a section has
        something to report); returns its seq."""
        with self._window_lock:
            return self._emit_locked() if self._window.count or force else None

    def _emit_locked(self) -> int:
        body = self._window.close()
        body["window"]["index"] = len(self.window_seqs)
        body["window"]["period_s"] = self.opts.window_seconds  # the listener's silence rule
        body["budgets"] = self._budgets
        for name, section in tuple(self._sections.items()):
            if (part := section()) is not None:
                body[name] = part
        stats = self.spool.stats()
        body["spool"] = {"pending": stats["pending"], "bytes": stats["bytes"],
                         "dropped_total": stats["dropped"],
                         "dropped_since_last": stats["dropped"] - self._dropped_reported,
                         "corrupt": stats["corrupt"], "lost_total": stats["lost"],
                         "lost_since_last": stats["lost"] - self._lost_reported,
                         "write_errors": stats["write_errors"], "resent_total": self.resent,
                         "bad_acks_total": self.bad_acks}
        seq = self.spool.append(self.topic("telemetry"), self._envelope("window", body))
        if self.spool.last_lost_seq != seq:  # written: its counts are reported
            self._dropped_reported = stats["dropped"]
            self._lost_reported = stats["lost"]
            self.window_seqs.append(seq)
        self._window = Window(self._reference, self._n_classes, self.opts.window_inferences,
                              expected=body["count"], view=self._view)
        self._wake.set()
        return seq

    def set_bundle(self, bundle: dict[str, Any], reference: dict[str, Any] | None,
                   n_classes: int, budgets: dict[str, Any],
                   view: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """A new model serves from now on: close the old model's window first, so that no
        window mixes two bundles."""
        with self._window_lock:
            if self._window.count:
                self._emit_locked()
            self._bundle, self._reference, self._n_classes = bundle, reference, n_classes
            self._budgets, self._view = budgets, view
            self._window = Window(reference, n_classes, self.opts.window_inferences, view=view)
        self.publish_status("online", "bundle loaded")

    # -- MQTT side ---------------------------------------------------------------------------
    def publish_status(self, state: str, reason: str) -> None:
        if self.conn is not None:
            self.conn.publish(self.topic("status"), self._status_payload(state, reason),
                              retain=True)

    def _connected(self, session_present: bool) -> None:
        assert self.conn is not None
        topics = [self.topic(protocol.COMMANDS)]
        if self.opts.ack == "listener":
            topics.append(self.topic(protocol.ACKS))
        self.conn.subscribe(topics)
        if not session_present:
            # a broker without our session may have lost what it PUBACKed (a restart
            # without persistence): what no listener acknowledged goes again
            self._resend_all = True
        # the SUBSCRIBE goes out before any record of this connection: no ack can miss us
        self._subscribed_on = self.conn.connects
        self.publish_status("online", "connected")
        self._wake.set()

    def _published(self, mid: int) -> None:
        self._acks.put(mid)  # no locks here: paho calls this holding its own
        self._wake.set()

    def _message(self, msg: Any) -> None:
        if msg.topic == self.topic(protocol.COMMANDS):
            self._commands.put(bytes(msg.payload))
        elif msg.topic == self.topic(protocol.ACKS):
            try:
                self._listener_acks.put(protocol.parse_ack(bytes(msg.payload)))
            except protocol.MessageRejected as exc:  # anyone may publish there: ignore it
                self.bad_acks += 1
                if self.bad_acks == 1 or self.bad_acks % 1000 == 0:
                    log.warning("ignored a bad ack (%d so far): %s", self.bad_acks, exc)
                return
            self._wake.set()

    def _drain_loop(self) -> None:
        # PUBACKs not matched yet: one can come before publish() returned its mid to us.
        # Those of status messages never match: forgotten after a while, so that a record
        # reusing the mid later is not taken for acknowledged.
        early: dict[int, float] = {}
        next_scan = 0.0
        while True:
            self._wake.wait(0.2)
            self._wake.clear()
            while True:
                try:
                    mid = self._acks.get_nowait()
                except queue.Empty:
                    break
                early.setdefault(mid, time.monotonic())
            now = time.monotonic()
            for mid, seen in list(early.items()):
                if mid in self._inflight:
                    seq, resends = self._inflight.pop(mid)
                    del early[mid]
                    self._broker_acked(seq, resends, now)
                elif seen < now - UNMATCHED_PUBACK_S:
                    del early[mid]
            self._apply_listener_acks()
            if self._stop.is_set():
                return
            if self.conn is None or not self.conn.connected.is_set() or \
                    self._subscribed_on != self.conn.connects:
                continue
            room = self.opts.inflight - len(self._inflight)
            if room > 0 and (self._resend_all or now >= next_scan):
                next_scan = now + RESEND_SCAN_S
                room -= self._resend_due(room, now)
            if room <= 0:
                continue
            for rec in self.spool.pending(after=self._handed, limit=room):
                self._publish(rec, 0)
                self._handed = rec.seq
            if self._handed < self.spool.acked:  # the size cap dropped what we had not sent
                self._handed = self.spool.acked

    def _publish(self, rec: Record, resends: int) -> None:
        assert self.conn is not None
        info = self.conn.publish(rec.topic, rec.payload)
        self._inflight[info.mid] = (rec.seq, resends)

    def _broker_acked(self, seq: int, resends: int, now: float) -> None:
        if self.opts.ack == "broker":
            self.spool.ack(seq)
        elif self.spool.is_pending(seq):  # else a listener's ack overtook the PUBACK
            wait = self.opts.ack_timeout_s * min(2 ** resends, RESEND_BACKOFF_MAX)
            self._awaiting[seq] = (now + wait, resends)
            self._next_due = min(self._next_due, now + wait)

    def _apply_listener_acks(self) -> None:
        while True:
            try:
                ranges = self._listener_acks.get_nowait()
            except queue.Empty:
                return
            # ranges are checked sorted and disjoint: one pass over what the spool holds
            for seq in self.spool.ack_ranges(ranges):
                self._awaiting.pop(seq, None)

    def _resend_due(self, room: int, now: float) -> int:
        """Send again (up to `room`) what the broker PUBACKed but no listener acknowledged
        in time; after a reconnect that lost our session, all of it. Returns how many."""
        if self._resend_all:
            self._resend_all = False
            self._awaiting = {seq: (now, 0) for seq in self._awaiting}
            self._next_due = now
        if now < self._next_due:
            return 0
        due = sorted(seq for seq, (at, _) in self._awaiting.items() if at <= now)[:room]
        later = [at for seq, (at, _) in self._awaiting.items() if at > now]
        # what did not fit in `room` is still due: look again on the next pass
        self._next_due = now if len(due) == room else min(later, default=math.inf)
        if not due:
            return 0
        records = self.spool.read(due)
        for seq in set(due) - {rec.seq for rec in records}:
            del self._awaiting[seq]  # acknowledged meanwhile, or dropped by the size cap
        for rec in records:
            _, resends = self._awaiting.pop(rec.seq)
            self._publish(rec, resends + 1)
        self.resent += len(records)
        return len(records)

    def _timer_loop(self) -> None:
        while not self._stop.wait(0.2):
            with self._window_lock:
                age = time.monotonic() - self._window.start_mono
                # an idle device sends its (empty) window too: a heartbeat, so the listener
                # can tell a quiet device from a silent one (the "silence" rule metric)
                if age >= self.opts.window_seconds:
                    self._emit_locked()
            if self.opts.fsync == "interval":
                self.spool.flush()

    def _command_loop(self) -> None:
        # a thread per command, a few at once: a reload fetching from a slow server (up to
        # its deadline) or a bench does not hold up a ping
        slots = threading.BoundedSemaphore(COMMAND_WORKERS)
        while (raw := self._commands.get()) is not None:
            slots.acquire()
            threading.Thread(target=self._run_command, args=(raw, slots), daemon=True,
                             name="telemetry-command").start()

    def _run_command(self, raw: bytes, slots: threading.BoundedSemaphore) -> None:
        try:
            self.result(handle_command(raw, self._on_command))
        finally:
            slots.release()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Telemetry:
        for t in self._threads:
            t.start()
        if self.conn is not None:
            self.conn.start()
        return self

    def drained(self) -> bool:
        return self.spool.pending_count == 0

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.drained():
            if time.monotonic() >= deadline:
                return False
            self._wake.set()
            time.sleep(0.05)
        return True

    def close(self, drain_timeout: float = 10.0, *, graceful: bool = True) -> dict[str, Any]:
        """Flush the open window, try to drain the spool for `drain_timeout` seconds, say
        offline, disconnect. Whatever is not acknowledged stays in the spool for next time."""
        self.flush()
        drained = self.wait_drained(drain_timeout) if self.conn is not None else False
        self._commands.put(None)
        if self.conn is not None and graceful:
            self.publish_status("offline", "stopped")
            time.sleep(0.1)
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            if t.is_alive():
                t.join(5)
        if self.conn is not None:
            self.conn.stop(disconnect=graceful)
        stats = self.spool.stats()
        self.spool.close()
        return {**stats, "drained": drained, "resent": self.resent, "bad_acks": self.bad_acks}


MAX_COMMAND_BYTES = 64 * 1024  # a command is a name and a few arguments
MAX_JSON_DEPTH = 32
MAX_NAME_CHARS = 64  # what of a command name or id is echoed back
MAX_ERROR_CHARS = 1000
# a string, or an unterminated one to the end (matched once, never rescanned from each quote)
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\Z)', re.DOTALL)
_BRACKETS = np.zeros(256, dtype=np.int32)
_BRACKETS[[ord("["), ord("{")]], _BRACKETS[[ord("]"), ord("}")]] = 1, -1


def _short(text: str, limit: int = MAX_NAME_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def strict_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads for hostile bytes: nesting at most `max_depth`, no NaN/Infinity. Raises
    ValueError with a one-line message."""
    # depth from the brackets outside strings, counted in C (numpy) before the parser recurses
    steps = _BRACKETS[np.frombuffer(_STRINGS.sub(b'""', raw), dtype=np.uint8)]
    if steps.size and int(np.cumsum(steps).max()) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError as exc:  # what the count above cannot see (an unclosed string)
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON ({one_line(exc)})") from exc


def _error(cid: Any, name: str | None, message: str) -> dict[str, Any]:
    text = " ".join(message.split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "..."
    return {"id": cid, "command": name, "ok": False, "error": text}


def handle_command(raw: bytes, handler: Callable[[dict], dict] | None) -> dict[str, Any]:
    """Parse and run one command; anything wrong becomes an error result (bounded in size:
    names and ids are echoed truncated), never an exception on the device."""
    usage = ('expected {"command": NAME, "id": STRING or INTEGER, "args": {...}} '
             f"(at most {MAX_COMMAND_BYTES} bytes)")
    if not isinstance(raw, bytes | bytearray | memoryview):
        return _error(None, None, f"malformed command: a {type(raw).__name__}, not bytes")
    if len(raw) > MAX_COMMAND_BYTES:
        return _error(None, None, f"malformed command: {len(raw)} bytes, at most "
                                  f"{MAX_COMMAND_BYTES}")
    try:
        cmd = strict_json(bytes(raw))
    except ValueError as exc:
        return _error(None, None, f"malformed command: {exc}")
    if not isinstance(cmd, dict):
        return _error(None, None, f"malformed command: {usage}")
    cid = cmd.get("id")
    if not (cid is None or (type(cid) is int and abs(cid) < 2**63)
            or (isinstance(cid, str) and len(cid) <= MAX_NAME_CHARS)):
        return _error(None, None, f"malformed command: id must be a string of at most "
                                  f"{MAX_NAME_CHARS} characters or an integer")
    name = cmd.get("command")
    if not isinstance(name, str) or not name:
        return _error(cid, None, f"malformed command: {usage}")
    if len(name) > MAX_NAME_CHARS:
        return _error(cid, _short(name), f"malformed command: the name is {len(name)} "
                                         f"characters, at most {MAX_NAME_CHARS}")
    args = cmd.get("args", {})
    if not isinstance(args, dict):
        return _error(cid, name, f"args must be an object, not {type(args).__name__}")
    if handler is None:
        return _error(cid, name, "this runtime takes no commands")
    try:
        return {"id": cid, "command": name, "ok": True,
                "result": handler({**cmd, "args": args})}
    except CommandError as exc:
        return _error(cid, name, str(exc))
    except Exception as exc:  # a command must never take the device down
        log.exception("command %s failed", name)
        return _error(cid, name, f"{type(exc).__name__}: {exc}")


class CommandError(Exception):
    """A command that cannot be done as asked (unknown name, bad arguments, failed reload)."""
