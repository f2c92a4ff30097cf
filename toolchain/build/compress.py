"""The compression stages, between training and packaging: distill into a named student,
prune structurally (with distillation fine-tuning between steps, or a measured search towards
a MACs, parameter or latency target), and quantize for the backend with an accuracy-gated
fallback. Each stage returns the Candidate it produced, assessed in the real backend.

Decisions inside a stage (stop the search, keep layers in float) use the validation split;
the accuracy gate on the final model uses the held-out test split."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np

from targets.base import QuantizeJob
from toolchain.build.assess import Candidate, Context, accuracy_in_backend, assess, export_fp32
from toolchain.build.prune import Pruner, PruningRefused, describe_kept
from toolchain.build.recipe import Recipe
from toolchain.build.stats import model_stats
from toolchain.build.train import train
from toolchain.errors import UsageError


def _quantize(ctx: Context, module: Any, fp32_path: Path, precision: str, out_dir: Path,
              float_layers: tuple[str, ...] = ()) -> Path:
    return ctx.backend.quantize(QuantizeJob(precision, fp32_path, module, ctx.x_test[:1],
                                            ctx.calibration, out_dir, float_layers))


def teacher_logits(teacher: Any, x: np.ndarray) -> np.ndarray:
    """The teacher's logits on the training split, computed once: a torch module, or an
    ONNX file run in ONNX Runtime."""
    if isinstance(teacher, Path):  # an ONNX teacher runs in ONNX Runtime's session
        from targets.onnxruntime.run import OnnxRuntimeSession

        return OnnxRuntimeSession(teacher, threads=os.cpu_count() or 1).run(x)
    import torch

    from targets.base import eval_mode

    eval_mode(teacher)
    step = 256
    with torch.no_grad():
        try:
            teacher(torch.from_numpy(x[:2]))
        except Exception:  # a traced teacher (ExportedProgram) is fixed to batch 1
            step = 1
        return np.concatenate([teacher(torch.from_numpy(x[i : i + step])).numpy()
                               for i in range(0, len(x), step)])


def finetune(module: Any, ctx: Context, recipe: Recipe, soft: np.ndarray | None, epochs: int,
             seed: int) -> Any:
    """Distillation from the teacher's logits when there are any, else supervised."""
    d = recipe["distill"]
    use_teacher = soft is not None and d["enabled"]
    return train(module, ctx.x_train, ctx.y_train, ctx.x_val, ctx.y_val, epochs=epochs,
                 seed=seed, lr=d["lr"], log=ctx.log,
                 teacher_logits=soft if use_teacher else None,
                 temperature=d["temperature"], alpha=d["alpha"])


def fp32_candidate(ctx: Context, stage: str, module: Any, did: str,
                   source: Any = None) -> Candidate:
    folder = ctx.new_dir(stage)
    path = export_fp32(ctx, source if source is not None else module, folder)
    stats = model_stats(module, source if isinstance(source, Path) else path, ctx.x_test,
                        folder)
    return assess(ctx, stage, path, module, "fp32", stats, did)


def distill_stage(ctx: Context, recipe: Recipe, student: Any, soft: np.ndarray,
                  seed: int) -> Candidate:
    d = recipe["distill"]
    finetune(student, ctx, recipe, soft, d["epochs"], seed)
    return fp32_candidate(ctx, "distill", student,
                          f"trained the student {d['student']} from the teacher's logits "
                          f"(T={d['temperature']}, alpha={d['alpha']}, {d['epochs']} epochs)")


def _shipping(ctx: Context, module: Any, precision: str, recipe: Recipe, stage: str,
              did: str) -> Candidate:
    """The module as it would ship: plain post-training quantization in the target precision."""
    folder = ctx.new_dir(stage)
    fp32 = export_fp32(ctx, module, folder)
    stats = model_stats(module, fp32, ctx.x_test, folder)
    if precision == "fp32":
        return assess(ctx, stage, fp32, module, "fp32", stats, did)
    path = _quantize(ctx, module, fp32, precision, folder / "q")
    return assess(ctx, stage, path, module, precision, stats, did)


