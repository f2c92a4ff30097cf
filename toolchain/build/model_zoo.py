"""Small reference architectures of the kinds users bring: a plain CNN, a residual network,
depthwise-separable (inverted-residual) blocks, squeeze-and-excitation blocks and a small
attention block. Each factory takes (in_channels, num_classes, width) and is usable as
`--model toolchain.build.model_zoo:residual`. Tests and benchmarks walk `ARCHITECTURES`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toolchain.build.models import demo_cnn


def _nn() -> Any:
    import torch.nn as nn

    return nn


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, act: bool = True) -> Any:
    nn = _nn()
    layers = [nn.Conv2d(cin, cout, 3 if groups == 1 or groups == cin else 1, stride,
                        padding=1 if groups == 1 or groups == cin else 0, groups=groups,
                        bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _pointwise(cin: int, cout: int, act: bool = True) -> Any:
    nn = _nn()
    layers = [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _head(channels: int, num_classes: int) -> Any:
    nn = _nn()
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def plain_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> Any:
    return demo_cnn(in_channels, num_classes, width)


def residual(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> Any:
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = _conv_bn(cin, cout, stride)
            self.conv2 = _conv_bn(cout, cout, act=False)
            self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                             nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout)))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: Any) -> Any:
            return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))

    w = width
    return nn.Sequential(_conv_bn(in_channels, w), BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2),
                         BasicBlock(2 * w, 4 * w, 2), _head(4 * w, num_classes))


def depthwise(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> Any:
    """MobileNetV2-style inverted residuals: expand 1x1, depthwise 3x3, project 1x1."""
    import torch.nn as nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
            super().__init__()
            hidden = cin * expand
            self.block = nn.Sequential(
                _pointwise(cin, hidden),
                _conv_bn(hidden, hidden, stride, groups=hidden),
                _pointwise(hidden, cout, act=False),
            )
            self.use_residual = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            y = self.block(x)
            return x + y if self.use_residual else y

    w = width
    return nn.Sequential(_conv_bn(in_channels, w), InvertedResidual(w, w, 1),
                         InvertedResidual(w, 2 * w, 2), InvertedResidual(2 * w, 2 * w, 1),
                         InvertedResidual(2 * w, 4 * w, 2), _head(4 * w, num_classes))


def squeeze_excite(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> Any:
    """Residual blocks with squeeze-and-excitation channel gating."""
    import torch.nn as nn

    class SEBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, reduction: int = 4) -> None:
            super().__init__()
            self.conv1 = _conv_bn(cin, cout, stride)
            self.conv2 = _conv_bn(cout, cout, act=False)
            self.squeeze = nn.AdaptiveAvgPool2d(1)
            self.excite = nn.Sequential(
                nn.Conv2d(cout, max(cout // reduction, 4), 1), nn.ReLU(inplace=True),
                nn.Conv2d(max(cout // reduction, 4), cout, 1), nn.Sigmoid())
            self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                             nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout)))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: Any) -> Any:
            y = self.conv2(self.conv1(x))
            y = y * self.excite(self.squeeze(y))
            return self.relu(y + self.shortcut(x))

    w = width
    return nn.Sequential(_conv_bn(in_channels, w), SEBlock(w, 2 * w, 2), SEBlock(2 * w, 4 * w, 2),
                         _head(4 * w, num_classes))


def attention(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> Any:
    """A convolutional stem, then one transformer-style block of multi-head self-attention
    over the 8x8 grid of patch tokens, then a linear classifier."""
    import torch
    import torch.nn as nn

    class AttentionNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            dim = 2 * width
            self.stem = nn.Sequential(_conv_bn(in_channels, width, 2), _conv_bn(width, dim, 2))
            self.norm1 = nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, num_heads=4, batch_first=True)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            self.classifier = nn.Linear(dim, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.stem(x).flatten(2).transpose(1, 2)  # (N, HW, C)
            h = self.norm1(tokens)
            tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
            tokens = tokens + self.mlp(self.norm2(tokens))
            return self.classifier(tokens.mean(dim=1))

    return AttentionNet()


ARCHITECTURES: dict[str, Callable[..., Any]] = {
    "plain-cnn": plain_cnn,
    "residual": residual,
    "depthwise": depthwise,
    "squeeze-excite": squeeze_excite,
    "attention": attention,
}
