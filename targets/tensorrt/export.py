"""TensorRT export: the portable ONNX file (dynamic batch) plus its engine build config; the
engine itself is built on the GPU it will run on (see run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from targets.onnxruntime.export import export as export_onnx
from targets.tensorrt.run import write_config


def export(model: Any, example: Any, out_dir: Path) -> Path:
    path = export_onnx(model, example, out_dir)
    write_config(path, fp16=False, int8=False)
    return path
