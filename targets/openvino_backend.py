"""OpenVINO backend. Export: openvino.convert_model from the torch module (or the ONNX file)
with a dynamic batch dimension, saved as IR (model.xml + model.bin) without fp16 compression.
Run: the OpenVINO runtime on the CPU with the target's thread count, a latency hint, and f32
inference precision (the CPU plugin would otherwise pick bf16 where the CPU has it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets.base import BackendUnavailable, TensorSpec

NAME = "openvino"
EXPORTS_FROM_ONNX = True
MODEL_FILE = "model.xml"
_CHUNK = 256


def run_unavailable_reason() -> str | None:
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
            raise BackendUnavailable(run_unavailable_reason()) from exc
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


def convert(model: Any, example: Any) -> Any:
    """An openvino.Model with a dynamic batch dimension, from a torch module or ONNX file."""
    import openvino as ov

    if isinstance(model, Path):
        ov_model = ov.convert_model(str(model))
        shape = list(ov_model.inputs[0].get_partial_shape())
        ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *shape[1:]])})
        return ov_model
    import torch

    from targets.base import eval_mode

    eval_mode(model)
    # Through torch.export rather than OpenVINO's TorchScript tracing, whose sanity check
    # rejects attention blocks. A batch of 2: a batch of 1 would be specialized to 1.
    pair = torch.cat([example[:1], example[:1]])
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.export.export(model, (pair,), dynamic_shapes=({0: batch},))
        ov_model = ov.convert_model(program)
        ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
        return ov_model
    except Exception:  # a graph that cannot take a symbolic batch: convert it at batch 1
        return ov.convert_model(torch.export.export(model, (example[:1],)))


def save(ov_model: Any, out_dir: Path, fp16: bool = False) -> Path:
    import openvino as ov

    target = out_dir / MODEL_FILE
    ov.save_model(ov_model, str(target), compress_to_fp16=fp16)
    return target


def export(model: Any, example: Any, out_dir: Path) -> Path:
    """Export a torch module (or an ONNX file, given as a Path) to out_dir/model.xml + .bin."""
    return save(convert(model, example), out_dir)
