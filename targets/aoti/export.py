"""AOTInductor export: torch.export with a dynamic batch, compiled ahead of time into a `.pt2`
package for the GPU when there is one, else for this CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from targets.aoti.run import torch_device
from targets.base import ExportUnsupported

MODEL_FILE = "model.pt2"


def export(model: Any, example: Any, out_dir: Path) -> Path:
    """Compile with a dynamic batch dimension for the GPU when there is one, else the CPU."""
    if isinstance(model, Path):
        raise ExportUnsupported("AOTInductor compiles a PyTorch model, not an ONNX file")
    import torch

    from targets.base import eval_mode

    device = torch_device() or "cpu"
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
