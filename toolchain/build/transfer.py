"""Transfer learning: a pretrained backbone gets a new classifier head for the data's classes
and is fine-tuned, optionally with the backbone frozen for the first epochs.

`--pretrained --replace-head`: the layer that produces the logits (the last Linear or
convolution that runs, as in squeezenet's 1x1 convolution head) is found by a forward pass
and replaced in place by a fresh layer of the same kind with one output per class.
`--freeze-epochs K`: for the first K epochs only that new head trains (the backbone's weights
take no gradient and its normalization statistics stay as they were), then everything."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import numpy as np

from toolchain.build.ingest import IngestedModel
from toolchain.errors import UsageError

SetMode = Callable[[Any, bool], None]


def check_options(pretrained: bool, replace_head: bool, freeze_epochs: int,
                  epochs: int) -> None:
    """The transfer options make sense together (before anything runs)."""
    if replace_head and not pretrained:
        raise UsageError("--replace-head swaps the classifier of a pretrained model: add "
                         "--pretrained (a model trained from scratch is built for the data's "
                         "classes by its factory instead)")
    if freeze_epochs and not replace_head:
        raise UsageError("--freeze-epochs trains a new head alone first: it needs "
                         "--pretrained --replace-head")
    if freeze_epochs > epochs:
        raise UsageError(f"--freeze-epochs {freeze_epochs} is more than the {epochs} training "
                         "epochs (--epochs or the recipe's train.epochs)")


def replace_head(model: IngestedModel, example: np.ndarray, num_classes: int,
                 seed: int = 0) -> str:
    """Replace `model`'s classifier layer with a fresh one for `num_classes` and mark the model
    for fine-tuning. `example`: one preprocessed sample batch. Returns what was done, e.g.
    "head replaced: classifier.3 Linear(1024->1000) -> Linear(1024->10)"."""
    import torch
    import torch.nn as nn

    from targets.base import eval_mode
    from toolchain.build.prune import output_layer

    module = model.module
    if model.kind != "torch" or model.traced or module is None:
        raise UsageError(f"--replace-head needs a PyTorch model to change (a factory or a "
                         f"trusted .pt module); {model.description} cannot be changed")
    if not any(isinstance(m, nn.Linear | nn.modules.conv._ConvNd) for m in module.modules()):
        raise UsageError(f"--replace-head: model {model.name} has no Linear or convolution "
                         "layer to replace")
    x = torch.from_numpy(example[:1])
    eval_mode(module)
    try:
        head = output_layer(module, x)
        with torch.no_grad():
            out = module(x)
    except UsageError:
        raise
    except Exception as exc:
        _fails(model, example, num_classes, exc)
    width = _out_width(head)
    name = next(n for n, m in module.named_modules() if m is head)
    if out.ndim != 2 or out.shape[1] != width:
        raise UsageError(f"--replace-head: the last layer that runs, {name} "
                         f"({_describe(head)}), gives {width} features but the model gives "
                         f"outputs of shape {tuple(out.shape)}: it is not the classifier")
    if isinstance(head, nn.modules.conv._ConvNd) and head.groups != 1:
        raise UsageError(f"--replace-head: the classifier {name} is a grouped convolution "
                         f"({_describe(head)}); only a Linear or an ungrouped convolution can "
                         "be replaced")
    torch.manual_seed(seed)  # the new head's initial weights follow the seed
    new = _fresh(head, num_classes)
    parent_name, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, leaf, new)
    did = f"head replaced: {name} {_describe(head)} -> {_describe(new)}"
    model.head = name
    model.needs_training = True  # a new head knows nothing yet: the model is fine-tuned
    model.description += f"; {did}, fine-tuned"
    return did


def _fails(model: IngestedModel, example: np.ndarray, num_classes: int,
           exc: Exception) -> NoReturn:
    from toolchain.build.ingest import check_fits

    check_fits(model, example, num_classes)  # raises a usage error naming the shape mismatch
    raise UsageError(f"--replace-head: model {model.name} fails on the data: {exc}") from exc


def _out_width(layer: Any) -> int:
    return layer.out_features if hasattr(layer, "out_features") else layer.out_channels


def _describe(layer: Any) -> str:
    import torch.nn as nn

    if isinstance(layer, nn.Linear):
        return f"{type(layer).__name__}({layer.in_features}->{layer.out_features})"
    kernel = "x".join(str(k) for k in layer.kernel_size)
    return f"{type(layer).__name__}({layer.in_channels}->{layer.out_channels}, {kernel})"


def _fresh(layer: Any, num_classes: int) -> Any:
    """A new layer like `layer` (its kind, input width, kernel, bias) with `num_classes`
    outputs. A Linear subclass becomes a plain Linear (its extras belong to the old task)."""
    import torch.nn as nn

    like = {"device": layer.weight.device, "dtype": layer.weight.dtype,
            "bias": layer.bias is not None}
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, num_classes, **like)
    kind = next(k for k in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(layer, k))
    return kind(layer.in_channels, num_classes, layer.kernel_size, stride=layer.stride,
                padding=layer.padding, dilation=layer.dilation, padding_mode=layer.padding_mode,
                **like)


def training_phases(module: Any, head: str | None, freeze_epochs: int, epochs: int,
                    log: Callable[[str], None] = print
                    ) -> Iterator[tuple[int, SetMode, bool]]:
    """The training runs, as (epochs, set_mode and recalibrate for train()): with a frozen
    start, first the head alone for `freeze_epochs` (the backbone's BatchNorm statistics are
    pretrained: not re-estimated), then the whole model for the rest; otherwise one run.
    The backbone is frozen while the first run trains and unfrozen after it."""
    if head is None or freeze_epochs <= 0:
        yield epochs, _whole, True
        return
    log(f"head {head} alone for {freeze_epochs} epoch(s), backbone frozen")
    with frozen_backbone(module, head) as set_mode:
        yield freeze_epochs, set_mode, False
    if epochs > freeze_epochs:
        log(f"the whole model for {epochs - freeze_epochs} epoch(s)")
        yield epochs - freeze_epochs, _whole, True


def _whole(module: Any, training: bool) -> None:
    module.train(training)


@contextmanager
def frozen_backbone(module: Any, head: str) -> Iterator[SetMode]:
    """Within it, only the parameters of the layer named `head` take gradients (the optimizer
    skips a parameter without one, so weight decay leaves it alone too), and the set_mode it
    gives keeps the backbone's normalization layers in eval mode: their running statistics
    are part of what was pretrained. Every parameter's requires_grad is restored on exit."""
    import torch.nn as nn

    layer = module.get_submodule(head)
    own = {id(p) for p in layer.parameters()}
    saved = {p: p.requires_grad for p in module.parameters()}
    head_parts = {id(m) for m in layer.modules()}
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and id(m) not in head_parts]

    def set_mode(model: Any, training: bool) -> None:
        model.train(training)
        for m in norms:
            m.eval()

    try:
        for p in saved:
            p.requires_grad_(id(p) in own)
        yield set_mode
    finally:
        for p, wanted in saved.items():
            p.requires_grad_(wanted)
