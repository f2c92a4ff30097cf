"""Latency measurement: warm-up, then timed single-sample runs; percentiles, cold start and
the process's peak memory. Used by `edge-runtime bench` and, in a fresh torch-free process,
by the toolchain (`python -m runtime.bench`), so build-time figures are the runtime's own."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from runtime.signing import TrustStore


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB."""
    # VmHWM belongs to this process image; ru_maxrss would carry over the parent's peak
    # across fork+exec (Linux keeps the high-water mark through execve).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def time_runs(run: Any, x: np.ndarray, warmup: int, runs: int,
              min_seconds: float = 0.0, keep_samples: bool = False) -> dict[str, Any]:
    """Time `run(x)`; at least `runs` runs, more until `min_seconds` have passed."""
    for _ in range(warmup):
        run(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000)
    ms = np.asarray(times)
    q25, q75 = np.percentile(ms, [25, 75])
    return {
        "iqr": float(q75 - q25),
        "runs": len(times),
        "warmup": warmup,
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "max": float(ms.max()),
        **({"samples": [round(t, 5) for t in times]} if keep_samples else {}),
    }


def bench_bundle(bundle: Path, threads: int | None, warmup: int, runs: int,
                 trust: TrustStore | Path | str | None = None) -> dict[str, Any]:
    from runtime.model import load

    t0 = time.perf_counter()
    model = load(bundle, trust=trust, threads=threads, self_test=False)
    try:
        x = np.zeros((1, *model.raw_shape), dtype=np.float32)
        model.predict(x)
        cold_ms = (time.perf_counter() - t0) * 1000
        stats = time_runs(model.predict, x, warmup, runs)
        return {
            "bundle": str(bundle),
            "backend": model.backend,
            "threads": model.threads,
            "batch": 1,
            "latency_ms": stats,
            "cold_start_ms": cold_ms,
            "peak_rss_mb": peak_rss_mb(),
            "source": "measured-host",
        }
    finally:
        model.close()


def bench_model_file(backend: str, model_path: Path, threads: int, input_shape: list[int],
                     warmup: int, runs: int, min_seconds: float,
                     samples: bool = False) -> dict[str, Any]:
    import targets

    t0 = time.perf_counter()
    session = targets.get(backend).open_session(model_path, threads)
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    session.run(x)
    cold_ms = (time.perf_counter() - t0) * 1000
    stats = time_runs(session.run, x, warmup, runs, min_seconds, keep_samples=samples)
    return {"latency_ms": stats, "cold_start_ms": cold_ms, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    """Internal: time one exported model file in this (fresh, torch-free) process; JSON out."""
    parser = argparse.ArgumentParser(prog="python -m runtime.bench")
    parser.add_argument("model", type=Path)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--input-shape", required=True, help="e.g. 1,1,32,32")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--samples", action="store_true", help="include every timing")
    args = parser.parse_args(argv)
    shape = [int(d) for d in args.input_shape.split(",")]
    result = bench_model_file(args.backend, args.model, args.threads, shape, args.warmup,
                              args.runs, args.min_seconds, args.samples)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
