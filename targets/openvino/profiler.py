"""Per-layer times from OpenVINO's performance counters."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def layer_times(model_file: Path, threads: int, x: np.ndarray,
                runs: int) -> tuple[dict[tuple[str, str], float], str]:
    import openvino as ov

    totals: dict[tuple[str, str], float] = {}
    compiled = ov.Core().compile_model(str(model_file), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True,
        "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    for _ in range(runs):
        request.infer({0: x})
        for info in request.profiling_info:
            key = (info.node_name, info.node_type)
            totals[key] = totals.get(key, 0.0) + info.real_time.total_seconds() * 1000
    return totals, "OpenVINO performance counters"