def _target_met(p: dict[str, Any], c: Candidate) -> bool:
    if p["target"] == "macs":
        return c.macs <= p["macs"]
    if p["target"] == "params":
        return c.params <= p["params"]
    return c.latency["p95"] <= p["latency_ms"]


def prune_stage(ctx: Context, recipe: Recipe, module: Any, reference: Candidate,
                soft: np.ndarray | None, precision: str, seed: int,
                notes: list[str]) -> tuple[Any, Candidate | None]:
    """Prune as the recipe asks. Layers torch-pruning cannot handle are kept whole (said in a
    note and in the stage's `did`); when nothing can be pruned the stage gives no candidate
    (None) and a note says why, and the build goes on with the unpruned model."""
    import torch

    p = recipe["prune"]
    gate = recipe["gate"]["max_accuracy_drop_points"] / 100
    example = torch.from_numpy(ctx.x_test[:1])
    before = (reference.params, reference.macs)
    try:
        pruner = Pruner(module, example, criterion=p["criterion"], scope=p["scope"],
                        ratio=p["max_ratio"] if p["target"] != "ratio" else p["ratio"],
                        steps=p["steps"] if p["target"] == "ratio" else
                        max(1, round(p["max_ratio"] / p["search_step"])),
                        keep=tuple(p["keep_layers"]))
    except PruningRefused as exc:
        notes.append(f"pruning skipped: {exc}")
        ctx.log(f"pruning skipped: {exc}")
        return module, None
    kept = describe_kept(pruner.kept_whole) if pruner.kept_whole else ""
    if kept:
        notes.append(f"pruning: {kept}")
        ctx.log(f"pruning: {kept}")
    if p["target"] == "ratio":
        done = 0
        for step in range(1, p["steps"] + 1):
            module, ok = _prune_step(ctx, pruner, module, step, notes)
            if not ok:
                break
            done = step
            epochs = recipe["distill"]["epochs"] if step == p["steps"] else p["finetune_epochs"]
            ctx.log(f"prune step {step}/{p['steps']}: fine-tuning {epochs} epochs")
            finetune(module, ctx, recipe, soft, epochs, seed + step)
        if not done:
            return module, None
        ratio = p["ratio"] * done / p["steps"]
        did = f"removed {ratio:.0%} of channels ({p['scope']} {p['criterion']}, " \
              f"{done} step(s), distillation fine-tuning)"
    else:
        module, did = _prune_search(ctx, recipe, module, pruner, reference, soft, precision,
                                    gate, seed, notes)
    candidate = fp32_candidate(ctx, "prune", module, did + (f"; {kept}" if kept else ""))
    candidate.did += (f"; params {before[0]} -> {candidate.params}, "
                      f"MACs {before[1]} -> {candidate.macs}")
    return module, candidate


def _prune_step(ctx: Context, pruner: Pruner, module: Any, step: int,
                notes: list[str]) -> tuple[Any, bool]:
    """One pruning step (the fine-tuning after it re-estimates BatchNorm statistics if the
    pruned model is at chance).
    A step that raises or leaves a model that no longer runs is undone: the module from
    before it comes back, with a note, and pruning stops there."""
    import torch

    kept = copy.deepcopy(module)
    try:
        pruner.step(ctx.x_train, ctx.y_train)
        with torch.no_grad():
            module(torch.from_numpy(ctx.x_test[:1]))
    except Exception as exc:
        notes.append(f"pruning stopped before step {step}: torch-pruning failed "
                     f"({type(exc).__name__}: {str(exc)[:160]}); the model from step "
                     f"{step - 1} goes on")
        return kept, False
    return module, True


