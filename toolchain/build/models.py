"""The built-in demo models: a small CNN that reaches about 98% on the digits in seconds, and a
smaller one for the keyword demo's log-mel features (1 x 40 bands x 98 frames)."""

from __future__ import annotations

from typing import Any


def demo_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> Any:
    import torch.nn as nn

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(
        *block(in_channels, w, 1),
        *block(w, 2 * w, 2),
        *block(2 * w, 4 * w, 2),
        *block(4 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


def keyword_cnn(in_channels: int = 1, num_classes: int = 12, width: int = 32) -> Any:
    """For log-mel input: the first convolution already halves both axes (the features are
    40x98, four times the digits' pixels), so the network costs about 5M MACs instead of the
    digit CNN's 47M on the same input; the speaker runs it on one core, and it trains in
    minutes here."""
    import torch.nn as nn

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(
        *block(in_channels, w, 2),
        *block(w, 2 * w, 2),
        *block(2 * w, 4 * w, 2),
        *block(4 * w, 4 * w, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


# the built-in model each built-in demo data source trains when no --model is given
DEMO_MODELS = {"demo-cnn": (demo_cnn, "built-in demo CNN"),
               "keyword-cnn": (keyword_cnn, "built-in keyword CNN (log-mel input)")}
