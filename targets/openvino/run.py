"""OpenVINO's run half: the CPU plugin with the target's thread count, a latency hint, and
f32 inference precision (the CPU plugin would otherwise pick bf16 where the CPU has it).
No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets.base import BackendUnavailable, TensorSpec

_CHUNK = 256


def unavailable_reason() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'edgepack[openvino]')"
    return None


def model_files(main: Path) -> list[Path]:
    """The IR is two files: the graph (.xml) and the weights (.bin)."""
    return [main, main.with_suffix(".bin")]


def _spec(port: Any) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    names = port.get_names()
    return TensorSpec(sorted(names)[0] if names else "", shape,
                      np.dtype(port.get_element_type().to_dtype()).name)


class OpenVINOSession:
    def __init__(self, model_path: Path, threads: int, precision_hint: str = "f32") -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailable(unavailable_reason()) from exc
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": precision_hint}
        self._compiled = ov.Core().compile_model(str(model_path), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output(0)
        self.input, self.output = _spec(self._compiled.input(0)), _spec(self._output)
        self._fixed_batch = self.input.shape[0] if self.input.shape else None

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self._fixed_batch or _CHUNK
        outs = [np.array(self._request.infer({0: x[i : i + step]})[self._output], copy=True)
                for i in range(0, len(x), step)]
        return np.concatenate(outs).astype(np.float32, copy=False)


def open_session(model_path: Path, threads: int) -> OpenVINOSession:
    return OpenVINOSession(model_path, threads)
