"""Small versions of the model zoo's architectures, so compression tests stay fast, and a
model whose int8 output collapses unless its classifier stays in float."""

import torch
import torch.nn as nn

from toolchain.build import model_zoo


def plain_cnn(in_channels=1, num_classes=10):
    return model_zoo.plain_cnn(in_channels, num_classes, width=8)


def residual(in_channels=1, num_classes=10):
    return model_zoo.residual(in_channels, num_classes, width=8)


def depthwise(in_channels=1, num_classes=10):
    return model_zoo.depthwise(in_channels, num_classes, width=8)


def squeeze_excite(in_channels=1, num_classes=10):
    return model_zoo.squeeze_excite(in_channels, num_classes, width=8)


def attention(in_channels=1, num_classes=10):
    return model_zoo.attention(in_channels, num_classes, width=8)


def offset_logits(in_channels=1, num_classes=10):
    """Logits sit near 1000 and differ by a few units: softmax and fp32 do not care, but an
    int8 output tensor (scale about 8) cannot tell the classes apart. Keeping the classifier
    in float fixes it; the accuracy-gated fallback must find that."""
    model = model_zoo.plain_cnn(in_channels, num_classes, width=8)
    with torch.no_grad():
        classifier = model[-1]
        assert isinstance(classifier, nn.Linear)
        classifier.bias.add_(1000.0)
    return model
