"""PyTorch AOTInductor: the model compiled ahead of time into a `.pt2` package of native
kernels (Triton/CUDA on a GPU, C++ on a CPU), loaded by torch's own runtime.

This is the one backend whose run half needs torch (the package is executed by
`torch._inductor.aoti_load_package`); bundles made with it say so in their manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets.base import BackendUnavailable, TensorSpec

NAME = "aoti"
EXPORTS_FROM_ONNX = False
MODEL_FILE = "model.pt2"
RUN_NEEDS_TORCH = True


def model_files(main: Path) -> list[Path]:
    return [main]


def _device() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_unavailable_reason(require_gpu: bool = True) -> str | None:
    device = _device()
    if device is None:
        return "torch is not installed (an AOTInductor package runs in torch's runtime)"
    if require_gpu and device != "cuda":
        return "no CUDA GPU here (the cloud-gpu AOTInductor package is compiled for the GPU)"
    return None


class AOTISession:
    def __init__(self, model_path: Path, threads: int) -> None:
        if run_unavailable_reason(require_gpu=False):
            raise BackendUnavailable(run_unavailable_reason(require_gpu=False))
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        self._runner = torch._inductor.aoti_load_package(str(model_path))
        meta = self._runner.get_metadata()
        self._device = meta.get("AOTI_DEVICE_KEY", _device())
        shape = tuple(None if d == "s" else int(d) for d in
                      meta.get("edgepack_input_shape", "").split(",") if d)
        self.input = TensorSpec("input", shape, "float32")
        self.output = TensorSpec("output", (None,), "float32")

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            out = self._runner(torch.from_numpy(np.ascontiguousarray(x, np.float32))
                               .to(self._device))
        out = out[0] if isinstance(out, list | tuple) else out
        return out.float().cpu().numpy()


def open_session(model_path: Path, threads: int) -> AOTISession:
    return AOTISession(model_path, threads)


def export(model: Any, example: Any, out_dir: Path, device: str | None = None) -> Path:
    """Compile with a dynamic batch dimension for the GPU when there is one, else the CPU."""
    import torch

    from targets.base import eval_mode

    device = device or _device() or "cpu"
    eval_mode(model)
    model = model.to(device)
    example = example.to(device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    example2 = torch.cat([example[:1], example[:1]])  # batch 2: 1 would be specialized
    try:
        program = torch.export.export(model, (example2,), dynamic_shapes=({0: batch},))
        shape = ",".join(["s", *map(str, example.shape[1:])])
    except Exception:
        program = torch.export.export(model, (example[:1],))
        shape = ",".join(map(str, example[:1].shape))
    target = out_dir / MODEL_FILE
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(target),
        inductor_configs={"aot_inductor.metadata": {"edgepack_input_shape": shape,
                                                    "AOTI_DEVICE_KEY": device}})
    return target
