"""Models for fitting and checking the latency cost model.

`fit_set()`: micro-models, each dominated by one kind of operator (convolutions, depthwise
convolutions, matrix products, elementwise chains, pooling) at several sizes, plus tiny ones for
the fixed overheads. `held_out_set()`: the model zoo's architectures at widths and input sizes
the fit never saw. Each item is (name, module factory, input shape)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Item = tuple[str, Callable[[], Any], tuple[int, ...]]


def _conv_stack(width: int, depth: int, channels: int = 3) -> Any:
    import torch.nn as nn

    layers: list[Any] = []
    cin = channels
    for _ in range(depth):
        layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers)


def _depthwise_stack(channels: int, depth: int) -> Any:
    import torch.nn as nn

    layers: list[Any] = [nn.Conv2d(3, channels, 1)]
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.ReLU()]
    return nn.Sequential(*layers)


def _mlp(width: int, depth: int, inputs: int) -> Any:
    import torch.nn as nn

    layers: list[Any] = [nn.Flatten(), nn.Linear(inputs, width)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    return nn.Sequential(*layers)


def _elementwise(depth: int) -> Any:
    import torch
    import torch.nn as nn

    class Chain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i in range(depth):
                x = torch.relu(x * 1.01 + 0.01 * i)
            return x

    return Chain()


def _pooling(depth: int) -> Any:
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 16, 1), *[nn.MaxPool2d(3, 1, 1) for _ in range(depth)])


def fit_set() -> list[Item]:
    items: list[Item] = []
    for width, depth, size in [(8, 2, 32), (16, 2, 32), (32, 2, 32), (64, 2, 32), (16, 4, 64),
                               (32, 3, 64), (8, 3, 96), (48, 2, 48), (24, 4, 40), (64, 3, 16)]:
        items.append((f"conv-w{width}-d{depth}-{size}",
                      lambda w=width, d=depth: _conv_stack(w, d), (1, 3, size, size)))
    for ch, depth, size in [(16, 2, 32), (32, 4, 32), (64, 2, 64), (128, 3, 32), (32, 3, 96),
                            (96, 2, 48)]:
        items.append((f"dw-c{ch}-d{depth}-{size}",
                      lambda c=ch, d=depth: _depthwise_stack(c, d), (1, 3, size, size)))
    for width, depth, size in [(64, 2, 16), (256, 2, 32), (1024, 2, 32), (512, 4, 16),
                               (2048, 2, 16)]:
        items.append((f"mlp-w{width}-d{depth}-{size}",
                      lambda w=width, d=depth, s=size: _mlp(w, d, 3 * s * s), (1, 3, size, size)))
    for depth, size in [(4, 32), (8, 64), (4, 128), (16, 32)]:
        items.append((f"eltwise-d{depth}-{size}", lambda d=depth: _elementwise(d),
                      (1, 3, size, size)))
    for depth, size in [(2, 32), (3, 64), (2, 96)]:
        items.append((f"pool-d{depth}-{size}", lambda d=depth: _pooling(d), (1, 3, size, size)))
    for size in (4, 8):
        items.append((f"tiny-{size}", lambda: _conv_stack(4, 1), (1, 3, size, size)))
    return items + _many_small_ops() + _block_set()


def _many_small_ops() -> list[Item]:
    """Deep stacks of ops with almost no arithmetic: what each op costs to dispatch and to
    hand between threads. Real architectures at small inputs (a MobileNet at 32x32: 50 convs,
    most on 4x4 maps) spend most of their time there, and the other micro-models, where
    arithmetic dominates, cannot tell it apart from their compute."""
    items: list[Item] = []
    for width, depth, size in [(8, 12, 4), (16, 8, 8), (32, 10, 2)]:
        items.append((f"ops-conv-w{width}-d{depth}-{size}",
                      lambda w=width, d=depth: _conv_stack(w, d), (1, 3, size, size)))
    for ch, depth, size in [(16, 8, 8), (48, 12, 4)]:
        items.append((f"ops-dw-c{ch}-d{depth}-{size}",
                      lambda c=ch, d=depth: _depthwise_stack(c, d), (1, 3, size, size)))
    items.append(("ops-mlp-w32-d8-4", lambda: _mlp(32, 8, 3 * 4 * 4), (1, 3, 4, 4)))
    return items


def _head_of(arch: str, width: int, keep: int) -> Any:
    """The first `keep` stages of a zoo architecture: its stem and single blocks."""
    import torch.nn as nn

    from toolchain.build.model_zoo import ARCHITECTURES

    return nn.Sequential(*list(ARCHITECTURES[arch](3, 10, width))[:keep])


def _block_set() -> list[Item]:
    """Single blocks of each kind the zoo uses (stem plus one or two blocks), at widths and
    input sizes the held-out set does not use: the fit sees each op mix, never a whole
    held-out architecture."""
    from toolchain.build.model_zoo import attention

    items: list[Item] = []
    grid = [(8, 24), (14, 40), (30, 24), (22, 56)]  # some widths off the vector blocks
    # (architecture, stages kept): a single block, and the stem with every block but no head
    cuts = (("plain-cnn", 6), ("plain-cnn", 12), ("residual", 2), ("residual", 4),
            ("depthwise", 3), ("depthwise", 5), ("squeeze-excite", 2), ("squeeze-excite", 3))
    for arch, keep in cuts:
        for width, size in grid:
            items.append((f"block-{arch}-{keep}-w{width}-{size}",
                          lambda a=arch, w=width, k=keep: _head_of(a, w, k),
                          (1, 3, size, size)))
    for width, size in [(64, 8), (128, 4), (96, 8), (128, 2)]:  # many channels, few pixels
        items.append((f"conv-small-w{width}-{size}", lambda w=width: _conv_stack(w, 3),
                      (1, 3, size, size)))
    for width, size in [(6, 24), (12, 40), (20, 24), (32, 56)]:
        items.append((f"block-attention-w{width}-{size}",
                      lambda w=width: attention(3, 10, w), (1, 3, size, size)))
    return items


def held_out_set() -> list[Item]:
    from toolchain.build.model_zoo import ARCHITECTURES

    items: list[Item] = []
    grid = {
        "plain-cnn": [(12, 32), (20, 48), (40, 32), (24, 64)],
        "residual": [(6, 32), (12, 48), (20, 32), (10, 64)],
        "depthwise": [(10, 32), (20, 48), (28, 32), (14, 64)],
        "squeeze-excite": [(10, 32), (18, 48), (26, 32), (12, 64)],
        "attention": [(8, 32), (16, 32), (24, 32), (12, 48)],
    }
    for arch, settings in grid.items():
        for width, size in settings:
            items.append((f"{arch}-w{width}-{size}",
                          lambda a=arch, w=width: ARCHITECTURES[a](3, 10, w),
                          (1, 3, size, size)))
    return items


# The automatic calibration's models, the most telling first (it may stop early): the fixed
# costs, then each op kind once, then a second size of the kinds that dominate real models.
QUICK = ("tiny-4", "conv-w32-d3-64", "ops-conv-w16-d8-8", "dw-c32-d4-32", "ops-dw-c48-d12-4",
         "mlp-w256-d2-32", "eltwise-d8-64", "block-attention-w12-40", "block-residual-4-w14-40",
         "pool-d3-64", "ops-conv-w8-d12-4", "block-squeeze-excite-3-w22-56", "dw-c96-d2-48",
         "mlp-w1024-d2-32")


def quick_set() -> list[Item]:
    """A dozen micro-models of the fitting set that between them exercise every op kind."""
    by_name = {item[0]: item for item in fit_set()}
    return [by_name[name] for name in QUICK]
