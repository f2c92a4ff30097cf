"""Structured pruning with torch-pruning: whole channels (and attention head dimensions) are
removed, so the model really has fewer parameters and MACs, not masked zeros.

`Pruner` wraps one torch-pruning schedule: `step()` removes the next slice of channels. The
caller decides what happens between steps (distillation fine-tuning, measuring)."""

from __future__ import annotations

from typing import Any

import numpy as np

from toolchain.errors import UsageError

CRITERIA = ("l2", "taylor", "bn-scale")
SCOPES = ("global", "uniform")


def output_layer(module: Any, example: Any) -> Any:
    """The last Conv/Linear that runs in a forward pass: the classifier, kept whole."""
    import torch
    import torch.nn as nn

    order: list[Any] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in module.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise UsageError("the model has no Conv or Linear layer to prune")
    return order[-1]


def _importance(criterion: str) -> Any:
    import torch_pruning as tp

    if criterion == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    if criterion == "bn-scale":
        return tp.importance.BNScaleImportance()
    raise UsageError(f"unknown pruning criterion {criterion!r}; valid: {', '.join(CRITERIA)}")


class Pruner:
    """Prune `module` in place towards `ratio` (the share of channels removed in each prunable
    layer for 'uniform'; the same share overall, ranked across layers, for 'global') over
    `steps` equal steps. Layers named in `keep` and the output layer are left whole."""

    def __init__(self, module: Any, example: Any, *, criterion: str, scope: str, ratio: float,
                 steps: int, keep: tuple[str, ...] = ()) -> None:
        import torch.nn as nn
        import torch_pruning as tp

        if scope not in SCOPES:
            raise UsageError(f"unknown pruning scope {scope!r}; valid: {', '.join(SCOPES)}")
        if not 0 < ratio < 1:
            raise UsageError(f"pruning ratio must be between 0 and 1, got {ratio}")
        names = dict(module.named_modules())
        if missing := [k for k in keep if k not in names]:
            layers = ", ".join(n for n, m in names.items()
                               if isinstance(m, nn.Linear | nn.modules.conv._ConvNd))
            raise UsageError(f"layers to keep not found: {', '.join(missing)}; "
                             f"prunable layers: {layers}")
        self.module, self.example, self.criterion = module, example, criterion
        self.steps_total, self.steps_done = steps, 0
        ignored = [output_layer(module, example), *(names[k] for k in keep)]
        heads = {m: m.num_heads for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
        self._pruner = tp.pruner.MetaPruner(
            module, example, importance=_importance(criterion),
            global_pruning=scope == "global", pruning_ratio=ratio, iterative_steps=steps,
            ignored_layers=ignored, num_heads=heads, max_pruning_ratio=0.95,
            round_to=None,
        )

    def step(self, x_train: np.ndarray | None = None, y_train: np.ndarray | None = None) -> None:
        """Remove the next slice of channels. Taylor importance needs gradients: it takes a few
        training batches to compute them."""
        import torch
        import torch.nn.functional as F

        if self.criterion == "taylor":
            if x_train is None or y_train is None:
                raise ValueError("Taylor importance needs training data")
            self.module.train()
            self.module.zero_grad()
            for i in range(0, min(len(x_train), 256), 64):
                out = self.module(torch.from_numpy(x_train[i : i + 64]))
                F.cross_entropy(out, torch.from_numpy(y_train[i : i + 64])).backward()
        self.module.eval()
        self._pruner.step()
        self.module.zero_grad(set_to_none=True)
        self.steps_done += 1
        _sync_attention(self.module)

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.steps_total


def _sync_attention(module: Any) -> None:
    """torch-pruning shrinks an attention layer's projections; keep the layer's own
    bookkeeping (embed_dim, head_dim) in step so its forward pass still adds up."""
    import torch.nn as nn

    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.embed_dim = m.q_proj_weight.shape[0] if m.in_proj_weight is None \
                else m.in_proj_weight.shape[0] // 3
            m.kdim = m.vdim = m.embed_dim
            m.head_dim = m.embed_dim // m.num_heads
