"""OpenVINO quantization: NNCF post-training int8 of the IR (plain, or accuracy-aware with a
maximum drop), fp16 weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets.base import QuantizeJob
from targets.openvino.export import save


def quantize(job: QuantizeJob) -> Path:
    if job.precision == "int8":
        return int8(job.fp32_path, job.calibration, job.out_dir, job.float_layers)
    if job.precision == "fp16":
        return fp16(job.fp32_path, job.out_dir)
    raise ValueError(f"{job.precision} is not a precision OpenVINO quantizes to")


def float_units(module: Any, fp32_path: Path) -> list[str]:
    return quantizable_nodes(fp32_path)


def accuracy_aware(job: QuantizeJob, x_val: np.ndarray, y_val: np.ndarray,
                   max_drop: float) -> Path:
    return int8_accuracy_aware(job.fp32_path, job.calibration, x_val, y_val, max_drop,
                               job.out_dir)


def quantizable_nodes(xml_path: Path) -> list[str]:
    """OpenVINO ops NNCF quantizes the weights of: its units for keeping layers in float."""
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]


def int8(xml_path: Path, calibration: np.ndarray, out_dir: Path,
                  float_layers: tuple[str, ...] = ()) -> Path:
    """NNCF post-training int8 (weights and activations) of an OpenVINO IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    ignored = nncf.IgnoredScope(names=list(float_layers)) if float_layers else None
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration),
                              **({"ignored_scope": ignored} if ignored else {}))
    return save(quantized, out_dir)


def int8_accuracy_aware(xml_path: Path, calibration: np.ndarray, x_val: np.ndarray,
                                 y_val: np.ndarray, max_drop: float, out_dir: Path) -> Path:
    """NNCF accuracy-aware int8: quantize, then return the most sensitive layers to float
    until the validation accuracy drop is at most `max_drop` (absolute, as a fraction)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    calibration_set = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    validation_set = nncf.Dataset([(x_val[i : i + 1], int(y_val[i])) for i in range(len(x_val))],
                                  lambda item: item[0])

    def validate(compiled: Any, items: Any) -> float:
        output = compiled.output(0)
        hits = [int(np.argmax(compiled(x)[output]) == y) for x, y in items]
        return float(np.mean(hits))

    quantized = nncf.quantize_with_accuracy_control(
        model, calibration_set, validation_set, validate, max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration))
    return save(quantized, out_dir)


def fp16(xml_path: Path, out_dir: Path) -> Path:
    import openvino as ov

    return save(ov.Core().read_model(str(xml_path)), out_dir, fp16=True)
