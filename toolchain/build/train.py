"""Training on the train split, supervised or distilled from a teacher's logits; the weights
with the best validation accuracy win. A model at chance in eval mode has its BatchNorm running
statistics re-estimated on training batches before it is judged (see `recalibrate_bn`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np


def _default_mode(module: Any, training: bool) -> None:
    module.train(training)


def accuracy_torch(module: Any, x: np.ndarray, y: np.ndarray, batch: int = 512,
                   set_mode: Callable[[Any, bool], None] = _default_mode) -> float:
    import torch

    set_mode(module, False)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            pred = module(torch.from_numpy(x[i : i + batch])).argmax(-1).numpy()
            correct += int((pred == y[i : i + batch]).sum())
    return correct / max(len(x), 1)


BN_BATCHES = 16  # of 64 samples: ~1,000 samples estimate a BatchNorm layer's mean and variance


def recalibrate_bn(module: Any, x: np.ndarray, batches: int = BN_BATCHES,
                   batch_size: int = 64) -> bool:
    """Re-estimate every BatchNorm layer's running mean and variance on `batches` batches of
    `x`, as a cumulative average (momentum None), with no gradients; the module ends in eval
    mode. Only the BatchNorm layers run in train mode, so dropout and stochastic depth do not
    skew the statistics. Returns False (and changes nothing) when there is no BatchNorm.

    Why: with a small momentum (MobileNetV3's 0.01) and few training steps, the running
    statistics barely leave their initial values and the model is at chance in eval mode while
    it is fine in train mode; pruning changes every layer's inputs the same way."""
    import torch
    import torch.nn as nn

    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms or not len(x):
        return False
    momenta = [m.momentum for m in norms]
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for i in range(0, min(len(x), batches * batch_size), batch_size):
                module(torch.from_numpy(x[i : i + batch_size]))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        module.eval()
    return True


def train(
    module: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    seed: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    log: Callable[[str], None] = print,
    teacher_logits: np.ndarray | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    set_mode: Callable[[Any, bool], None] = _default_mode,
    recalibrate: bool = True,
) -> Any:
    """Train `module` (inputs already preprocessed) with AdamW and a one-cycle schedule.

    With `teacher_logits` (one row per training sample) this is knowledge distillation: the
    loss is alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, with
    logits softened by the temperature T (Hinton et al., 2015).

    `recalibrate`: when an epoch's validation accuracy is at chance (within 2 points of
    1/classes, or no better than the majority class), re-estimate the BatchNorm statistics
    and validate again (False for a graph without BatchNorm modules, such as QAT's, and while
    a pretrained backbone is frozen). A model that learns keeps its statistics as trained."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, -(-len(x) // batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    soft = None if teacher_logits is None else torch.from_numpy(teacher_logits).float()

    def loss_fn(logits: Any, idx: Any) -> Any:
        hard = F.cross_entropy(logits, y[idx])
        if soft is None:
            return hard
        t = temperature
        kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(soft[idx] / t, -1),
                      reduction="batchmean", log_target=True) * t * t
        return alpha * kd + (1 - alpha) * hard
    counts = np.bincount(y_val) if len(y_val) else np.ones(1)
    near_chance = max(1 / max(len(counts), 2) + 0.02, counts.max() / counts.sum())
    best_acc, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        set_mode(module, True)
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(module(x[idx]), idx)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        val_acc = accuracy_torch(module, x_val, y_val, set_mode=set_mode)
        if recalibrate and val_acc <= near_chance:
            # at chance in eval mode: running statistics that lag the weights (a small BN
            # momentum, few steps) are the usual cause; judge the weights with re-estimated
            # ones, the statistics they will ship with
            recalibrate_bn(module, x_train[order[: BN_BATCHES * 64].numpy()])
            val_acc = accuracy_torch(module, x_val, y_val, set_mode=set_mode)
        log(f"epoch {epoch}/{epochs}: loss {total / len(x):.4f}, validation accuracy "
            f"{val_acc:.2%}")
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(module.state_dict())
    if best_state is not None:
        module.load_state_dict(best_state)
    set_mode(module, False)
    return module
