"""The registry: the one list of backends. Declarations only: registering a backend imports
its package's `__init__` (a `Backend` and nothing heavy), never its libraries."""

from __future__ import annotations

import importlib

from targets.base import Backend

# The built-in backend packages, in no particular order (profiles say which to prefer).
BUILTIN = (
    "targets.onnxruntime",
    "targets.litert",
    "targets.openvino",
    "targets.tensorrt",
    "targets.onnxruntime_gpu",
    "targets.aoti",
)

BACKENDS: dict[str, Backend] = {}
# Names a profile may list before their backend lands; the build falls back past them.
PLANNED_BACKENDS: set[str] = set()


class NoBackend(RuntimeError):
    """No backend of a preference list can be built here; the message says why for each."""


def register(backend: Backend | str) -> Backend:
    """Add a backend: a Backend, or the path of a module that declares one as `BACKEND`."""
    if isinstance(backend, str):
        backend = importlib.import_module(backend).BACKEND
    if not isinstance(backend, Backend):
        raise TypeError(f"{backend!r} is not a targets.base.Backend")
    BACKENDS[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    BACKENDS.pop(name, None)


def known_backends() -> set[str]:
    """What a profile may name: registered and planned backends."""
    return set(BACKENDS) | PLANNED_BACKENDS


def get(name: str) -> Backend:
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; registered: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def choose(preferences: tuple[str, ...] | list[str], *,
           from_onnx: bool = False) -> tuple[Backend, list[str]]:
    """The first backend in `preferences` that is registered, can be built and run here, and
    can be made from the model (an ONNX file or a PyTorch module). Returns it with the
    skipped ones, each as 'name (why)'; raises NoBackend when none is left."""
    skipped: list[str] = []
    for name in preferences:
        if name not in BACKENDS:
            skipped.append(f"{name} (not implemented yet)")
            continue
        backend = BACKENDS[name]
        if reason := backend.build_unavailable_reason():
            skipped.append(f"{name} ({reason})")
            continue
        if from_onnx and not backend.capabilities.from_onnx:
            skipped.append(f"{name} (it is made from a PyTorch model, not an ONNX file)")
            continue
        return backend, skipped
    raise NoBackend("; ".join(skipped) or "the preference list is empty")


for _path in BUILTIN:
    register(_path)
