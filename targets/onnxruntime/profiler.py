"""Per-layer times from ONNX Runtime's own profiler (its JSON trace of kernel times)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np


def layer_times(model_file: Path, threads: int, x: np.ndarray,
                runs: int) -> tuple[dict[tuple[str, str], float], str]:
    import onnxruntime as ort

    totals: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.intra_op_num_threads = threads
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model_file), options,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(runs):
            session.run(None, {name: x})
        trace = Path(session.end_profiling())
        for event in json.loads(trace.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                key = (event["name"][: -len("_kernel_time")],
                       event.get("args", {}).get("op_name", ""))
                totals[key] = totals.get(key, 0.0) + event["dur"] / 1000
    return totals, "ONNX Runtime profiler"
