"""One telemetry window: what the runtime saw between two reports.

The per-inference path (`record`) stores a latency, a class id and a confidence into
arrays allocated when the window opens, and copies an input only now and then: every
`stride`-th inference's input is kept, and whenever INPUT_SAMPLES inputs are held every
other one is dropped and the stride doubles. A window so keeps between INPUT_SAMPLES / 2 and
INPUT_SAMPLES inputs spread evenly over it, whatever its length, and copies about
INPUT_SAMPLES * (1 + log2(n / INPUT_SAMPLES) / 2) inputs for n inferences instead of all
of them. A window that expects n inferences (the one before it saw n) starts at the stride
n / INPUT_SAMPLES and copies INPUT_SAMPLES of them. Percentiles, histograms and drift tests
are computed once, vectorised, when the window closes; what they need of the bundle's
reference distributions (arrays, the confidence's quantile bins) is worked out once per
reference, not per window.

The input statistics and the input drift tests read the kept inputs: the value histogram
pools their values and stands for the whole window (it is weighed by the window's
inference count, as when every input was kept), and the KS test on per-input channel means
compares the kept inputs' means (at most INPUT_SAMPLES) with the reference's. The body
says how many were kept (`input.samples`) and at which stride (`input.sample_stride`).
Class and confidence statistics use every inference.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime import drift

# Each kept input keeps at most this many values per channel (a fixed stride) for the
# window's input statistics: a histogram's shape and a mean do not need every pixel.
VALUES_PER_CHANNEL = 1024
# The most inputs a window holds (see the module's docstring).
INPUT_SAMPLES = 64
# The value statistics and the input histogram pool at most this many values per channel
# (every k-th of the kept inputs' values): enough for a 32-bin histogram's shape.
POOLED_VALUES = 16384
# Below this many inferences a window's drift statistics are mostly noise: not reported.
MIN_DRIFT_SAMPLES = 30
# Per-inference arrays are allocated for the window's length up to this many entries and
# grow (doubling) beyond it: a window of a million inferences does not allocate up front.
MAX_PREALLOCATED = 1 << 16


def process_rss_mb() -> float:
    try:  # os-level calls: a buffered text file costs ten times more, once per window
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            pages = int(os.read(fd, 256).split()[1])
        finally:
            os.close(fd)
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def process_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Window:
    # attributes in slots: the per-inference path reads a dozen of them
    __slots__ = ("reference", "_ref", "start_wall", "start_mono", "start_cpu", "n_ok", "errors",
                 "error_kinds", "n_classes", "capacity", "_latency", "_ids", "_conf", "_size",
                 "_x", "_row_size", "_channels", "_value_stride", "_kept", "_stride",
                 "_next_keep", "_view")

    def __init__(self, reference: dict[str, Any] | None, n_classes: int,
                 capacity: int = 1000, expected: int | None = None,
                 view: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """`capacity`: the window's length in inferences (a telemetry window closes there):
        what the per-inference arrays are sized for, and what `record` reports reaching.
        `expected`: how many inferences it will likely see (the previous window's count):
        the input sample then starts at the stride that keeps INPUT_SAMPLES of them, instead
        of copying more early on and dropping half of them at each doubling.
        `view`: raw inputs (n, ...) -> what the input statistics read, (n, channels, values)
        (an audio bundle's log-mel features): applied to the kept inputs only."""
        self.reference = reference or {}
        self._ref = _prepared(self.reference)
        self.start_wall = time.time()
        self.start_mono = time.monotonic()
        self.start_cpu = process_cpu_s()
        self.n_ok = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.n_classes = n_classes
        self.capacity = max(1, int(capacity))
        size = min(self.capacity, MAX_PREALLOCATED)
        self._latency = np.empty(size, dtype=np.float64)  # seconds, per inference
        self._ids = np.empty(size, dtype=np.int64)
        self._conf = np.empty(size, dtype=np.float64)
        self._size = size
        # the kept inputs, (INPUT_SAMPLES, channels, values kept per channel): allocated by
        # the first input, which fixes the shape
        self._x: np.ndarray | None = None
        self._row_size = 0
        self._channels = 1
        self._value_stride = 1
        self._kept = 0
        self._stride = max(1, -(-min(expected or 1, self.capacity) // INPUT_SAMPLES))
        self._next_keep = 0  # the index of the next inference whose input is kept
        self._view = view

    @property
    def count(self) -> int:
        return self.n_ok + self.errors

    def record(self, x: np.ndarray, ids: np.ndarray, confidence: np.ndarray,
               latency_s: float) -> bool:
        """A successful inference on a raw batch x (N, C, ...); True when the window has
        reached its capacity."""
        i = self.n_ok
        n = len(ids)
        end = i + n
        if end > self._size:
            self._grow(end)
        if n == 1:  # batch 1: three stores
            self._latency[i] = latency_s
            self._ids[i] = ids.item()
            self._conf[i] = confidence.item()
        else:
            self._latency[i:end] = latency_s / n
            self._ids[i:end] = ids
            self._conf[i:end] = confidence
        self.n_ok = end
        if end > self._next_keep:
            self._keep(x, i, end)
        return end + self.errors >= self.capacity

    def _grow(self, needed: int) -> None:
        self._size = max(needed, 2 * self._size)
        for name in ("_latency", "_ids", "_conf"):
            old = getattr(self, name)
            new = np.empty(self._size, dtype=old.dtype)
            new[:self.n_ok] = old[:self.n_ok]
            setattr(self, name, new)

    def _keep(self, x: np.ndarray, start: int, end: int) -> None:
        """Copy the inputs of the inferences start..end-1 that fall on the stride."""
        view = self._view
        if self._x is None:
            first = x if view is None else view(x[self._next_keep - start][None])
            self._channels = first.shape[1] if first.ndim >= 2 else 1
            self._row_size = first[0].size
            values = max(self._row_size // self._channels, 1)
            self._value_stride = -(-values // VALUES_PER_CHANNEL)
            kept = -(-values // self._value_stride)
            self._x = np.empty((INPUT_SAMPLES, self._channels, kept), dtype=np.float32)
        if view is None and x[0].size != self._row_size:  # not this window's model: cannot
            return  # happen via Device
        while self._next_keep < end:
            if self._kept == INPUT_SAMPLES:
                half = INPUT_SAMPLES // 2
                self._x[:half] = self._x[0::2]
                self._kept, self._stride = half, 2 * self._stride
                continue  # the next index to keep is unchanged: kept * stride
            row = x[self._next_keep - start]
            if view is not None:  # computed for the kept inputs only
                row = view(row[None])[0]
            row = row.reshape(self._channels, -1)
            self._x[self._kept] = row[:, ::self._value_stride]
            self._kept += 1
            self._next_keep += self._stride

    def record_error(self, kind: str) -> bool:
        """A failed inference; True when the window has reached its capacity."""
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        return self.n_ok + self.errors >= self.capacity

    def close(self) -> dict[str, Any]:
        """The window's telemetry body."""
        end_wall, end_mono = time.time(), time.monotonic()
        duration = max(end_mono - self.start_mono, 1e-9)
        body: dict[str, Any] = {
            "window": {"start_wall": self.start_wall, "end_wall": end_wall,
                       "start_mono": self.start_mono, "end_mono": end_mono,
                       "duration_s": round(duration, 6)},
            "count": self.count,
            "errors": self.errors,
            "error_rate": self.errors / self.count if self.count else 0.0,
            "error_kinds": self.error_kinds,
            "throughput_per_s": round(self.count / duration, 3),
            "latency_ms": _percentiles(self._latency[:self.n_ok]),
            "process": {"rss_mb": round(process_rss_mb(), 2),
                        "cpu_percent": round(100.0 * (process_cpu_s() - self.start_cpu)
                                             / duration, 2)},
        }
        if not self.n_ok or self._x is None or not self._kept:
            return body
        ids = self._ids[:self.n_ok]
        conf = self._conf[:self.n_ok]
        x = self._x[:self._kept]  # (inputs kept, C, values kept per channel)
        # every kept input's channel means (the KS test's samples); ufuncs' own reductions,
        # without the Python layers of ndarray.mean/min/max
        means = np.add.reduce(x, axis=2) / np.float32(x.shape[2])
        # value statistics and the histogram from at most POOLED_VALUES values per channel
        step = -(-(x.shape[0] * x.shape[2]) // POOLED_VALUES)  # rounded up: 1 when few
        pool = x[:, :, ::step]
        body["input"] = {"per_channel": [
            {"mean": round(float(m), 6), "std": round(float(s), 6),
             "min": float(lo), "max": float(hi)}
            for m, s, lo, hi in zip(means.mean(axis=0), pool.std(axis=(0, 2)),
                                    np.minimum.reduce(x, axis=(0, 2)),
                                    np.maximum.reduce(x, axis=(0, 2)), strict=True)],
            "samples": self._kept, "sample_stride": self._stride}
        classes = max(self.n_classes, 1)
        class_counts = np.bincount(ids, minlength=classes)[:classes]
        conf_props = self._ref.confidence_proportions
        conf_counts = _unit_histogram(conf, len(conf_props) if conf_props is not None else 20)
        body["output"] = {
            "class_counts": class_counts.tolist(),
            "confidence_hist": conf_counts.tolist(),
            "confidence_mean": round(float(conf.mean()), 6),
        }
        body["drift"] = self._drift(pool, means, class_counts, conf, conf_counts)
        return body

    def _drift(self, x: np.ndarray, means: np.ndarray, class_counts: np.ndarray,
               conf: np.ndarray, conf_counts: np.ndarray) -> dict[str, Any]:
        ref = self._ref
        if not self.reference:
            return {"available": False, "reason": "the bundle has no reference distributions"}
        if len(conf) < MIN_DRIFT_SAMPLES:
            return {"available": False, "reason": f"{len(conf)} inferences in this window, "
                                                  f"drift needs {MIN_DRIFT_SAMPLES}"}
        out: dict[str, Any] = {"available": True}
        if ref.histogram_edges is not None:
            edges = ref.histogram_edges
            bins = len(edges) - 1
            # bin index of each pooled value, in float32 in one scratch array
            pos = np.subtract(x, np.float32(edges[0])).ravel()
            pos *= np.float32(bins / (edges[-1] - edges[0]))
            np.minimum(pos, bins - 1, out=pos)  # out of range: the end bins, as before
            np.maximum(pos, 0, out=pos)
            counts = np.bincount(pos.astype(np.intp), minlength=bins)
            # The value histogram pools every value of a sample: weigh it by samples.
            per_sample = counts * (len(conf) / max(counts.sum(), 1))
            out["input_psi"] = round(drift.psi(ref.histogram_proportions, per_sample,
                                               ref.count), 6)
        if ref.class_proportions is not None and \
                len(ref.class_proportions) == len(class_counts):
            out["class_psi"] = round(drift.psi(ref.class_proportions, class_counts,
                                               ref.count), 6)
        if ref.confidence_bins is not None:
            out["confidence_psi"] = round(drift.psi_binned(ref.confidence_bins, conf), 6)
        elif ref.confidence_proportions is not None:
            out["confidence_psi"] = round(drift.psi(ref.confidence_proportions, conf_counts,
                                                    ref.count), 6)
        if ref.channel_means:
            tests = [drift.ks_2samp(means[:, c], ref.channel_means[c])
                     for c in range(min(means.shape[1], len(ref.channel_means)))]
            out["input_ks"] = [{"statistic": round(d, 6), "p_value": p} for d, p in tests]
            out["input_ks_min_p"] = min(p for _, p in tests)
        if ref.confidence_samples is not None:
            d, p = drift.ks_2samp(conf, ref.confidence_samples)
            out["confidence_ks"] = {"statistic": round(d, 6), "p_value": p}
        # The score rules default to: input values and predicted classes. Confidence PSI is
        # reported but left out: confidences pile up near 1.0, and on windows of a few
        # hundred inferences its PSI wanders up to ~0.3 with nothing shifted.
        psis = [out[k] for k in ("input_psi", "class_psi") if k in out]
        out["score"] = round(max(psis), 6) if psis else None
        return out


@dataclass(frozen=True)
class _Reference:
    """What the drift statistics read of a bundle's reference distributions, as arrays."""

    count: int | None
    histogram_edges: np.ndarray | None
    histogram_proportions: np.ndarray | None
    class_proportions: np.ndarray | None
    confidence_proportions: np.ndarray | None
    confidence_samples: np.ndarray | None
    confidence_bins: tuple[np.ndarray, np.ndarray, int] | None
    channel_means: list[np.ndarray]


def _array(values: Any) -> np.ndarray | None:
    """A list from the reference's JSON as an array; None where it is missing or empty."""
    return None if values is None or not len(values) else np.asarray(values, dtype=np.float64)


def _read_reference(ref: dict[str, Any]) -> _Reference:
    hist = ref.get("input", {}).get("histogram") or {}
    output = ref.get("output", {})
    samples = ref.get("samples") or {}
    confidence = _array(samples.get("confidence"))
    return _Reference(
        count=ref.get("count"),
        histogram_edges=_array(hist.get("edges")),
        histogram_proportions=_array(hist.get("proportions")),
        class_proportions=_array(output.get("predicted_class", {}).get("proportions")),
        confidence_proportions=_array(output.get("confidence", {}).get("proportions")),
        confidence_samples=confidence,
        confidence_bins=drift.quantile_bins(confidence) if confidence is not None else None,
        channel_means=[np.asarray(m, dtype=np.float64)
                       for m in samples.get("input_channel_means") or []])


_last_reference: tuple[dict[str, Any], _Reference] | None = None


def _prepared(reference: dict[str, Any]) -> _Reference:
    """The reference's arrays, worked out once for the windows of one bundle (the last
    reference seen is remembered: a window opens for the same one every time)."""
    global _last_reference
    last = _last_reference
    if last is not None and last[0] is reference:
        return last[1]
    prepared = _read_reference(reference)
    _last_reference = (reference, prepared)
    return prepared


def _percentiles(lat_s: np.ndarray) -> dict[str, float | None]:
    """p50, p95, p99 (np.percentile's linear method), mean and max of latencies in seconds,
    in ms: one partition around the ranks needed, not a sort or np.percentile's layers."""
    n = len(lat_s)
    if not n:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    ranks = [(n - 1) * q for q in (0.50, 0.95, 0.99)]
    kth = sorted({k for r in ranks for k in (int(r), min(int(r) + 1, n - 1))} | {n - 1})
    part = np.partition(lat_s, kth)
    ms = [1000.0 * (float(part[int(r)]) + (float(part[min(int(r) + 1, n - 1)])
                                           - float(part[int(r)])) * (r - int(r)))
          for r in ranks]
    return {"p50": round(ms[0], 4), "p95": round(ms[1], 4), "p99": round(ms[2], 4),
            "mean": round(1000.0 * float(np.add.reduce(lat_s)) / n, 4),
            "max": round(1000.0 * float(part[n - 1]), 4)}


def _unit_histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """np.histogram(values, bins, range=(0, 1)) for values in [0, 1] (1.0 in the last bin),
    as one bincount."""
    idx = (values * bins).astype(np.intp)
    np.minimum(idx, bins - 1, out=idx)
    np.maximum(idx, 0, out=idx)
    return np.bincount(idx, minlength=bins)
