"""Captured inputs from the devices, kept as files beside the store: the listener validates a
capture message (every field hostile), writes its samples atomically as one `.npz` per
message and stores the messages row with a small descriptor in place of the payload, so the
database never holds sample bytes. `toolchain dataset export` reads them back.

    <data_dir>/<device_id>/<seq, 20 digits>.npz
        x              float32 (n, *sample shape): raw inputs, before the bundle's normalization
        inference_ids  str (n,)     predictions int64 (n,)     confidence float64 (n,)
        labels         int64 (n,): the feedback label shipped with the sample, -1 for none
        late_ids, late_labels       str (k,), int64 (k,): labels for samples shipped earlier
        device_id, bundle_sha256, model, version   str ()      wall_time float64 () (NaN: none)

The file is written to a temporary name and renamed, so a reader sees a whole file or none; a
seq written already is not written again (a redelivery). Beyond the disk cap a chunk is
refused whole, never written half-way.
"""

from __future__ import annotations

import binascii
import io
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np

from runtime import protocol
from runtime.protocol import MessageRejected, storable_text
from toolchain.errors import UsageError
from toolchain.fleet.store import StoreError

try:  # the listener's fast parser (runtime.protocol uses it too)
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the installation
    _orjson = None

CAPTURE_FORMAT = 1
MAX_SAMPLES = 4096  # per message
MAX_LATE_LABELS = 10_000  # per message
MAX_ID_CHARS = 64
MAX_LABEL = 65_535
MAX_SAMPLE_DIMS = 4  # (C, H, W) and one more at most
DEFAULT_MAX_MB = 1024


class CaptureRejected(MessageRejected):
    """A capture message that is not stored; knows its (device, seq) once the envelope
    passed, so that the device is acknowledged (its spool would resend it forever)."""

    def __init__(self, reason: str, device_id: str | None = None,
                 seq: int | None = None) -> None:
        super().__init__(reason)
        self.device_id, self.seq = device_id, seq


class Capture(NamedTuple):
    """A capture message's body, checked."""
    x: np.ndarray
    inference_ids: list[str]
    predictions: list[int]
    confidence: list[float]
    labels: list[int]  # -1: none yet
    late_ids: list[str]
    late_labels: list[int]


def default_data_dir(store_url: str) -> Path | None:
    """`sqlite:///path/fleet.db` (or a plain path) -> `path/fleet.data`; None for a store
    with no file of its own (PostgreSQL), which needs --data-dir."""
    parts = urlsplit(store_url)
    if parts.scheme == "sqlite" and store_url.startswith("sqlite:///"):
        path = Path(store_url[len("sqlite:///"):])
    elif not parts.scheme:
        path = Path(store_url)
    else:
        return None
    return path.parent / f"{path.stem}.data"


def capture_path(data_dir: Path, device_id: str, seq: int) -> Path:
    """Where a device's capture message `seq` is kept. A device id never holds '/' and
    never starts with '.' (protocol.DEVICE_ID), so the path stays inside the data dir."""
    return data_dir / device_id / f"{seq:020d}.npz"