def _prune_search(ctx: Context, recipe: Recipe, module: Any, pruner: Pruner, reference: Candidate,
                  soft: np.ndarray | None, precision: str, gate: float, seed: int,
                  notes: list[str]) -> tuple[Any, str]:
    """Prune one search step at a time, each step fine-tuned and measured as it would ship,
    until the target is met, the gate on validation accuracy stops it, or max_ratio is reached.
    Bounded: at most max_ratio / search_step steps."""
    p = recipe["prune"]
    key = "latency_ms" if p["target"] == "latency" else p["target"]
    steps = pruner.steps_total
    baseline = _shipping(ctx, module, precision, recipe, "prune-search-0", "before pruning")
    if _target_met(p, baseline):
        return module, f"target {key} <= {p[key]} already met before pruning"
    outcome = f"reached max_ratio {p['max_ratio']} without meeting {key} <= {p[key]}"
    ratio_done = 0.0
    for step in range(1, steps + 1):
        kept = copy.deepcopy(module)
        module, ok = _prune_step(ctx, pruner, module, step, notes)
        if not ok:
            outcome = f"torch-pruning failed at step {step}; kept step {step - 1}"
            break
        finetune(module, ctx, recipe, soft, p["finetune_epochs"], seed + step)
        c = _shipping(ctx, module, precision, recipe, f"prune-search-{step}",
                      f"search step {step}")
        if reference.val_accuracy - c.val_accuracy > gate:
            module = kept
            outcome = (f"step {step} broke the accuracy gate (validation drop "
                       f"{(reference.val_accuracy - c.val_accuracy) * 100:.2f} points); kept "
                       f"step {step - 1}, without meeting {key} <= {p[key]}")
            break
        ratio_done = step * p["search_step"]
        if _target_met(p, c):
            outcome = f"met {key} <= {p[key]} after {step} step(s)"
            break
    notes.append(f"prune search: {outcome}")
    return module, (f"searched towards {key} <= {p[key]} ({p['scope']} {p['criterion']}, "
                    f"steps of {p['search_step']:.0%}, each fine-tuned and measured): "
                    f"{outcome}; about {ratio_done:.0%} of channels removed")


def quantize_stage(ctx: Context, recipe: Recipe, module: Any, fp32: Candidate, reference: Candidate,
                   precision: str, soft: np.ndarray | None, seed: int) -> Candidate:
    """Post-training quantization; if validation accuracy drops past the gate: keep the most
    sensitive layers in float (up to max_float_layers), then (LiteRT) quantization-aware
    fine-tuning. The best attempt is returned; its `did` says everything that was tried."""
    q = recipe["quantize"]
    gate = recipe["gate"]["max_accuracy_drop_points"] / 100
    stats = (fp32.params, fp32.macs)
    n_cal = len(ctx.calibration)

    def attempt(float_layers: tuple[str, ...], did: str) -> Candidate:
        folder = ctx.new_dir("quantize")
        path = _quantize(ctx, module, fp32.model_file, precision, folder, float_layers)
        return assess(ctx, "quantize", path, module, precision, stats, did, float_layers)

    def within(c: Candidate) -> bool:
        return reference.val_accuracy - c.val_accuracy <= gate

    chosen = tuple(q["float_layers"])
    units = _units(ctx, module, fp32)
    if missing := [u for u in chosen if u not in units]:
        raise UsageError(f"quantize.float_layers: {', '.join(missing)} not found; "
                         f"{ctx.backend.name} layers: {', '.join(units)}")
    best = attempt(chosen, f"post-training {precision}, {n_cal} calibration samples"
                   + (f", {len(chosen)} layer(s) kept in float as the recipe asks"
                      if chosen else ""))
    if within(best) or not q["fallback"] or precision != "int8":
        return best
    if not within(fp32):
        best.did += ("; no fallback: the fp32 model was already over the accuracy gate "
                     "before quantization")
        return best
    if ctx.backend.capabilities.accuracy_aware:
        return _accuracy_aware(ctx, fp32, reference, precision, gate, best)
    tried = [f"post-training int8 dropped {(reference.val_accuracy - best.val_accuracy) * 100:.2f}"
             " validation points"]
    units = units[:16]  # sensitivity costs one export per unit
    scores = []
    for unit in units:
        folder = ctx.new_dir("sensitivity")
        try:
            path = _quantize(ctx, module, fp32.model_file, precision, folder, (unit,))
        except Exception as exc:  # a layer the quantizer cannot leave float: not a candidate
            ctx.log(f"sensitivity: {unit} cannot be kept in float alone ({type(exc).__name__})")
            continue
        val, _, _ = accuracy_in_backend(ctx, path)
        scores.append((val, unit))
    ranked = [u for _, u in sorted(scores, key=lambda s: -s[0])]
    ctx.log("sensitivity (validation accuracy with one layer in float): "
            + ", ".join(f"{u} {v:.2%}" for v, u in sorted(scores, key=lambda s: -s[0])[:5]))
    for k in range(1, min(q["max_float_layers"], len(ranked)) + 1):
        try:
            c = attempt(tuple(ranked[:k]), "")
        except Exception as exc:
            tried.append(f"{k} layer(s) in float could not be converted ({type(exc).__name__})")
            break
        c.did = "; ".join(tried) + f"; kept {k} most sensitive layer(s) in float"
        best = max(best, c, key=lambda x: x.val_accuracy)
        if within(c):
            return c
    tried.append(f"{q['max_float_layers']} layer(s) in float were not enough")
    if ctx.backend.capabilities.qat and module is not None and q["qat_epochs"]:
        try:
            c = _qat(ctx, recipe, module, fp32, precision, soft, seed)
        except Exception as exc:  # the PT2E QAT path is young; report it, keep the best PTQ
            tried.append(f"quantization-aware fine-tuning failed ({type(exc).__name__}: "
                         f"{str(exc)[:160]})")
        else:
            c.did = "; ".join(tried) + (f"; quantization-aware fine-tuning, "
                                        f"{q['qat_epochs']} epochs")
            if within(c) or c.val_accuracy > best.val_accuracy:
                return c
    else:
        tried.append(f"quantization-aware fine-tuning is not available for {ctx.backend.name}")
    best.did = "; ".join(tried) + f"; best attempt kept: {best.did or 'post-training int8'}"
    return best


