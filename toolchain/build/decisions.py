"""The build's decisions, kept apart from the work so they can be read and tested on their
own: which backend (and which fallback), which precision, which budgets were met, whether the
accuracy gate held and, if not, which stage was the best that stayed within it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def budget_rows(profile: HardwareProfile, recipe: Recipe, reference: Candidate, final: Candidate,
             bundle_bytes: int, target_latency: dict[str, Any] | None) -> list[dict[str, Any]]:
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
    rows = [
        budget("max_accuracy_drop_points", gate, drop, "held-out test split, in the backend"),
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


def gate_outcome(recipe: Recipe, reference: Candidate, final: Candidate,
                 candidates: list[Candidate]) -> GateOutcome:
    limit = recipe["gate"]["max_accuracy_drop_points"]
    drop = round((reference.accuracy - final.accuracy) * 100, 4)
    if drop <= limit:
        return GateOutcome(limit, drop, True, None)
    within = [c for c in candidates if (reference.accuracy - c.accuracy) * 100 <= limit]
    best = min(within, key=lambda c: c.latency["p50"]) if within else None
    return GateOutcome(limit, drop, False, best)
