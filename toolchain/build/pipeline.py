"""The build, top to bottom: ingest, train, reference, distill, prune, quantize, package.

Each model-producing stage ends with a Candidate assessed in the real backend (accuracy on the
held-out test split, size, params, MACs, measured latency); the report has one row per stage.
The accuracy gate is checked on the final candidate's test accuracy against the reference."""

from __future__ import annotations

import copy
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime import preprocess
from runtime.bundle import SUFFIX
from runtime.manifest import (
    Gate,
    InputSpec,
    Manifest,
    Metrics,
    ModelInfo,
    ModelMetrics,
    OutputSpec,
)
from targets.base import Backend
from toolchain.budgets import write_json
from toolchain.build import report as rep
from toolchain.build.assess import Candidate, Context
from toolchain.build.compress import (
    distill_stage,
    fp32_candidate,
    prune_stage,
    quantize_stage,
    teacher_logits,
)
from toolchain.build.data import Dataset, load_sources
from toolchain.build.decisions import (
    GateOutcome,
    budget_rows,
    choose_backend,
    choose_precision,
    gate_outcome,
    learning_check,
)
from toolchain.build.ingest import IngestedModel, check_fits, ingest_model
from toolchain.build.recipe import Recipe, load_recipe
from toolchain.build.transfer import check_options, replace_head, training_phases
from toolchain.errors import UsageError
from toolchain.profiles import HardwareProfile, ProfileSearch
from toolchain.progress import Progress

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

GOLDEN_COUNT = 8


@dataclass
class BuildOptions:
    target: str
    model: str | None = None
    data: str | tuple[str, ...] = "digits"  # several sources are joined (load_sources)
    mix: float | None = None  # the share of training drawn from the sources after the first
    out_dir: Path = Path("build")
    json_path: Path | None = None
    seed: int = 0
    epochs: int | None = None
    pretrained: bool = False
    num_classes: int | None = None  # checked against the data's classes when given
    replace_head: bool = False  # a pretrained model's classifier swapped for the data's classes
    freeze_epochs: int = 0  # with replace_head: epochs that train the new head alone
    trust_pickle: bool = False
    model_version: str = "1"
    sign_key: Ed25519PrivateKey | None = None  # runtime.signing.load_private_key
    image_size: int = 32
    bench_runs: int = 200
    recipe: Path | None = None
    overrides: tuple[str, ...] = ()
    teacher: str | None = None
    notes: list[str] = field(default_factory=list)
    search: ProfileSearch = field(default_factory=ProfileSearch)  # profiles, fits, calibrations