def _units(ctx: Context, module: Any, fp32: Candidate) -> list[str]:
    """What the backend's quantizer can keep in float: torch module names or graph nodes."""
    return ctx.backend.float_units(module, fp32.model_file)


def _accuracy_aware(ctx: Context, fp32: Candidate, reference: Candidate, precision: str,
                    gate: float, ptq: Candidate) -> Candidate:
    """The backend's accuracy-aware quantization (NNCF's, for OpenVINO): the drop left to
    spend is the gate minus what the earlier stages already lost."""
    budget = max(0.0, gate - (reference.val_accuracy - fp32.val_accuracy))
    folder = ctx.new_dir("quantize")
    job = QuantizeJob(precision, fp32.model_file, fp32.module, ctx.x_test[:1], ctx.calibration,
                      folder)
    path = ctx.backend.quantize_accuracy_aware(job, ctx.x_val, ctx.y_val, budget)
    c = assess(ctx, "quantize", path, fp32.module, precision, (fp32.params, fp32.macs),
               f"post-training int8 dropped {(reference.val_accuracy - ptq.val_accuracy) * 100:.2f}"
               f" validation points; accuracy-aware quantization (max drop "
               f"{budget * 100:.2f} points) returned sensitive layers to float")
    return c if c.val_accuracy >= ptq.val_accuracy else ptq


def _qat(ctx: Context, recipe: Recipe, module: Any, fp32: Candidate, precision: str,
         soft: np.ndarray | None, seed: int) -> Candidate:
    q, d = recipe["quantize"], recipe["distill"]

    from torchao.quantization.pt2e import (
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    def set_mode(graph: Any, training: bool) -> None:
        if training:
            move_exported_model_to_train(graph)
        else:
            move_exported_model_to_eval(graph)

    def qat_train(graph: Any) -> None:
        train(graph, ctx.x_train, ctx.y_train, ctx.x_val, ctx.y_val, epochs=q["qat_epochs"],
              seed=seed, lr=d["lr"] / 10, log=ctx.log, teacher_logits=soft,
              temperature=d["temperature"], alpha=d["alpha"], set_mode=set_mode,
              recalibrate=False)

    folder = ctx.new_dir("qat")
    job = QuantizeJob(precision, fp32.model_file, copy.deepcopy(module), ctx.x_test[:1],
                      ctx.calibration, folder)
    path = ctx.backend.quantize_qat(job, qat_train)
    return assess(ctx, "quantize", path, module, precision, (fp32.params, fp32.macs), "")


