"""Structured pruning with torch-pruning: whole channels (and attention head dimensions) are
removed, so the model really has fewer parameters and MACs, not masked zeros.

`Pruner` wraps one torch-pruning schedule: `step()` removes the next slice of channels. The
caller decides what happens between steps (distillation fine-tuning, measuring)."""

from __future__ import annotations

import contextlib
import copy
import re
import signal
import threading
import time
from collections.abc import Iterator
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


GROUP_SECONDS = 5.0  # one group's channel dependencies; a small model's take ~0.1 s each
ANALYSIS_SECONDS = 300.0  # the whole analysis: past it the model is not pruned


class PruningRefused(Exception):
    """Nothing can be pruned (the reason says why); the build goes on without pruning."""


class Pruner:
    """Prune `module` in place towards `ratio` (the share of channels removed in each prunable
    layer for 'uniform'; the same share overall, ranked across layers, for 'global') over
    `steps` equal steps. Layers named in `keep` and the output layer are left whole.

    torch-pruning does not handle every layer kind (a channel shuffle's reshape, a weight used
    outside its module's forward, a graph whose index mappings explode). Before pruning, the
    whole schedule is tried on a copy: a layer whose channel group cannot be built in time, or
    whose pruning breaks the forward pass, is kept whole, and `kept_whole` says why. Raises
    PruningRefused when nothing is left to prune or the analysis takes too long."""

    def __init__(self, module: Any, example: Any, *, criterion: str, scope: str, ratio: float,
                 steps: int, keep: tuple[str, ...] = ()) -> None:
        import torch.nn as nn

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
        self._options = {"importance": _importance(criterion), "global_pruning": scope == "global",
                         "pruning_ratio": ratio, "iterative_steps": steps,
                         "max_pruning_ratio": 0.95, "round_to": None}
        self.kept_whole: dict[str, str] = {}  # layer name -> why torch-pruning left it whole
        fixed = [_name_of(module, output_layer(module, example)), *keep]
        self._deadline = time.monotonic() + ANALYSIS_SECONDS
        with _time_limit(ANALYSIS_SECONDS, "torch-pruning's dependency analysis"):
            self._find_unprunable(fixed)
        # outside the limit: the analysis built this same graph on a copy in time, and an
        # interrupted build would leave torch-pruning's tracing hooks on the real model
        self._pruner = self._meta_pruner(module, [*fixed, *self.kept_whole])

    def _meta_pruner(self, module: Any, ignored: list[str], trial: bool = False) -> Any:
        import torch.nn as nn
        import torch_pruning as tp

        names = dict(module.named_modules())
        heads = {m: m.num_heads for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
        options = dict(self._options)
        if trial and self.criterion == "taylor":  # a trial has no gradients; the shapes it
            options["importance"] = _importance("l2")  # checks do not depend on the ranking
        return tp.pruner.MetaPruner(module, self.example,
                                    ignored_layers=[names[n] for n in ignored], num_heads=heads,
                                    **options)

    def _find_unprunable(self, fixed: list[str]) -> None:
        """Fill `kept_whole`: first the layers whose channel group torch-pruning cannot build
        (an error, or no answer within GROUP_SECONDS), then, by pruning a copy with the real
        schedule, those whose pruning breaks the forward pass."""
        import torch_pruning as tp

        trial = copy.deepcopy(self.module)
        try:
            graph = tp.DependencyGraph().build_dependency(trial, self.example)
        except _OutOfTime:
            raise
        except Exception as exc:
            raise PruningRefused(f"torch-pruning cannot trace the model ({_short(exc)})") from exc
        names = {m: n for n, m in trial.named_modules()}
        for layer in list(graph.module2node):
            name = names.get(layer)
            handler = graph.get_pruner_of_module(layer)
            if name is None or name in fixed or handler is None or \
                    not isinstance(layer, (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
                continue
            width = handler.get_out_channels(layer)
            if width is None:
                continue
            try:
                with _time_limit(GROUP_SECONDS, "group"):
                    graph.get_pruning_group(layer, handler.prune_out_channels, list(range(width)))
            except _OutOfTime:
                if time.monotonic() >= self._deadline - 0.1:
                    raise  # the whole analysis ran out of time, not this group
                self.kept_whole[name] = (f"its channel dependencies did not resolve in "
                                         f"{GROUP_SECONDS:.0f} s in torch-pruning's graph")
            except Exception as exc:
                self.kept_whole[name] = f"torch-pruning cannot map its channels ({_short(exc)})"
        per_group = False
        while (broken := self._trial([*fixed, *self.kept_whole], per_group)) is not None:
            name, why = broken
            if name in self.kept_whole or name in fixed or name == "?":
                raise PruningRefused(f"pruning breaks the model and the layer at fault cannot "
                                     f"be found ({why})")
            self.kept_whole[name] = why
            per_group = True  # one culprit found: look for the next group by group

    def _trial(self, ignored: list[str], per_group: bool = False) -> tuple[str, str] | None:
        """Run the whole schedule on a copy and check its forward pass after each step (after
        each group with `per_group`, to find the culprit): None if it all works, else the
        root layer of the group that broke it and how. Raises PruningRefused when no group is
        left to prune."""
        trial = copy.deepcopy(self.module).eval()
        names = {m: n for n, m in trial.named_modules()}
        pruner = self._meta_pruner(trial, ignored, trial=True)
        pruned = 0
        for _ in range(self.steps_total):
            root = "?"
            try:
                for group in pruner.step(interactive=True):
                    root = names.get(group[0].dep.target.module, "?")
                    group.prune()
                    pruned += 1
                    if per_group:
                        _check_forward(trial, self.example)
                if not per_group:
                    _check_forward(trial, self.example)
            except _OutOfTime:
                raise
            except Exception as exc:
                if not per_group:
                    return self._trial(ignored, per_group=True) or (
                        root, f"pruning it breaks the forward pass ({_short(exc)})")
                return root, f"pruning it breaks the forward pass ({_short(exc)})"
        if not pruned:
            raise PruningRefused("no layer can be pruned" + (
                f": {describe_kept(self.kept_whole)}" if self.kept_whole else ""))
        return None

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


def _check_forward(module: Any, example: Any) -> None:
    import torch

    _sync_attention(module)
    with torch.no_grad():
        module(example)


def describe_kept(kept: dict[str, str], shown: int = 6) -> str:
    """'kept whole: a, b (why); c (why)': layer names grouped by reason, a few of each."""
    by_reason: dict[str, list[str]] = {}
    for name, why in kept.items():
        by_reason.setdefault(why, []).append(name)
    parts = []
    for why, layers in by_reason.items():
        more = f" and {len(layers) - shown} more" if len(layers) > shown else ""
        parts.append(f"{', '.join(layers[:shown])}{more} ({why})")
    return "kept whole: " + "; ".join(parts)


def _name_of(module: Any, layer: Any) -> str:
    return next(n for n, m in module.named_modules() if m is layer)


def _short(exc: BaseException, limit: int = 120) -> str:
    """The error in one line, numbers left out: the same failure in two layers reads the same."""
    text = re.sub(r"\d+", "#", " ".join(str(exc).split()))
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _OutOfTime(Exception):
    pass


RETRY_SECONDS = 0.5  # an expiry that was swallowed comes again this much later
_outermost: list[float] = []  # the outermost active limit's deadline (time.monotonic)


@contextlib.contextmanager
def _time_limit(seconds: float, what: str) -> Iterator[None]:
    """Interrupt the block with _OutOfTime after `seconds` (SIGALRM: only in the main thread
    of a POSIX process; elsewhere unbounded). The outermost limit turns its expiry into
    PruningRefused; an inner one only shortens the outer's and raises _OutOfTime. A timer that
    was running before (pytest-timeout's, say) is paused meanwhile and then resumed.

    The timer repeats every RETRY_SECONDS after it expires: a signal handler's exception
    raised while a garbage-collection callback runs (jax, which litert-torch imports,
    registers one) is printed and swallowed by Python, and a one-shot timer would then leave
    the block running unbounded (a Swin graph's group analysis grew past 19 GB that way)."""
    if threading.current_thread() is not threading.main_thread() or \
            not hasattr(signal, "setitimer"):
        yield
        return
    if not _outermost:
        armed = [True]

        def expired(signum: int, frame: Any) -> None:
            if armed[0]:
                raise _OutOfTime(what)

        started = time.monotonic()
        previous = signal.signal(signal.SIGALRM, expired)
        paused = signal.setitimer(signal.ITIMER_REAL, seconds, RETRY_SECONDS)
        _outermost.append(started + seconds)
        try:
            yield
        except _OutOfTime as exc:
            raise PruningRefused(f"{what} did not finish in {seconds:.0f} s") from exc
        finally:
            armed[0] = False
            _outermost.clear()
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if paused[0] > 0:
                left = max(paused[0] - (time.monotonic() - started), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, left, paused[1])
        return
    if _outermost[0] - time.monotonic() <= seconds:  # the outer limit comes first
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds, RETRY_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, max(_outermost[0] - time.monotonic(), 1e-3),
                         RETRY_SECONDS)


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
