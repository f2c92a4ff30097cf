"""The build's decisions, kept apart from the work so they can be read and tested on their
own: which backend (and which fallback), which precision, which budgets were met, whether the
reference model learned at all, whether the accuracy gate held and, if not, which stage was the
best that stayed within it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import targets
from targets.base import Backend
from toolchain.budgets import budget
from toolchain.build.assess import Candidate
from toolchain.build.ingest import IngestedModel
from toolchain.build.recipe import Recipe
from toolchain.errors import ToolchainError
from toolchain.profiles import HardwareProfile
from toolchain.progress import Progress

MIB = 1024 * 1024
CHANCE_MARGIN_POINTS = 2.0  # a reference this close to chance (or worse) did not learn


def choose_backend(profile: HardwareProfile, model: IngestedModel, notes: list[str],
                   progress: Progress) -> Backend:
    """The first backend in the profile's preference list that exists, runs here and can be
    made from this model; every fallback is recorded in the notes."""
    try:
        backend, skipped = targets.choose(profile.backends, from_onnx=model.kind == "onnx")
    except targets.NoBackend as exc:
        raise ToolchainError(f"no backend of profile {profile.name} can be built here: "
                             f"{exc}") from exc
    if skipped:
        note = f"profile {profile.name} prefers {', '.join(skipped)}; fell back to {backend.name}"
        notes.append(note)
        progress.log(note)
    return backend


def choose_precision(recipe: Recipe, backend: Backend, notes: list[str]) -> str:
    wanted = recipe["quantize"]["precision"]
    if backend.supports(wanted):
        return wanted
    notes.append(f"{wanted} is not available for {backend.name}; the bundle is fp32")
    return "fp32"


@dataclass(frozen=True)
class LearningCheck:
    """Whether the reference model learned: its validation accuracy against chance (1/classes)
    and against always answering the validation split's most common class. A drop measured
    from a reference that never learned says nothing, so the gate cannot pass on it."""

    val_accuracy: float
    chance: float
    majority: float
    trained_here: bool  # trained by this build (else taken as trained: advice differs)

    @property
    def learned(self) -> bool:
        return (self.val_accuracy * 100 > self.chance * 100 + CHANCE_MARGIN_POINTS
                and self.val_accuracy > self.majority)

    @property
    def summary(self) -> str:
        return (f"the reference model did not learn: validation accuracy "
                f"{self.val_accuracy:.1%} vs chance {self.chance:.1%} (majority class "
                f"{self.majority:.1%})")

    def line(self) -> str:
        advice = ("train longer, check the data and labels, or the learning rate (train.lr)"
                  if self.trained_here else "it was taken as trained: check that the data's "
                  "labels, their order and the preprocessing are the ones it was trained on")
        return f"{self.summary}; the accuracy gate is meaningless; {advice}"


def learning_check(val_accuracy: float, y_val: np.ndarray, num_classes: int,
                   trained_here: bool) -> LearningCheck:
    counts = np.bincount(y_val, minlength=num_classes)
    majority = float(counts.max() / counts.sum()) if counts.sum() else 1.0
    return LearningCheck(val_accuracy, 1 / num_classes, majority, trained_here)


def budget_rows(profile: HardwareProfile, recipe: Recipe, reference: Candidate, final: Candidate,
             bundle_bytes: int, target_latency: dict[str, Any] | None,
             learning: LearningCheck | None = None) -> list[dict[str, Any]]:
    b = profile.budgets
    drop = round((reference.accuracy - final.accuracy) * 100, 4)
    gate = recipe["gate"]["max_accuracy_drop_points"]
    if target_latency is None:
        latency = budget("p95_latency_ms", b.p95_latency_ms, final.latency["p95"],
                             "measured on this host")
    else:
        latency = budget("p95_latency_ms", b.p95_latency_ms, target_latency["p95"],
                             f"estimated for {profile.name}, not measured: "
                             f"{target_latency['why']}")
    gate_row = budget("max_accuracy_drop_points", gate, drop,
                      "held-out test split, in the backend")
    if learning is not None and not learning.learned:
        gate_row.update(ok=False, reason=learning.summary,
                        note=f"not passed: {learning.summary}")
    rows = [
        gate_row,
        budget("bundle_size_mb", b.bundle_size_mb, round(bundle_bytes / MIB, 4)),
        latency,
        budget("peak_memory_mb", b.peak_memory_mb, round(final.peak_rss_mb, 1),
                   "peak RSS of the runtime process on this host"),
    ]
    p = recipe["prune"]
    if p["enabled"] and p["target"] != "ratio" and final.module is not None:
        if p["target"] == "latency":
            rows.append(budget("prune_target_latency_ms", p["latency_ms"],
                                   final.latency["p95"], "p95 measured on this host"))
        else:
            rows.append(budget(f"prune_target_{p['target']}", p[p["target"]],
                                   getattr(final, p["target"])))
    return rows




@dataclass(frozen=True)
class GateOutcome:
    limit_points: float
    drop_points: float  # test accuracy lost from the reference to the final model
    passed: bool
    best_within: Candidate | None  # when it failed: the fastest stage still within the gate
    reason: str | None = None  # why it did not pass whatever the drop (a reference at chance)


def gate_outcome(recipe: Recipe, reference: Candidate, final: Candidate,
                 candidates: list[Candidate],
                 learning: LearningCheck | None = None) -> GateOutcome:
    limit = recipe["gate"]["max_accuracy_drop_points"]
    drop = round((reference.accuracy - final.accuracy) * 100, 4)
    if learning is not None and not learning.learned:
        return GateOutcome(limit, drop, False, None, learning.summary)
    if drop <= limit:
        return GateOutcome(limit, drop, True, None)
    within = [c for c in candidates if (reference.accuracy - c.accuracy) * 100 <= limit]
    best = min(within, key=lambda c: c.latency["p50"]) if within else None
    return GateOutcome(limit, drop, False, best)
