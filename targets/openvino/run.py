"""OpenVINO's run half: the CPU plugin with the target's thread count, a latency hint, and
f32 inference precision (the CPU plugin would otherwise pick bf16 where the CPU has it).
No torch."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from targets import fastpath
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
        self._config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                        "INFERENCE_PRECISION_HINT": precision_hint}
        self._core, self._path = ov.Core(), model_path
        self._compile(self._core.compile_model(str(model_path), "CPU", self._config))

    def _compile(self, compiled: Any) -> None:
        self._compiled = compiled
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output(0)
        self.input, self.output = _spec(self._compiled.input(0)), _spec(self._output)
        self._fixed_batch = self.input.shape[0] if self.input.shape else None

    def _compile_for_batch(self, batch: int) -> None:
        """A dynamic batch costs the CPU plugin about a tenth of a small model's time at batch
        1 (measured: 77 against 67 us): the serving path recompiles the model with its batch
        fixed, and `run` then goes through it that many samples at a time. Left dynamic where
        the model cannot be reshaped."""
        model = self._core.read_model(str(self._path))
        try:
            model.reshape([batch, *self.input.shape[1:]])
            compiled = self._core.compile_model(model, "CPU", self._config)
        except RuntimeError:  # what OpenVINO raises for a graph it cannot reshape
            return
        self._compile(compiled)

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self._fixed_batch or _CHUNK
        outs = [np.array(self._request.infer({0: x[i : i + step]})[self._output], copy=True)
                for i in range(0, len(x), step)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def runner(self, mean: np.ndarray, std: np.ndarray) -> fastpath.Runner | None:
        """The serving path (targets.fastpath): the model compiled for a fixed batch (see
        _compile_for_batch), an infer request of its own whose input and output tensors share
        the memory of two preallocated arrays; the normalization is written into the input,
        the output copied out (the next call overwrites it). Batches of another size take
        `run`. None where the model's tensors do not allow it."""
        import openvino as ov

        batch = self._fixed_batch or 1
        shape = fastpath.static_shape(self.input.shape, batch)
        out_shape = fastpath.static_shape(self.output.shape, batch)
        if shape is None or out_shape is None or self.input.dtype != "float32" \
                or self.output.dtype != "float32":
            return None
        if self._fixed_batch is None:
            self._compile_for_batch(batch)
        buf = np.zeros(shape, dtype=np.float32)  # zeros: _bare_infer runs it once to probe
        out = np.empty(out_shape, dtype=np.float32)
        request = self._compiled.create_infer_request()
        request.set_input_tensor(ov.Tensor(buf, shared_memory=True))
        request.set_output_tensor(ov.Tensor(out, shared_memory=True))
        prepare = fastpath.float_stage(mean, std, buf)
        invoke, session_run = _bare_infer(request), self.run

        def run(x: np.ndarray) -> np.ndarray:
            if x.shape == shape:
                prepare(x)
                invoke()
                return out.copy()
            return session_run(fastpath.normalized(x, mean, std))

        return run


def _bare_infer(request: Any) -> Callable[[], object]:
    """request.infer() without what its Python wrapper adds around the compiled call (input
    dispatch, a dictionary of copied outputs: a few microseconds): the compiled class's own
    infer, with no inputs to set and the outputs left in their tensors. The wrapper's where
    this OpenVINO has no such class."""
    base = type(request).__mro__[1]
    infer = getattr(base, "infer", None)
    if infer is None or base is object:
        return request.infer
    try:
        infer(request, {}, True, False)
    except TypeError:  # another signature in this version
        return request.infer
    return functools.partial(infer, request, {}, True, False)


def open_session(model_path: Path, threads: int) -> OpenVINOSession:
    return OpenVINOSession(model_path, threads)
