"""Pruning that cannot crash a build (toolchain/build/prune.py) and BatchNorm recalibration
(toolchain/build/train.py), on small hand-made models: fast, no bundle is built."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from toolchain.build.prune import Pruner, PruningRefused, _OutOfTime, _time_limit
from toolchain.build.stats import torch_stats
from toolchain.build.train import recalibrate_bn


class Shuffled(nn.Module):
    """A channel shuffle over 3 groups after `mix`: torch-pruning cannot map its indices, and
    pruning `mix` to a width that 3 does not divide breaks the reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.mix = nn.Conv2d(16, 9, 1)
        self.body = nn.Sequential(nn.Conv2d(9, 16, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.stem(x))
        b, c, h, w = x.shape
        x = x.view(b, 3, c // 3, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.body(x))


def test_a_layer_that_breaks_when_pruned_is_kept_whole_and_the_rest_prunes():
    torch.manual_seed(0)
    model = Shuffled().eval()
    x = torch.rand(4, 3, 8, 8)
    before = torch_stats(model, x.numpy())
    pruner = Pruner(model, x[:1], criterion="l2", scope="uniform", ratio=0.5, steps=1)
    assert list(pruner.kept_whole) == ["mix"], pruner.kept_whole
    assert "breaks the forward pass" in pruner.kept_whole["mix"]
    pruner.step()
    assert model.mix.out_channels == 9  # whole
    assert model.stem[0].out_channels < 16  # pruned
    after = torch_stats(model, x.numpy())
    assert after[0] < before[0] and after[1] < before[1]
    assert model(x).shape == (4, 10)


def test_nothing_to_prune_is_refused_with_the_reason():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    with pytest.raises(PruningRefused, match="no layer can be pruned"):
        Pruner(model, torch.rand(1, 3, 8, 8), criterion="l2", scope="global", ratio=0.5,
               steps=1)


def test_time_limits_interrupt_and_nest():
    with pytest.raises(PruningRefused, match="spin did not finish"):
        with _time_limit(0.2, "spin"):
            while True:
                pass
    with _time_limit(5, "outer"):  # an inner limit ends its block only
        with pytest.raises(_OutOfTime):
            with _time_limit(0.1, "inner"):
                while True:
                    pass


def test_recalibrate_bn_estimates_the_statistics_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=0.01),
                          nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    x = (np.random.default_rng(0).standard_normal((256, 3, 4, 4)) * 2 + 5).astype(np.float32)
    model(torch.from_numpy(x[:2]))  # materialize the lazy layer
    with torch.no_grad():
        conv = model[0](torch.from_numpy(x))
    assert recalibrate_bn(model, x, batches=4)
    bn = model[1]
    assert not model.training and not bn.training and bn.momentum == 0.01
    torch.testing.assert_close(bn.running_mean, conv.mean((0, 2, 3)), rtol=0.05, atol=0.05)
    torch.testing.assert_close(bn.running_var, conv.var((0, 2, 3)), rtol=0.1, atol=0.1)
    assert not recalibrate_bn(nn.Linear(2, 2), x)  # no BatchNorm: nothing to do


def test_an_expiry_that_was_swallowed_comes_again():
    """Python prints and drops a signal handler's exception raised inside a garbage-collection
    callback (jax registers one): the limit must fire again, not leave the block unbounded."""
    import time

    swallowed = 0
    started = time.monotonic()
    with pytest.raises(PruningRefused):
        with _time_limit(0.2, "a block that drops the first expiry"):
            while time.monotonic() - started < 10:
                try:
                    time.sleep(0.01)
                except _OutOfTime:
                    swallowed += 1
                    if swallowed > 1:
                        raise
    assert swallowed == 2 and time.monotonic() - started < 5
