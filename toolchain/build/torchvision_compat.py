"""torchvision's model code beside a torch it was not built for.

The PyPI wheel of torchvision 0.28 is built against the CUDA torch; beside the CPU build of
torch 2.13.0 its C extension does not load, and `import torchvision` then fails while
registering fake kernels for its detection ops (`operator torchvision::nms does not exist`).
The classification models call none of those ops (nms, roi_align, deform_conv2d). When that
failure happens we declare the two operators torchvision registers unconditionally, so the
import goes on; calling a detection op still fails, loudly, as it would without the
extension. With a matching torch/torchvision pair nothing here runs."""

from __future__ import annotations

import sys
from typing import Any

from toolchain.errors import UsageError

# the operators torchvision's `_meta_registrations` registers fake kernels for whether or not
# its extension loaded (0.28); their schemas as its Python wrappers call them
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: Any = None  # kept alive: dropping a torch.library.Library removes its definitions


def import_torchvision() -> Any:
    """The torchvision module, importable beside the CPU torch (see the module doc)."""
    try:
        import torchvision
    except ImportError as exc:
        raise UsageError("torchvision is not installed: pip install torchvision (the release "
                         "that matches your torch; 0.28 for torch 2.13)") from exc
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        _declare_missing_operators()
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # the half-imported package, imported again below
        import torchvision
    return torchvision


def _declare_missing_operators() -> None:
    global _library
    import torch

    if _library is not None:
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        name = schema.split("(", 1)[0]
        if not hasattr(torch.ops.torchvision, name):
            _library.define(schema)
