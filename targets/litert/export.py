"""LiteRT export: litert-torch converts a torch module to a .tflite flatbuffer at batch 1
(the run half loops over a batch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from targets.base import ExportUnsupported, eval_mode

MODEL_FILE = "model.tflite"


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
