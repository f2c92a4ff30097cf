"""ONNX export: torch.onnx (dynamo) with a dynamic batch dimension, weights stored inline
so one file is the whole model; an ONNX input model is re-saved the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_FILE = "model.onnx"


def export(model: Any, example: Any, out_dir: Path) -> Path:
    """Export a torch module (or copy an ONNX file, given as a Path) to out_dir/model.onnx."""
    import onnx

    target = out_dir / MODEL_FILE
    if isinstance(model, Path):
        proto = onnx.load(str(model))  # pulls in external data files beside it, if any
        onnx.save(proto, str(target), save_as_external_data=False)
        return target
    import torch

    from targets.base import eval_mode

    eval_mode(model)
    batch = torch.export.Dim("batch", min=1, max=65536)
    pair = torch.cat([example[:1], example[:1]])  # a batch of 1 would be specialized to 1
    try:
        torch.onnx.export(
            model, (pair,), str(target), dynamo=True, external_data=False,
            input_names=["input"], output_names=["output"], dynamic_shapes=({0: batch},),
            verbose=False,
        )
    except Exception:  # some graphs cannot take a symbolic batch: export them at batch 1
        torch.onnx.export(
            model, (example[:1],), str(target), dynamo=True, external_data=False,
            input_names=["input"], output_names=["output"], verbose=False,
        )
    onnx.checker.check_model(str(target))
    return target