def _show(value: Any) -> str:
    """A sender's value for a one-line error: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: Any, what: str, cap: int) -> str:
    if type(value) is not str or not 0 < len(value) <= cap or not storable_text(value):
        raise MessageRejected(f"{what} {_show(value)} is not text of 1 to {cap} "
                              f"characters")
    return value


def _label(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_LABEL:
        raise MessageRejected(f"{what} {_show(value)} is not a class index in "
                              f"0..{MAX_LABEL}")
    return value


def _list(body: dict[str, Any], key: str, n: int) -> list[Any]:
    value = body.get(key)
    if type(value) is not list or len(value) != n:
        got = f"a list of {len(value)}" if type(value) is list else _show(value)
        raise MessageRejected(f"body.{key} is {got}, expected a list of {n} (shape[0])")
    return value


def check_capture(body: Any) -> Capture:
    """A capture message's body -> its samples and records, or MessageRejected naming the
    first problem. Fields beyond these are ignored (a newer device may send more)."""
    if type(body) is not dict:
        raise MessageRejected("body is not a JSON object")
    if body.get("format") != CAPTURE_FORMAT or type(body.get("format")) is not int:
        raise MessageRejected(f"body.format {_show(body.get('format'))}: this "
                              f"listener reads capture format {CAPTURE_FORMAT}")
    if body.get("dtype") != "float32":
        raise MessageRejected(f"body.dtype {_show(body.get('dtype'))}: only float32 "
                              f"samples are taken")
    shape = body.get("shape")
    if (type(shape) is not list or not 1 <= len(shape) <= MAX_SAMPLE_DIMS + 1
            or not all(type(d) is int for d in shape)):
        raise MessageRejected(f"body.shape {_show(shape)} is not a list of 1 to "
                              f"{MAX_SAMPLE_DIMS + 1} whole numbers [n, *sample shape]")
    n = shape[0]
    if not 0 <= n <= MAX_SAMPLES:
        raise MessageRejected(f"body.shape says {n} samples; 0 to {MAX_SAMPLES} per message")
    if (n and len(shape) < 2) or not all(1 <= d <= protocol.MAX_PAYLOAD_BYTES
                                         for d in shape[1:]):
        raise MessageRejected(f"body.shape {_show(shape)}: a sample needs dimensions of "
                              f"at least 1")
    data = body.get("data")
    if type(data) is not str or len(data) > protocol.MAX_PAYLOAD_BYTES:
        raise MessageRejected(f"body.data {_show(data)} is not base64 text")
    try:  # strict: only the alphabet and correct padding (in C, unlike b64decode's check)
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageRejected(f"body.data is not valid base64 ({exc})") from None
    want = math.prod(shape) * 4 if n else 0
    if len(raw) != want:
        raise MessageRejected(f"body.data holds {len(raw)} bytes; shape {shape} of float32 "
                              f"needs {want}")
    x = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    if n and not np.isfinite(x).all():
        raise MessageRejected("body.data holds NaN or infinite values")
    ids = [_text(v, f"body.inference_ids[{i}]", MAX_ID_CHARS)
           for i, v in enumerate(_list(body, "inference_ids", n))]
    if len(set(ids)) != n:
        raise MessageRejected("body.inference_ids repeats an id")
    predictions = [_label(v, f"body.predictions[{i}]")
                   for i, v in enumerate(_list(body, "predictions", n))]
    confidence = []
    for i, v in enumerate(_list(body, "confidence", n)):
        if type(v) not in (int, float) or not 0.0 <= v <= 1.0:
            raise MessageRejected(f"body.confidence[{i}] {_show(v)} is not a number "
                                  f"in 0..1")
        confidence.append(float(v))
    labels = [-1 if v is None else _label(v, f"body.labels[{i}]")
              for i, v in enumerate(_list(body, "labels", n))]
    late = body.get("late_labels", [])
    if type(late) is not list or len(late) > MAX_LATE_LABELS:
        got = f"a list of {len(late)}" if type(late) is list else _show(late)
        raise MessageRejected(f"body.late_labels is {got}, expected a list of at most "
                              f"{MAX_LATE_LABELS} [inference_id, label] pairs")
    late_ids, late_labels = [], []
    for i, pair in enumerate(late):
        if type(pair) is not list or len(pair) != 2:
            raise MessageRejected(f"body.late_labels[{i}] {_show(pair)} is not an "
                                  f"[inference_id, label] pair")
        late_ids.append(_text(pair[0], f"body.late_labels[{i}][0]", MAX_ID_CHARS))
        late_labels.append(_label(pair[1], f"body.late_labels[{i}][1]"))
    return Capture(x, ids, predictions, confidence, labels, late_ids, late_labels)


def _parse(topic: str, payload: bytes) -> dict[str, Any]:
    """The whole message: orjson when installed (strict JSON in C: no NaN, no lone
    surrogate; check_capture checks the type of every value it reads), else the exact
    parser, which also words a refusal."""
    if _orjson is not None:
        try:
            msg = _orjson.loads(payload)
        except ValueError:
            msg = None
        if isinstance(msg, dict):
            return msg
    return protocol.parse_payload(topic, payload)


def npz_bytes(capture: Capture, device_id: str, fields: dict[str, Any]) -> bytes:
    """The file a capture message is kept as (see the module's docstring)."""
    wall = fields.get("time.wall")
    arrays = {
        "x": capture.x,
        "inference_ids": np.asarray(capture.inference_ids, dtype=f"<U{MAX_ID_CHARS}"),
        "predictions": np.asarray(capture.predictions, dtype=np.int64),
        "confidence": np.asarray(capture.confidence, dtype=np.float64),
        "labels": np.asarray(capture.labels, dtype=np.int64),
        "late_ids": np.asarray(capture.late_ids, dtype=f"<U{MAX_ID_CHARS}"),
        "late_labels": np.asarray(capture.late_labels, dtype=np.int64),
        "device_id": np.asarray(device_id),
        "bundle_sha256": np.asarray(fields.get("bundle.sha256") or ""),
        "model": np.asarray(fields.get("bundle.model") or ""),
        "version": np.asarray(fields.get("bundle.version") or ""),
        "wall_time": np.asarray(math.nan if wall is None else float(wall)),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class CaptureStore:
    """The listener's side: check, write, describe. `max_bytes` caps the .npz bytes under
    `root`; what is there already is counted once at start (another listener writing to
    the same folder is counted when this one restarts)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"data dir {self.root}: cannot be created ({exc})") from exc
        self.used = sum(p.stat().st_size for p in self.root.glob("*/*.npz"))
        self._lock = threading.Lock()
        self.stats = {"captures": 0, "capture_samples": 0, "capture_bytes": 0,
                      "captures_over_cap": 0}

    def take(self, topic: str, payload: bytes, envelope: dict[str, Any],
             fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """A capture message whose envelope validate_fields passed -> (the envelope, the
        descriptor text the messages row holds), its file written (unless it is there
        already). Raises CaptureRejected: the message goes to the dead letters."""
        device, seq = envelope["device_id"], envelope["seq"]
        try:
            capture = check_capture(_parse(topic, payload).get("body"))
        except MessageRejected as exc:
            raise CaptureRejected(f"{topic}: capture seq {seq}: {exc}", device, seq) from None
        path = capture_path(self.root, device, seq)
        size = path.stat().st_size if path.exists() else self._write(topic, path, capture,
                                                                      device, seq, fields)
        descriptor = {
            "schema": envelope["schema"], "kind": envelope["kind"], "device_id": device,
            "seq": seq,
            "bundle": {k: fields.get(f"bundle.{k}") for k in ("sha256", "model", "version")},
            "time": {"wall": fields.get("time.wall")},
            "body": {"file": f"{device}/{path.name}", "bytes": size,
                     "samples": len(capture.inference_ids),
                     "sample_shape": list(capture.x.shape[1:]),
                     "labelled": sum(v >= 0 for v in capture.labels),
                     "late_labels": len(capture.late_ids)}}
        return envelope, json.dumps(descriptor, separators=(",", ":"))

    def _write(self, topic: str, path: Path, capture: Capture, device: str, seq: int,
               fields: dict[str, Any]) -> int:
        data = npz_bytes(capture, device, fields)
        with self._lock:
            if self.used + len(data) > self.max_bytes:
                self.stats["captures_over_cap"] += 1
                raise CaptureRejected(
                    f"{topic}: capture seq {seq} not written: the data dir {self.root} holds "
                    f"{self.used / 2**20:.1f} MiB, and {len(data)} more bytes would pass its "
                    f"{self.max_bytes / 2**20:.0f} MiB cap (--data-max-mb)", device, seq)
            self.used += len(data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            # Not synced: the rename makes it whole or absent for a reader and survives the
            # listener dying, as the store's commits do (SQLite synchronous=NORMAL); an fsync
            # would cost the listener's thread ~6 ms a message. A power loss can lose both.
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            with self._lock:
                self.used -= len(data)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the folder itself is what failed
            # the listener's disk, not the message: not acknowledged, the broker redelivers
            raise CaptureWriteError(f"data dir {self.root}: cannot write {path.name} "
                                    f"({exc})") from exc
        self.stats["captures"] += 1
        self.stats["capture_samples"] += len(capture.inference_ids)
        self.stats["capture_bytes"] += len(data)
        return len(data)


class CaptureWriteError(StoreError):
    """The data dir refused a write: the listener's fault, never the message's (the batch
    is not acknowledged, and the broker hands it back)."""
