"""Deployment backends. One module per backend, each with an export half (may import torch,
inside its functions) and a run half (never imports torch). This registry imports nothing
heavy: a backend module is imported only when it is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str
    extra: str  # the pip extra that installs its run half
    description: str


# Backends that exist today. Tests are parametrized over this dict.
BACKENDS: dict[str, BackendInfo] = {
    "onnxruntime": BackendInfo(
        "onnxruntime", "targets.onnxruntime_backend", "onnx", "ONNX Runtime, CPU execution provider"
    ),
    "litert": BackendInfo(
        "litert", "targets.litert_backend", "tflite", "LiteRT (TFLite) with XNNPACK"
    ),
    "openvino": BackendInfo(
        "openvino", "targets.openvino_backend", "openvino", "OpenVINO runtime, CPU plugin"
    ),
    "tensorrt": BackendInfo(
        "tensorrt", "targets.tensorrt_backend", "tensorrt", "TensorRT engine on an NVIDIA GPU"
    ),
    "onnxruntime-gpu": BackendInfo(
        "onnxruntime-gpu", "targets.onnxruntime_gpu_backend", "onnx",
        "ONNX Runtime with the TensorRT or CUDA execution provider"
    ),
    "aoti": BackendInfo(
        "aoti", "targets.aoti_backend", "build", "PyTorch AOTInductor package (needs torch)"
    ),
}

# Names a profile may list before their backend lands; the build falls back past them.
PLANNED_BACKENDS: set[str] = set()
KNOWN_BACKENDS = set(BACKENDS) | PLANNED_BACKENDS


def backend_module(name: str) -> ModuleType:
    """The module of a registered backend (imports only that backend's light run half)."""
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; registered: {', '.join(sorted(BACKENDS))}")
    return importlib.import_module(BACKENDS[name].module)
