"""LiteRT's run half: ai_edge_litert's Interpreter, or tflite_runtime's on old devices. Int8
inputs and outputs are (de)quantized here with the scale and zero point the model carries.
No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets import fastpath
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
        self._sample_shape = tuple(int(d) for d in in_detail["shape"][1:])
        # numpy views of the interpreter's own input and output tensors, held for the
        # session's life: its tensors are allocated once above and never resized, so the
        # views stay valid. The Python wrapper's invoke() refuses to run while any view is
        # alive (it cannot know that nothing resizes), so the wrapped C++ Invoke is called.
        wrapper = getattr(self._interp, "_interpreter", None)
        self._raw_invoke = getattr(wrapper, "Invoke", None)
        if self._raw_invoke is not None:
            self._in_view = self._interp.tensor(self._in_index)()
            self._out_view = self._interp.tensor(self._out_index)()
        self._table = fastpath.dequantize_table(self.output) \
            if fastpath.eight_bit(self.output) else None

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        """One preprocessed chunk of the model's batch, quantized as targets.base does."""
        if is_quantized(self.input):
            x = quantize(x, self.input)
        if self._raw_invoke is None:
            self._interp.set_tensor(self._in_index, x.astype(self.input.dtype, copy=False))
            self._interp.invoke()
            y = self._interp.get_tensor(self._out_index)
        else:
            self._in_view[...] = x
            self._raw_invoke()
            y = self._out_view
        if self._table is not None:
            return self._table.take(y.view(np.uint8))
        if is_quantized(self.output):
            return dequantize(y, self.output)
        return y.astype(np.float32, copy=True)

    def _check(self, x: np.ndarray) -> None:
        b = self._batch
        if x.ndim != len(self._sample_shape) + 1 or x.shape[1:] != self._sample_shape:
            raise ValueError(f"input of shape {x.shape} does not fit the model's input "
                             f"{(b, *self._sample_shape)}")
        if len(x) % b:
            raise ValueError(f"batch of {len(x)} is not a multiple of the model's batch {b}")

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._check(x)
        b = self._batch
        return np.concatenate([self._invoke(x[i : i + b]) for i in range(0, len(x), b)])

    def runner(self, mean: np.ndarray, std: np.ndarray) -> fastpath.Runner | None:
        """The serving path (targets.fastpath): the normalization (x - mean) / std, float32
        arrays shaped (1, C, 1, 1), folded into the input quantization and written into the
        interpreter's input tensor; an 8-bit output dequantized through a table. None where
        this interpreter or model does not allow it."""
        if self._raw_invoke is None:
            return None
        view, out_view = self._in_view, self._out_view
        if self._table is not None:
            take, out_bytes = self._table.take, out_view.view(np.uint8)
        elif out_view.dtype == np.float32:
            take, out_bytes = (lambda y: y.copy()), out_view
        else:
            return None
        if fastpath.eight_bit(self.input):
            prepare = fastpath.quantizing_stage(mean, std, self.input, view)
        elif view.dtype == np.float32:
            prepare = fastpath.float_stage(mean, std, view)
        else:
            return None
        invoke, shape, check, batch = self._raw_invoke, view.shape, self._check, self._batch

        def run(x: np.ndarray) -> np.ndarray:
            if x.shape == shape:  # one call of the model's batch: the serving path
                prepare(x)
                invoke()
                return take(out_bytes)  # a new array: the next call cannot touch it
            check(x)
            if not np.isfinite(x).all():  # the whole batch's count in the message
                raise fastpath.nonfinite_error(x)
            outs = []
            for i in range(0, len(x), batch):
                prepare(x[i : i + batch])
                invoke()
                outs.append(take(out_bytes))
            return np.concatenate(outs)

        return run


def open_session(model_path: Path, threads: int) -> LiteRTSession:
    return LiteRTSession(model_path, threads)
