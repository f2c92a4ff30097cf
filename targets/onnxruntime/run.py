"""ONNX Runtime's run half: the CPU execution provider. No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets import fastpath
from targets.base import BackendUnavailable, TensorSpec

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}
_CHUNK = 256  # rows per call when evaluating a large batch


def model_files(main: Path) -> list[Path]:
    """Everything the model needs beside it: one self-contained file."""
    return [main]


def unavailable_reason() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'edgepack[onnx]')"
    return None


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_TYPES.get(arg.type, arg.type))


class OnnxRuntimeSession:
    def __init__(self, model_path: Path, threads: int,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(unavailable_reason()) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(model_path), options, providers=list(providers)
        )
        self.providers = self._session.get_providers()
        self.input = _spec(self._session.get_inputs()[0])
        self.output = _spec(self._session.get_outputs()[0])
        self._fixed_batch = self.input.shape[0] if self.input.shape else None

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self._fixed_batch or _CHUNK
        outs = [
            self._session.run([self.output.name], {self.input.name: x[i : i + step]})[0]
            for i in range(0, len(x), step)
        ]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def runner(self, mean: np.ndarray, std: np.ndarray) -> fastpath.Runner | None:
        """The serving path (targets.fastpath): the normalization written into an input
        buffer that an I/O binding hands to the session without a copy, the output bound to
        a preallocated array and copied out (the next call overwrites the buffer). Batches of
        another size take `run`. None where the model's tensors do not allow it."""
        import onnxruntime as ort

        batch = self._fixed_batch or 1
        shape = fastpath.static_shape(self.input.shape, batch)
        out_shape = fastpath.static_shape(self.output.shape, batch)
        if shape is None or out_shape is None or self.input.dtype != "float32" \
                or self.output.dtype != "float32" or self.providers != ["CPUExecutionProvider"]:
            return None  # (a GPU provider would copy the bound host buffers each call)
        buf = np.empty(shape, dtype=np.float32)
        out = np.empty(out_shape, dtype=np.float32)
        binding = self._session.io_binding()
        binding.bind_cpu_input(self.input.name, buf)  # the session reads buf's memory
        binding.bind_ortvalue_output(self.output.name, ort.OrtValue.ortvalue_from_numpy(out))
        prepare = fastpath.float_stage(mean, std, buf)
        invoke, session_run = self._session.run_with_iobinding, self.run

        def run(x: np.ndarray) -> np.ndarray:
            if x.shape == shape:
                prepare(x)
                invoke(binding)
                return out.copy()
            return session_run(fastpath.normalized(x, mean, std))

        return run


def open_session(model_path: Path, threads: int) -> OnnxRuntimeSession:
    return OnnxRuntimeSession(model_path, threads)
