"""One telemetry window: what the runtime saw between two reports. The per-inference path
only appends and adds into preallocated counters; percentiles, drift tests and the rest are
computed once, when the window closes."""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import numpy as np

from runtime import drift

# Each input keeps at most this many values per channel (a fixed stride) for the window's
# input statistics: a histogram's shape and a mean do not need every pixel, and a window of
# 1000 large images must not hold 1000 copies of them.
VALUES_PER_CHANNEL = 1024
# Below this many inferences a window's drift statistics are mostly noise: not reported.
MIN_DRIFT_SAMPLES = 30


def process_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def process_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Window:
    def __init__(self, reference: dict[str, Any] | None, n_classes: int) -> None:
        self.reference = reference or {}
        self.start_wall = time.time()
        self.start_mono = time.monotonic()
        self.start_cpu = process_cpu_s()
        self.n_ok = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.n_classes = n_classes
        # Per inference only references and small copies are kept; statistics are computed
        # once per window, vectorised, in close().
        self._latency: list[tuple[float, int]] = []
        self._ids: list[np.ndarray] = []
        self._conf: list[np.ndarray] = []
        self._x: list[np.ndarray] = []

    @property
    def count(self) -> int:
        return self.n_ok + self.errors

    def record(self, x: np.ndarray, ids: np.ndarray, confidence: np.ndarray,
               latency_s: float) -> None:
        """A successful inference on a raw batch x (N, C, ...)."""
        n = len(ids)
        self.n_ok += n
        self._latency.append((latency_s, n))
        self._ids.append(ids)
        self._conf.append(confidence)
        flat = x.reshape(n, x.shape[1] if x.ndim >= 2 else 1, -1)
        stride = -(-flat.shape[2] // VALUES_PER_CHANNEL)
        self._x.append(np.array(flat[:, :, ::stride], dtype=np.float32))  # a copy

    def record_error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def close(self) -> dict[str, Any]:
        """The window's telemetry body."""
        end_wall, end_mono = time.time(), time.monotonic()
        duration = max(end_mono - self.start_mono, 1e-9)
        lat_ms = np.repeat([t / n * 1000.0 for t, n in self._latency],
                           [n for _, n in self._latency]) if self._latency else np.zeros(0)
        body: dict[str, Any] = {
            "window": {"start_wall": self.start_wall, "end_wall": end_wall,
                       "start_mono": self.start_mono, "end_mono": end_mono,
                       "duration_s": round(duration, 6)},
            "count": self.count,
            "errors": self.errors,
            "error_rate": self.errors / self.count if self.count else 0.0,
            "error_kinds": self.error_kinds,
            "throughput_per_s": round(self.count / duration, 3),
            "latency_ms": _percentiles(lat_ms),
            "process": {"rss_mb": round(process_rss_mb(), 2),
                        "cpu_percent": round(100.0 * (process_cpu_s() - self.start_cpu)
                                             / duration, 2)},
        }
        if not self.n_ok:
            return body
        ids = np.concatenate(self._ids)
        conf = np.concatenate(self._conf).astype(np.float64)
        x = np.concatenate(self._x)  # (N, C, values kept per channel)
        means = x.mean(axis=2)
        body["input"] = {"per_channel": [
            {"mean": round(float(m), 6), "std": round(float(s), 6),
             "min": float(lo), "max": float(hi)}
            for m, s, lo, hi in zip(x.mean(axis=(0, 2)), x.std(axis=(0, 2)),
                                    x.min(axis=(0, 2)), x.max(axis=(0, 2)), strict=True)]}
        class_counts = np.bincount(ids, minlength=max(self.n_classes, 1))[
            :max(self.n_classes, 1)]
        conf_counts = np.histogram(conf, bins=len(self._ref_conf_props() or [0] * 20),
                                   range=(0.0, 1.0))[0]
        body["output"] = {
            "class_counts": class_counts.tolist(),
            "confidence_hist": conf_counts.tolist(),
            "confidence_mean": round(float(conf.mean()), 6),
        }
        body["drift"] = self._drift(x, means, class_counts, conf, conf_counts)
        return body

    def _ref_conf_props(self) -> list[float] | None:
        return self.reference.get("output", {}).get("confidence", {}).get("proportions")

    def _drift(self, x: np.ndarray, means: np.ndarray, class_counts: np.ndarray,
               conf: np.ndarray, conf_counts: np.ndarray) -> dict[str, Any]:
        ref = self.reference
        if not ref:
            return {"available": False, "reason": "the bundle has no reference distributions"}
        if len(conf) < MIN_DRIFT_SAMPLES:
            return {"available": False, "reason": f"{len(conf)} inferences in this window, "
                                                  f"drift needs {MIN_DRIFT_SAMPLES}"}
        out: dict[str, Any] = {"available": True}
        n_ref = ref.get("count")
        hist = ref.get("input", {}).get("histogram")
        if hist:
            edges = np.asarray(hist["edges"], dtype=np.float64)
            bins = len(edges) - 1
            idx = ((x.ravel() - edges[0]) * (bins / (edges[-1] - edges[0]))).astype(np.intp)
            counts = np.bincount(np.clip(idx, 0, bins - 1), minlength=bins)
            # The value histogram pools every value of a sample: weigh it by samples.
            per_sample = counts * (len(conf) / max(counts.sum(), 1))
            out["input_psi"] = round(drift.psi(hist["proportions"], per_sample, n_ref), 6)
        classes = ref.get("output", {}).get("predicted_class", {}).get("proportions")
        if classes and len(classes) == len(class_counts):
            out["class_psi"] = round(drift.psi(classes, class_counts, n_ref), 6)
        samples = ref.get("samples") or {}
        if samples.get("confidence"):
            out["confidence_psi"] = round(drift.psi_quantile(samples["confidence"], conf), 6)
        elif self._ref_conf_props():
            out["confidence_psi"] = round(drift.psi(self._ref_conf_props(), conf_counts,
                                                    n_ref), 6)
        if samples.get("input_channel_means"):
            tests = [drift.ks_2samp(means[:, c], samples["input_channel_means"][c])
                     for c in range(min(means.shape[1], len(samples["input_channel_means"])))]
            out["input_ks"] = [{"statistic": round(d, 6), "p_value": p} for d, p in tests]
            out["input_ks_min_p"] = min(p for _, p in tests)
        if samples.get("confidence"):
            d, p = drift.ks_2samp(conf, samples["confidence"])
            out["confidence_ks"] = {"statistic": round(d, 6), "p_value": p}
        # The score rules default to: input values and predicted classes. Confidence PSI is
        # reported but left out: confidences pile up near 1.0, and on windows of a few
        # hundred inferences its PSI wanders up to ~0.3 with nothing shifted.
        psis = [out[k] for k in ("input_psi", "class_psi") if k in out]
        out["score"] = round(max(psis), 6) if psis else None
        return out


def _percentiles(lat_ms: np.ndarray) -> dict[str, float | None]:
    if not len(lat_ms):
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    p50, p95, p99 = np.percentile(lat_ms, [50, 95, 99])
    return {"p50": round(float(p50), 4), "p95": round(float(p95), 4),
            "p99": round(float(p99), 4), "mean": round(float(lat_ms.mean()), 4),
            "max": round(float(lat_ms.max()), 4)}
