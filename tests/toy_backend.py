"""A toy backend, declared and implemented in this one module, to show what adding a backend
takes: the registry-parametrized suites (parity, batches, torch-free run half, capabilities)
pick it up because `tests/conftest.py` registers it. It runs ONNX files in onnx's pure-numpy
reference evaluator and borrows ONNX Runtime's exporter and graph reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets.base import Backend, BackendUnavailable, Capabilities, TensorSpec

BACKEND = Backend(
    name="toy-reference",
    description="ONNX reference evaluator (numpy; for tests)",
    capabilities=Capabilities(
        precisions=("fp32",), dynamic_batch=True, run_needs_torch=False, from_onnx=True,
        extra="build", layer_profiler=False),
    model_file="model.onnx",
    run_module=__name__,
    export_module="targets.onnxruntime.export",
    graph_module="targets.onnxruntime.graph",
)


def unavailable_reason() -> str | None:
    try:
        import onnx.reference  # noqa: F401
    except ImportError:
        return "the onnx package is not installed"
    return None


def model_files(main: Path) -> list[Path]:
    return [main]


def _spec(value_info: Any) -> TensorSpec:
    dims = value_info.type.tensor_type.shape.dim
    return TensorSpec(value_info.name,
                      tuple(d.dim_value if d.HasField("dim_value") else None for d in dims),
                      "float32")


class ReferenceSession:
    def __init__(self, model_path: Path, threads: int) -> None:
        if reason := unavailable_reason():
            raise BackendUnavailable(reason)
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(str(model_path))
        self._evaluator = ReferenceEvaluator(proto)
        self.input = _spec(proto.graph.input[0])
        self.output = _spec(proto.graph.output[0])

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        (y,) = self._evaluator.run([self.output.name], {self.input.name: x})
        return np.asarray(y, dtype=np.float32)


def open_session(model_path: Path, threads: int) -> ReferenceSession:
    return ReferenceSession(model_path, threads)
