"""Training data from the fleet: the samples the devices captured (toolchain.fleet.
capture_store), joined with the labels their applications reported, written as one `.npz`
that `toolchain build --data` takes.

    x              float32 (N, C, H, W): raw inputs, as the build's --data wants them
    y              int64 (N,): the feedback label (a late label wins over one shipped with
                   the sample); without labelled_only an unlabelled sample takes the served
                   prediction
    labels         str: the class names (indices: the captures carry no names)
    label_source   uint8 (N,): 0 feedback, 1 the served prediction
    device_id, inference_id   str (N,)

Late labels are joined by (device, inference id), the latest message's winning; a late label
counts wherever its capture message was received, so a label shipped after a reload still
finds its sample.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.build.data_files import MAX_DATA_BYTES
from toolchain.errors import ToolchainError, UsageError
from toolchain.fleet.capture_store import MAX_ID_CHARS, capture_path
from toolchain.fleet.store import Store

FROM_FEEDBACK, FROM_PREDICTION = 0, 1
PROGRESS_EVERY_S = 1.0


@dataclass(frozen=True)
class ExportOptions:
    data_dir: Path
    since_s: float | None = None  # received within this many seconds; None: all
    model: str | None = None
    version: str | None = None
    labelled_only: bool = False


@dataclass
class ExportResult:
    path: Path
    samples: int = 0
    from_feedback: int = 0
    from_prediction: int = 0
    devices: int = 0
    chunks: int = 0  # capture messages read
    sample_shape: tuple[int, ...] = ()
    unreadable: list[str] = field(default_factory=list)  # files missing or broken, skipped

    def describe(self) -> str:
        shape = "x".join(map(str, self.sample_shape))
        text = (f"{self.samples} samples of {shape} from {self.devices} device(s) "
                f"({self.from_feedback} labelled by feedback, {self.from_prediction} by the "
                f"served prediction) out of {self.chunks} capture messages")
        if self.unreadable:
            text += (f"; {len(self.unreadable)} file(s) missing or unreadable, skipped "
                     f"(first: {self.unreadable[0]})")
        return text


@dataclass
class _Chunk:
    device: str
    x: np.ndarray
    ids: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray


def _read(path: Path) -> tuple[_Chunk | None, list[tuple[str, int]]]:
    """A capture file -> (its samples, or None when it holds none; its late labels).
    Raises ValueError (and the I/O errors) for a file that is not one."""
    with np.load(path, allow_pickle=False) as f:
        x, ids = f["x"], f["inference_ids"]
        predictions, labels = f["predictions"], f["labels"]
        late = list(zip(f["late_ids"].tolist(), f["late_labels"].tolist(), strict=True))
        device = str(f["device_id"])
    n = len(ids)
    if x.dtype != np.float32 or len(x) != n or len(predictions) != n or len(labels) != n:
        raise ValueError("its arrays do not match a capture's")
    return (_Chunk(device, x, ids, predictions, labels) if n else None), late


def export(store: Store, opts: ExportOptions, out: Path,
           progress: Callable[[str], None] | None = None,
           now: float | None = None) -> ExportResult:
    """Write the captured samples that match `opts` to `out` (atomically: a temporary
    file renamed). Raises UsageError for what the user can change (nothing matches, mixed
    sample shapes, too much data), ToolchainError when nothing at all was captured."""
    if out.suffix.lower() != ".npz":
        raise UsageError(f"--out {out}: give a file name ending in .npz (what build --data "
                         "reads)")
    if not opts.data_dir.is_dir():
        raise UsageError(f"data dir {opts.data_dir} does not exist: give the folder the "
                         "listener keeps captured data in (toolchain listen --data-dir)")
    since = 0.0 if opts.since_s is None else (time.time() if now is None else now) - opts.since_s
    rows = store.capture_rows(since)
    result = ExportResult(out, chunks=len(rows))
    if not rows:
        raise ToolchainError("no captured data in the store" + (
            "" if opts.since_s is None else f" received in the last {opts.since_s:g} s")
            + ": are the devices started with --capture-rate, and the listener with a "
            "data dir?")
    chunks: list[_Chunk] = []
    late: dict[tuple[str, str], int] = {}  # (device, inference id) -> the latest label
    nbytes, last = 0, time.monotonic()
    for i, row in enumerate(rows, 1):  # device then seq order: a later label wins
        path = capture_path(opts.data_dir, row["device_id"], int(row["seq"]))
        try:
            chunk, late_labels = _read(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            result.unreadable.append(f"{path.name} of {row['device_id']}: "
                                     f"{type(exc).__name__}: {str(exc)[:120]}")
            continue
        for inference_id, label in late_labels:
            late[(row["device_id"], inference_id)] = label
        if chunk is not None and (opts.model is None or row["model"] == opts.model) and (
                opts.version is None or row["model_version"] == opts.version):
            nbytes += chunk.x.nbytes
            if nbytes > MAX_DATA_BYTES:
                raise UsageError(f"the captured samples pass {MAX_DATA_BYTES / 2**30:.0f} GiB, "
                                 "what build --data reads at most: narrow the export with "
                                 "--since, --model or --version")
            chunks.append(chunk)
        if progress and (time.monotonic() - last >= PROGRESS_EVERY_S or i == len(rows)):
            last = time.monotonic()
            progress(f"[export] {i}/{len(rows)} capture messages read, "
                     f"{sum(len(c.ids) for c in chunks)} samples")
    return _write(out, chunks, late, opts, result)


def _write(out: Path, chunks: list[_Chunk], late: dict[tuple[str, str], int],
           opts: ExportOptions, result: ExportResult) -> ExportResult:
    shapes: dict[tuple[int, ...], int] = {}
    for c in chunks:
        shapes[c.x.shape[1:]] = shapes.get(c.x.shape[1:], 0) + len(c.ids)
    if len(shapes) > 1:
        listed = ", ".join(f"{'x'.join(map(str, s))} ({n} samples)" for s, n in shapes.items())
        raise UsageError(f"the captured samples have different shapes: {listed}; export one "
                         "model at a time with --model and --version")
    xs, ys, sources, devices, ids = [], [], [], [], []
    for c in chunks:
        labels = np.array([late.get((c.device, i), own) for i, own in
                           zip(c.ids.tolist(), c.labels.tolist(), strict=True)], dtype=np.int64)
        keep = labels >= 0 if opts.labelled_only else np.ones(len(labels), bool)
        source = np.where(labels >= 0, FROM_FEEDBACK, FROM_PREDICTION).astype(np.uint8)
        xs.append(c.x[keep])
        ys.append(np.where(labels >= 0, labels, c.predictions)[keep].astype(np.int64))
        sources.append(source[keep])
        devices += [c.device] * int(keep.sum())
        ids.append(c.ids[keep])
    total = sum(len(y) for y in ys)
    if total == 0:
        what = "labelled " if opts.labelled_only else ""
        filters = [f"{k} {v}" for k, v in (("model", opts.model), ("version", opts.version))
                   if v is not None]
        raise UsageError(f"no {what}captured samples match"
                         + (f" ({', '.join(filters)})" if filters else "")
                         + f" among {result.chunks} capture messages"
                         + ("; labels come from feedback (Device.feedback, POST /v1/feedback)"
                            if opts.labelled_only else ""))
    y = np.concatenate(ys)
    source = np.concatenate(sources)
    arrays: dict[str, Any] = {
        "x": np.concatenate(xs).astype(np.float32, copy=False), "y": y,
        "labels": np.asarray([str(i) for i in range(int(y.max()) + 1)]),
        "label_source": source,
        "device_id": np.asarray(devices),
        "inference_id": np.concatenate(ids).astype(f"<U{MAX_ID_CHARS}"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ToolchainError(f"cannot write {out}: {exc}") from exc
    result.samples = total
    result.from_feedback = int((source == FROM_FEEDBACK).sum())
    result.from_prediction = total - result.from_feedback
    result.devices = len(set(devices))
    result.sample_shape = tuple(arrays["x"].shape[1:])
    return result
