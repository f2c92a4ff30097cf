"""The built-in demo models: a small CNN that reaches about 98% on the digits in seconds, and
one for the keyword demo's log-mel features (1 x 40 bands x 98 frames)."""

from __future__ import annotations

from typing import Any


def _conv_stack(in_channels: int, num_classes: int, width: int,
                strides: tuple[int, int, int, int]) -> Any:
    """Four 3x3 conv-BN-ReLU blocks of width w, 2w, 4w, 4w, global average pooling, a linear
    classifier."""
    import torch.nn as nn

    widths = (in_channels, width, 2 * width, 4 * width, 4 * width)
    layers: list[nn.Module] = []
    for cin, cout, stride in zip(widths[:-1], widths[1:], strides, strict=True):
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


def demo_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> Any:
    return _conv_stack(in_channels, num_classes, width, (1, 2, 2, 2))


def keyword_cnn(in_channels: int = 1, num_classes: int = 12, width: int = 32) -> Any:
    """For log-mel input: the first convolution already halves both axes (the features are
    40x98, four times the digits' pixels) and the last keeps its resolution, so the network
    costs 19M MACs instead of the digit CNN's 47M on the same input."""
    return _conv_stack(in_channels, num_classes, width, (2, 2, 2, 1))


# the built-in model each built-in demo data source trains when no --model is given
DEMO_MODELS = {"demo-cnn": (demo_cnn, "built-in demo CNN"),
               "keyword-cnn": (keyword_cnn, "built-in keyword CNN (log-mel input)")}
