"""Deployment backends, one self-contained plugin per subpackage (ONNX Runtime, LiteRT,
OpenVINO, TensorRT, ONNX Runtime on a GPU, PyTorch AOTInductor) behind the `Backend`
protocol in `targets.base`. `targets.registry` is the only list of them.

Importing this package imports nothing heavy: a backend's libraries (and torch, for its
export half) are imported inside the functions that use them. Nothing outside `targets/`
compares backend names: it asks a backend's declared capabilities instead.
"""

from __future__ import annotations

from targets.base import Backend, BackendUnavailable, Capabilities, ExportUnsupported
from targets.registry import (
    BACKENDS,
    PLANNED_BACKENDS,
    NoBackend,
    choose,
    get,
    known_backends,
    register,
    unregister,
)

__all__ = ["BACKENDS", "PLANNED_BACKENDS", "Backend", "BackendUnavailable", "Capabilities",
           "ExportUnsupported", "NoBackend", "choose", "get", "known_backends", "register",
           "unregister"]
