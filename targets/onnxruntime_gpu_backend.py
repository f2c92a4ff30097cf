"""ONNX Runtime on an NVIDIA GPU: the same ONNX file as the CPU backend, run with the
TensorRT or CUDA execution provider (onnxruntime-gpu). Unavailable where neither provider is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from targets import onnxruntime_backend
from targets.base import BackendUnavailable

NAME = "onnxruntime-gpu"
EXPORTS_FROM_ONNX = True
MODEL_FILE = onnxruntime_backend.MODEL_FILE
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
model_files = onnxruntime_backend.model_files


def _gpu_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    available = set(ort.get_available_providers())
    return [p for p in GPU_PROVIDERS if p in available]


def run_unavailable_reason() -> str | None:
    if onnxruntime_backend.run_unavailable_reason():
        return onnxruntime_backend.run_unavailable_reason()
    if not _gpu_providers():
        return ("onnxruntime has no CUDA or TensorRT execution provider here "
                "(onnxruntime-gpu on a machine with an NVIDIA GPU)")
    return None


def open_session(model_path: Path, threads: int) -> Any:
    providers = _gpu_providers()
    if not providers:
        raise BackendUnavailable(run_unavailable_reason())
    return onnxruntime_backend.OnnxRuntimeSession(
        model_path, threads, providers=(*providers, "CPUExecutionProvider"))


def export(model: Any, example: Any, out_dir: Path) -> Path:
    return onnxruntime_backend.export(model, example, out_dir)
