"""TensorRT precision: a builder flag in the config beside the ONNX file. fp16 always (the
builder picks per layer); int8 comes from QDQ nodes made by ONNX Runtime's quantizer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from targets.base import QuantizeJob
from targets.onnxruntime import quantize as onnx_quantize
from targets.tensorrt.run import write_config


def quantize(job: QuantizeJob) -> Path:
    if job.precision == "int8":
        path = onnx_quantize.int8(job.fp32_path, job.calibration, job.out_dir,
                                  job.float_layers)
    else:
        path = job.out_dir / "model.onnx"
        shutil.copy(job.fp32_path, path)
    write_config(path, fp16=True, int8=job.precision == "int8")
    return path


def float_units(module: Any, fp32_path: Path) -> list[str]:
    return onnx_quantize.quantizable_nodes(fp32_path)
