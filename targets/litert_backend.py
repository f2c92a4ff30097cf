"""LiteRT (TFLite) backend. Export: litert-torch. Run: ai_edge_litert's Interpreter, or
tflite_runtime's on old devices. Int8 inputs/outputs are (de)quantized here with the
scale and zero point the model carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets.base import (
    BackendUnavailable,
    ExportUnsupported,
    TensorSpec,
    dequantize,
    eval_mode,
    is_quantized,
    quantize,
)

NAME = "litert"
EXPORTS_FROM_ONNX = False  # can `export` take an ONNX file?
MODEL_FILE = "model.tflite"


def _interpreter_class() -> Any:
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


def run_unavailable_reason() -> str | None:
    if _interpreter_class() is None:
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
        interpreter_class = _interpreter_class()
        if interpreter_class is None:
            raise BackendUnavailable(run_unavailable_reason())
        self._interp = interpreter_class(model_path=str(model_path), num_threads=threads)
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


def export(model: Any, example: Any, out_dir: Path) -> Path:
    """Convert a torch module to out_dir/model.tflite (batch 1; the run half loops)."""
    if isinstance(model, Path):
        raise ExportUnsupported(
            "LiteRT export needs a PyTorch model; an ONNX file cannot be converted to LiteRT here"
        )
    import litert_torch

    target = out_dir / MODEL_FILE
    litert_torch.convert(eval_mode(model), (example[:1],)).export(str(target))
    return target


def export_int8(model: Any, example: Any, calibration: Any, out_dir: Path) -> Path:
    """Full-integer int8 (int8 weights, activations, inputs and outputs) through
    litert-torch's PT2E quantizer, calibrated on `calibration` (a tensor of samples).
    Per-channel symmetric weights, static activation ranges."""
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = example[:1]
    quantizer = PT2EQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    )
    graph = torch.export.export(eval_mode(model), (example,)).module()
    graph = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for sample in calibration:
            graph(sample[None])
    graph = convert_pt2e(graph, fold_quantize=False)
    target = out_dir / MODEL_FILE
    litert_torch.convert(graph, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)
                         ).export(str(target))
    return target
