"""OpenVINO export: openvino.convert_model from the torch module (through torch.export) or
the ONNX file, with a dynamic batch dimension, saved as IR (model.xml + model.bin) without
fp16 compression."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_FILE = "model.xml"


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
