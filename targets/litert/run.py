"""LiteRT's run half: ai_edge_litert's Interpreter, or tflite_runtime's on old devices. Int8
inputs and outputs are (de)quantized here with the scale and zero point the model carries.
No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets.base import (
    BackendUnavailable,
    TensorSpec,
    dequantize,
    is_quantized,
    quantize,
)


def interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # old devices, NumPy 1 only
        except ImportError:
            return None
    return Interpreter


def model_files(main: Path) -> list[Path]:
    """Everything the model needs beside it: one self-contained file."""
    return [main]


def unavailable_reason() -> str | None:
    if interpreter_class() is None:
        return ("neither ai_edge_litert nor tflite_runtime is installed "
                "(pip install 'edgepack[tflite]')")
    return None


def _spec(detail: dict) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"]).name
    quantized = np.dtype(dtype).kind in "iu" and scale
    return TensorSpec(
        detail["name"],
        tuple(int(d) if d >= 0 else None for d in detail.get("shape_signature", detail["shape"])),
        dtype,
        float(scale) if quantized else None,
        int(zero_point) if quantized else None,
    )


class LiteRTSession:
    def __init__(self, model_path: Path, threads: int) -> None:
        interpreter = interpreter_class()
        if interpreter is None:
            raise BackendUnavailable(unavailable_reason())
        self._interp = interpreter(model_path=str(model_path), num_threads=threads)
        self._interp.allocate_tensors()
        in_detail = self._interp.get_input_details()[0]
        out_detail = self._interp.get_output_details()[0]
        self._in_index, self._out_index = in_detail["index"], out_detail["index"]
        self.input, self.output = _spec(in_detail), _spec(out_detail)
        self._batch = int(in_detail["shape"][0])

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        if is_quantized(self.input):
            x = quantize(x, self.input)
        self._interp.set_tensor(self._in_index, x.astype(self.input.dtype, copy=False))
        self._interp.invoke()
        y = self._interp.get_tensor(self._out_index)
        if is_quantized(self.output):
            return dequantize(y, self.output)
        return y.astype(np.float32, copy=True)

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        b = self._batch
        if len(x) % b:
            raise ValueError(f"batch of {len(x)} is not a multiple of the model's batch {b}")
        return np.concatenate([self._invoke(x[i : i + b]) for i in range(0, len(x), b)])


def open_session(model_path: Path, threads: int) -> LiteRTSession:
    return LiteRTSession(model_path, threads)
