"""PyTorch AOTInductor's run half: the model compiled ahead of time into a `.pt2` package of native
kernels (Triton/CUDA on a GPU, C++ on a CPU), loaded by torch's own runtime.

This is the one backend whose run half needs torch (the package is executed by
`torch._inductor.aoti_load_package`); bundles made with it say so in their manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from targets.base import BackendUnavailable, TensorSpec


def model_files(main: Path) -> list[Path]:
    return [main]


def torch_device() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else "cpu"


def unavailable_reason() -> str | None:
    if torch_device() is None:
        return "torch is not installed (an AOTInductor package runs in torch's runtime)"
    return None


def build_unavailable_reason() -> str | None:
    """A build picks AOTInductor only where there is a GPU to compile for: on a CPU the
    other backends of a profile serve better."""
    if reason := unavailable_reason():
        return reason
    if torch_device() != "cuda":
        return "no CUDA GPU here (the AOTInductor package is compiled for the GPU)"
    return None


class AOTISession:
    def __init__(self, model_path: Path, threads: int) -> None:
        if reason := unavailable_reason():
            raise BackendUnavailable(reason)
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        self._runner = torch._inductor.aoti_load_package(str(model_path))
        meta = self._runner.get_metadata()
        self.torch_device = meta.get("AOTI_DEVICE_KEY", torch_device())
        shape = tuple(None if d == "s" else int(d) for d in
                      meta.get("edgepack_input_shape", "").split(",") if d)
        self.input = TensorSpec("input", shape, "float32")
        self.output = TensorSpec("output", (None,), "float32")

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            out = self._runner(torch.from_numpy(np.ascontiguousarray(x, np.float32))
                               .to(self.torch_device))
        out = out[0] if isinstance(out, list | tuple) else out
        return out.float().cpu().numpy()


def open_session(model_path: Path, threads: int) -> AOTISession:
    return AOTISession(model_path, threads)
