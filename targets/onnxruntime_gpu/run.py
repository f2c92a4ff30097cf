"""ONNX Runtime on an NVIDIA GPU: the same ONNX file as the CPU backend, run with the TensorRT
or CUDA execution provider (onnxruntime-gpu). Unavailable where neither provider is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from targets.base import BackendUnavailable
from targets.onnxruntime import run as cpu_run

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
model_files = cpu_run.model_files


def _gpu_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    available = set(ort.get_available_providers())
    return [p for p in GPU_PROVIDERS if p in available]


def unavailable_reason() -> str | None:
    if reason := cpu_run.unavailable_reason():
        return reason
    if not _gpu_providers():
        return ("onnxruntime has no CUDA or TensorRT execution provider here "
                "(onnxruntime-gpu on a machine with an NVIDIA GPU)")
    return None


def open_session(model_path: Path, threads: int) -> Any:
    providers = _gpu_providers()
    if not providers:
        raise BackendUnavailable(unavailable_reason())
    return cpu_run.OnnxRuntimeSession(model_path, threads,
                                      providers=(*providers, "CPUExecutionProvider"))