def build(opts: BuildOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole build; returns the report (also written to `opts.json_path`).
    Raises UsageError for bad input before anything is written to `opts.out_dir`."""
    progress = progress or Progress()
    notes = opts.notes
    profile = opts.search.load(opts.target)
    overrides = opts.overrides + ((f"train.epochs={opts.epochs}",) if opts.epochs else ())
    overrides += (f'distill.teacher="{opts.teacher}"',) if opts.teacher else ()
    recipe = load_recipe(profile, opts.recipe, overrides)
    check_options(opts.pretrained, opts.replace_head, opts.freeze_epochs,
                  recipe["train"]["epochs"])

    with progress.stage("ingest", f"target {profile.name}: {profile.description}"):
        refs = (opts.data,) if isinstance(opts.data, str) else tuple(opts.data)
        data = load_sources(refs, opts.seed, opts.image_size, opts.mix)
        if data.recipe_defaults:  # a built-in demo's data brings its own defaults
            recipe = load_recipe(profile, opts.recipe, overrides,
                                 (data.name, data.recipe_defaults))
        progress.log(data.describe())
        model = _ingest(opts.model, data, opts, opts.seed)
        progress.log(model.description)
        prep = data.preprocessing or preprocess.normalization(data.mean, data.std)
        xs = {k: preprocess.apply(prep, getattr(data, f"x_{k}")) for k in ("train", "val", "test")}
        if opts.replace_head:
            notes.append(replace_head(model, xs["train"], data.num_classes, opts.seed))
            progress.log(notes[-1])
        check_fits(model, xs["test"], data.num_classes)
        teacher = _teacher(recipe, data, opts, xs["test"])
        student = _student(recipe, data, opts, xs["test"])

    if model.needs_training:
        epochs = recipe["train"]["epochs"]
        with progress.stage("train", f"{epochs} epochs on {len(xs['train'])} samples"):
            from toolchain.build.train import train

            for run_epochs, set_mode, recal in training_phases(model.module, model.head,
                                                        opts.freeze_epochs, epochs, progress.log):
                train(model.module, xs["train"], data.y_train, xs["val"], data.y_val,
                      epochs=run_epochs, seed=opts.seed, lr=recipe["train"]["lr"],
                      log=progress.log, set_mode=set_mode, recalibrate=recal)
    elif opts.epochs:
        notes.append(f"--epochs ignored: {model.description}")

    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as tmp:
        work = Path(tmp)
        backend = choose_backend(profile, model, notes, progress)
        precision = choose_precision(recipe, backend, notes)
        ctx = Context(backend, profile.threads, xs["train"], data.y_train, xs["val"],
                      data.y_val, xs["test"], data.y_test, work, opts.bench_runs,
                      recipe["quantize"]["calibration_samples"], progress.log)
        if profile.threads > (os.cpu_count() or 1):
            notes.append(f"latency measured with the profile's {profile.threads} threads on a "
                         f"host with {os.cpu_count()} cores: oversubscribed, slower than the "
                         "target")

        with progress.stage("reference", f"fp32 in {backend.name}, {profile.threads} thread(s)"):
            reference = fp32_candidate(ctx, "reference", model.module,
                                       f"fp32 export to {backend.name}", source=model.onnx_path)
        candidates = [reference]
        current, module = reference, model.module
        soft = None
        if model.traced:
            notes.append("pruning skipped and no distillation: the model is an ExportedProgram "
                         "(a traced graph), which can be exported and quantized but not pruned "
                         "or fine-tuned; pass a factory to compress it further")
        elif module is not None and (recipe["distill"]["enabled"] or teacher is not None
                                     or student is not None):
            soft = teacher_logits(teacher if teacher is not None else copy.deepcopy(module),
                                  xs["train"])
        if student is not None:
            with progress.stage("distill", f"student {recipe['distill']['student']}"):
                module = student
                current = distill_stage(ctx, recipe, module, soft, opts.seed)
                candidates.append(current)
        if recipe["prune"]["enabled"] and not model.traced:
            if module is None:
                notes.append("pruning skipped: the model is an ONNX graph, and pruning needs "
                             "a PyTorch model")
            else:
                with progress.stage("prune", _prune_detail(recipe)):
                    module, pruned = prune_stage(ctx, recipe, module, reference, soft,
                                                 precision, opts.seed, notes)
                    if pruned is not None:  # None: nothing could be pruned (a note says why)
                        current = pruned
                        candidates.append(current)
        if precision != "fp32":
            with progress.stage("quantize", f"{precision} for {backend.name}"):
                current = quantize_stage(ctx, recipe, module, current, reference, precision,
                                         soft, opts.seed)
                candidates.append(current)

        final = current
        target_latency = _target_latency(profile, backend, final, opts.search, progress)
        learning = learning_check(reference.val_accuracy, data.y_val, data.num_classes,
                                  model.needs_training)
        gate = gate_outcome(recipe, reference, final, candidates, learning)
        with progress.stage("package"):
            bundle_path = opts.out_dir / f"{_safe_name(model.name)}-{profile.name}{SUFFIX}"
            bundle_path = _package(opts, profile, recipe, backend, model, data, prep, ctx,
                                   reference, final, candidates, bundle_path, gate,
                                   target_latency)
            progress.log(f"{bundle_path} ({bundle_path.stat().st_size} bytes)")

    report = {
        **({} if learning.learned else {"not_learned": learning.line()}),
        "target": profile.name,
        "backend": backend.name,
        "precision": final.precision,
        "threads": profile.threads,
        "bundle": str(bundle_path),
        "reference": _metrics(reference),
        "final": {**_metrics(final),
                  **({"target_latency_ms": target_latency} if target_latency else {})},
        "budgets": budget_rows(profile, recipe, reference, final, bundle_path.stat().st_size,
                            target_latency, learning),
        "stages": _stage_rows(progress.timings, candidates),
        "recipe": recipe.to_dict(),
        "notes": notes,
    }
    if not gate.passed and gate.reason is None:
        best = gate.best_within
        report["best_within_gate"] = (
            {"stage": best.stage, **_metrics(best), "did": best.did} if best else None)
    if opts.json_path:
        write_json(opts.json_path, report)
    return report


def _ingest(ref: str | None, data: Dataset, opts: BuildOptions, seed: int) -> IngestedModel:
    if opts.num_classes is not None and opts.num_classes != data.num_classes:
        raise UsageError(f"--num-classes {opts.num_classes}, but the data has "
                         f"{data.num_classes} classes ({', '.join(data.labels[:12])}"
                         f"{', ...' if data.num_classes > 12 else ''})")
    # a head to be replaced keeps the classes it was pretrained for: the factory gets none
    return ingest_model(ref, in_channels=data.in_channels,
                        num_classes=None if opts.replace_head else data.num_classes,
                        pretrained=opts.pretrained, trust_pickle=opts.trust_pickle, seed=seed,
                        demo=data.demo_model)


def _teacher(recipe: Recipe, data: Dataset, opts: BuildOptions, x: np.ndarray) -> Any:
    ref = recipe["distill"]["teacher"]
    if not ref:
        return None
    teacher = ingest_model(ref, in_channels=data.in_channels, num_classes=data.num_classes,
                           pretrained=True, trust_pickle=opts.trust_pickle, seed=opts.seed)
    check_fits(teacher, x, data.num_classes)
    return teacher.onnx_path if teacher.kind == "onnx" else teacher.module


def _student(recipe: Recipe, data: Dataset, opts: BuildOptions, x: np.ndarray) -> Any:
    ref = recipe["distill"]["student"]
    if not ref:
        return None
    if ":" not in ref:
        raise UsageError(f"distill.student {ref!r}: name a factory, file.py:factory or "
                         "package.module:factory")
    student = ingest_model(ref, in_channels=data.in_channels, num_classes=data.num_classes,
                           pretrained=False, trust_pickle=False, seed=opts.seed)
    check_fits(student, x, data.num_classes)
    return student.module


def _prune_detail(recipe: Recipe) -> str:
    p = recipe["prune"]
    if p["target"] == "ratio":
        return f"{p['ratio']:.0%} of channels, {p['scope']} {p['criterion']}, {p['steps']} steps"
    key = "latency_ms" if p["target"] == "latency" else p["target"]
    return f"search towards {key} <= {p[key]}, {p['scope']} {p['criterion']}"


def _metrics(c: Candidate) -> dict[str, Any]:
    return rep.model_metrics(c.accuracy, c.size_bytes, c.params, c.macs, c.latency)


def _stage_rows(timings: list[dict], candidates: list[Candidate]) -> list[dict[str, Any]]:
    by_stage = {c.stage: c for c in candidates}  # the last candidate of each stage
    return [{**t, **(by_stage[t["name"]].row() if t["name"] in by_stage else {})}
            for t in timings]


def _package(opts: BuildOptions, profile: HardwareProfile, recipe: Recipe, backend: Backend,
             model: IngestedModel, data: Dataset, prep: dict[str, Any], ctx: Context,
             reference: Candidate, final: Candidate, candidates: list[Candidate],
             bundle_path: Path, gate: GateOutcome,
             target_latency: dict[str, Any] | None) -> Path:
    from toolchain.build import package as pkg

    session = backend.open_session(final.model_file, ctx.threads)
    golden_x = data.x_test[:GOLDEN_COUNT]
    golden, golden_files = pkg.write_golden(
        ctx.work, golden_x, session.run(preprocess.apply(prep, golden_x)), final.precision)
    dist_files = pkg.write_distributions(ctx.work, pkg.reference_distributions(
        preprocess.drift_view(prep, data.x_val), session.run(ctx.x_val), data.labels,
        f"validation split of {data.name} ({len(data.x_val)} samples)"))
    model_entry, model_files = pkg.model_entries(backend, final.model_file)
    metrics = Metrics(
        reference=_model_metrics(reference), final=_model_metrics(final),
        gate=Gate(max_accuracy_drop_points=gate.limit_points, passed=gate.passed,
                  drop_points=gate.drop_points),
        extra={"stages": [{"stage": c.stage, **c.row()} for c in candidates],
               "peak_rss_mb": final.peak_rss_mb, "cold_start_ms": final.cold_start_ms,
               **({"not_learned": gate.reason} if gate.reason else {}),
               **({"target_latency_ms": target_latency} if target_latency else {})})
    manifest = Manifest(
        model=ModelInfo(_safe_name(model.name), opts.model_version),
        target=pkg.target_record(profile, backend, final.precision),
        model_file=model_entry,
        input=InputSpec(session.input, data.sample_shape, prep),
        output=OutputSpec(session.output, "logits", tuple(data.labels)),
        metrics=metrics,
        provenance=pkg.provenance_record(
            source_model=model.description, source_model_sha256=model.source_sha256,
            data=data.name, data_sha256=data.sha256, recipe=recipe.to_dict(), seed=opts.seed),
        golden=golden,
        reference_distributions=pkg.DISTRIBUTIONS,
    )
    return pkg.package(bundle_path, manifest, {**model_files, **golden_files, **dist_files},
                       key=opts.sign_key)


def _model_metrics(c: Candidate) -> ModelMetrics:
    """The report's record of a candidate, read through the manifest's own checks."""
    return ModelMetrics.from_dict(_metrics(c))


def _target_latency(profile: HardwareProfile, backend: Backend, final: Candidate,
                    search: ProfileSearch, progress: Progress) -> dict[str, Any] | None:
    """For a target that is not this host: an estimate, labelled as one, with the reason. On
    a CPU without its own fit for the backend, the cost model calibrates itself first."""
    if profile.measurable_on_host:
        return None
    from toolchain.latency import costmodel, floors, selfcal

    calibration = None
    if selfcal.needs_fit(profile) and selfcal.needed(backend.name, final.precision, search):
        with progress.stage("calibrate", f"latency cost model on this CPU, {backend.name} "
                                         f"{final.precision}"):
            calibration = selfcal.ensure_host_fit(backend.name, final.precision, search,
                                                  progress.log)
    host = search.load(costmodel.HOST_PROFILE)
    est = floors.with_target_tail(
        costmodel.estimate(backend.graph_ops(final.model_file), profile, backend,
                           final.precision, host, search=search), profile)
    est["why"] = (f"{profile.device} is not this host; the {backend.name} latency above was "
                  f"measured on this host's CPU; p95 from {profile.name}'s tail model "
                  f"(x{profile.fixed.tail_ratio_p95:g})")
    if busy := floors.host_tail_note(final.latency):
        est["host_note"] = busy
    if calibration:
        est["calibration"] = calibration
    return est


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not cleaned:
        raise UsageError(f"model name {name!r} gives an empty file name")
    return cleaned
