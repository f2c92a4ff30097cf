"""The build, top to bottom: ingest, train, (distill, prune, quantize: not yet part of the
build), export, evaluate, measure, package. Each stage is a plain step in `build`; the
helpers below it do one thing each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import toolchain
from runtime import preprocess
from runtime.bundle import SUFFIX
from targets import BACKENDS, backend_module
from targets.base import ExportUnsupported
from targets.export_log import converter_output_to, log_tail
from toolchain import report as rep
from toolchain.data import Dataset, load_data
from toolchain.errors import ToolchainError, UsageError
from toolchain.ingest import IngestedModel, check_fits, ingest_model
from toolchain.profiles import HardwareProfile, load_profile
from toolchain.progress import Progress

DEFAULT_EPOCHS = 15
GOLDEN_COUNT = 8
MIB = 1024 * 1024


@dataclass
class BuildOptions:
    target: str
    model: str | None = None
    data: str = "digits"
    out_dir: Path = Path("build")
    json_path: Path | None = None
    seed: int = 0
    epochs: int | None = None
    pretrained: bool = False
    trust_pickle: bool = False
    model_version: str = "1"
    sign_key: bytes | None = None
    image_size: int = 32
    bench_runs: int = 200
    notes: list[str] = field(default_factory=list)


def build(opts: BuildOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole build; returns the report (also written to `opts.json_path`).
    Raises UsageError for bad input before anything is written to `opts.out_dir`."""
    progress = progress or Progress()
    notes = opts.notes
    profile = load_profile(opts.target)

    with progress.stage("ingest", f"target {profile.name}: {profile.description}"):
        data = load_data(opts.data, opts.seed, opts.image_size)
        progress.log(data.describe())
        model = ingest_model(opts.model, in_channels=data.sample_shape[0],
                             num_classes=data.num_classes, pretrained=opts.pretrained,
                             trust_pickle=opts.trust_pickle, seed=opts.seed)
        progress.log(model.description)
        prep = preprocess.normalization(data.mean, data.std)
        x_train, x_val, x_test = (preprocess.apply(prep, x)
                                  for x in (data.x_train, data.x_val, data.x_test))
        check_fits(model, x_test, data.num_classes)

    if model.needs_training:
        epochs = opts.epochs or DEFAULT_EPOCHS
        with progress.stage("train", f"{epochs} epochs on {len(x_train)} samples"):
            import torch

            torch.set_num_threads(max(1, torch.get_num_threads()))
            from toolchain.train import train

            train(model.module, x_train, data.y_train, x_val, data.y_val, epochs=epochs,
                  seed=opts.seed, log=progress.log)
    elif opts.epochs:
        notes.append(f"--epochs ignored: {model.description}")

    # Compression (distillation, structured pruning, quantization) slots in here, between
    # training and export, once it is built. Until then the bundle is the fp32 model.
    precision = "fp32"
    if profile.precision != "fp32":
        notes.append(f"profile {profile.name} asks for {profile.precision}; this build does "
                     f"not quantize yet, so the bundle is fp32")
    if model.kind == "onnx":
        notes.append("the model is an ONNX graph: training and graph-changing stages do not "
                     "apply to it; it is exported as given")

    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as tmp:
        work = Path(tmp)
        with progress.stage("export", f"preference {' > '.join(profile.backends)}"):
            backend, model_file = _export(profile, model, x_test[:1], work, notes, progress)
            progress.log(f"{backend}: {model_file.name}, {model_file.stat().st_size} bytes")
        with progress.stage("evaluate", f"{len(x_test)} held-out test samples in {backend}"):
            session = backend_module(backend).open_session(model_file, profile.threads)
            test_logits = session.run(x_test)
            accuracy = float(np.mean(test_logits.argmax(-1) == data.y_test))
            val_logits = session.run(x_val)
            progress.log(f"test accuracy {accuracy:.2%}")
            params, macs = _stats(model, x_test, model_file, work)
        cores = os.cpu_count() or 1
        if profile.threads > cores:
            notes.append(f"latency measured with the profile's {profile.threads} threads on a "
                         f"host with {cores} cores: oversubscribed, slower than the target")
        with progress.stage("measure", f"{backend}, {profile.threads} thread(s), batch 1"):
            measured = _measure(backend, model_file, profile.threads,
                                (1, *data.sample_shape), opts.bench_runs)
            lat = measured["latency_ms"]
            progress.log(f"p50 {lat['p50']:.3f} ms, p95 {lat['p95']:.3f} ms over "
                         f"{lat['runs']} runs; peak RSS {measured['peak_rss_mb']:.0f} MiB")
        latency = {"p50": round(lat["p50"], 4), "p95": round(lat["p95"], 4),
                   "source": "measured-host", "threads": profile.threads}
        reference = rep.model_metrics(accuracy, model_file.stat().st_size, params, macs, latency)
        final = dict(reference)  # no compression stage yet: the final model is the reference
        with progress.stage("package"):
            name = _safe_name(model.name)
            bundle_path = opts.out_dir / f"{name}-{profile.name}{SUFFIX}"
            golden = data.x_test[:GOLDEN_COUNT]
            bundle_path = _package(opts, profile, backend, precision, model, data, prep,
                                   session, model_file, work, golden, val_logits,
                                   {"reference": reference, "final": final,
                                    "peak_rss_mb": measured["peak_rss_mb"],
                                    "cold_start_ms": measured["cold_start_ms"]},
                                   bundle_path, name)
            progress.log(f"{bundle_path} ({bundle_path.stat().st_size} bytes)")

    report = {
        "target": profile.name,
        "backend": backend,
        "precision": precision,
        "threads": profile.threads,
        "bundle": str(bundle_path),
        "reference": reference,
        "final": final,
        "budgets": _budgets(profile, reference, final, bundle_path.stat().st_size,
                            measured["peak_rss_mb"]),
        "stages": progress.timings,
        "notes": notes,
    }
    if opts.json_path:
        rep.write_json(opts.json_path, report)
    return report


def _export(profile: HardwareProfile, model: IngestedModel, example: np.ndarray, work: Path,
            notes: list[str], progress: Progress) -> tuple[str, Path]:
    """Export to the first backend in the profile's preference list that exists, runs here
    and can be made from this model; every fallback is recorded in the notes."""
    skipped: list[str] = []
    for backend in profile.backends:
        if backend not in BACKENDS:
            skipped.append(f"{backend} (not implemented yet)")
            continue
        module = backend_module(backend)
        if reason := module.run_unavailable_reason():
            skipped.append(f"{backend} ({reason})")
            continue
        log = work / f"export-{backend}.log"
        source: Any = model.onnx_path if model.kind == "onnx" else model.module
        try:
            if model.kind == "torch":
                import torch

                example_in: Any = torch.from_numpy(example)
            else:
                example_in = example
            with converter_output_to(log):
                path = module.export(source, example_in, work)
        except ExportUnsupported as exc:
            skipped.append(f"{backend} ({exc})")
            continue
        except Exception as exc:
            raise ToolchainError(f"export to {backend} failed: {exc}\n{log_tail(log)}") from exc
        if skipped:
            note = (f"profile {profile.name} prefers {', '.join(skipped)}; "
                    f"fell back to {backend}")
            notes.append(note)
            progress.log(note)
        return backend, path
    raise ToolchainError(f"no backend of profile {profile.name} can be built here: "
                         f"{'; '.join(skipped)}")


def _stats(model: IngestedModel, x: np.ndarray, model_file: Path, work: Path) -> tuple[int, int]:
    from toolchain.stats import onnx_stats, torch_stats

    if model.kind == "onnx":
        return onnx_stats(model.onnx_path)
    if model_file.suffix == ".onnx":
        return onnx_stats(model_file)
    try:
        return torch_stats(model.module, x)
    except Exception:  # e.g. an ExportedProgram's graph module: count on an ONNX export
        from targets import onnxruntime_backend

        folder = work / "stats"
        folder.mkdir()
        import torch

        with converter_output_to(work / "stats.log"):
            path = onnxruntime_backend.export(model.module, torch.from_numpy(x[:1]), folder)
        return onnx_stats(path)


def _measure(backend: str, model_file: Path, threads: int, shape: tuple[int, ...],
             runs: int) -> dict[str, Any]:
    """Time the exported model in a fresh process that has only the runtime and the backend
    (no torch), with the target's thread count: the latency a device runtime would see."""
    cmd = [sys.executable, "-m", "runtime.bench", str(model_file), "--backend", backend,
           "--threads", str(threads), "--input-shape", ",".join(map(str, shape)),
           "--runs", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ToolchainError(f"latency measurement failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def _package(opts: BuildOptions, profile: HardwareProfile, backend: str, precision: str,
             model: IngestedModel, data: Dataset, prep: dict[str, Any], session: Any,
             model_file: Path, work: Path, golden: np.ndarray, val_logits: np.ndarray,
             metrics: dict[str, Any], bundle_path: Path, name: str) -> Path:
    from toolchain.package import package, reference_distributions

    golden_out = session.run(preprocess.apply(prep, golden))
    return package(
        out_path=bundle_path, work=work, model_file=model_file, model_name=name,
        model_version=opts.model_version, profile=profile, backend=backend,
        precision=precision, input_spec=session.input, output_spec=session.output,
        raw_shape=data.sample_shape, preprocessing=prep, labels=data.labels,
        golden_inputs=golden, golden_outputs=golden_out,
        distributions=reference_distributions(
            data.x_val, val_logits, data.labels,
            f"validation split of {data.name} ({len(data.x_val)} samples)"),
        metrics=metrics,
        provenance={
            "source_model": model.description,
            "source_model_sha256": model.source_sha256,
            "data": data.name,
            "data_sha256": data.sha256,
            "recipe": {"epochs": opts.epochs or (DEFAULT_EPOCHS if model.needs_training
                                                 else 0),
                       "stages": ["train"] if model.needs_training else []},
            "seed": opts.seed,
            "toolchain_version": toolchain.__version__,
        },
        key=opts.sign_key,
    )


def _budgets(profile: HardwareProfile, reference: dict, final: dict, bundle_bytes: int,
             peak_rss_mb: float) -> list[dict[str, Any]]:
    b = profile.budgets
    drop = round((reference["accuracy"] - final["accuracy"]) * 100, 4)
    if profile.measurable_on_host:
        latency = rep.budget("p95_latency_ms", b.p95_latency_ms, final["latency_ms"]["p95"])
    else:
        latency = rep.budget(
            "p95_latency_ms", b.p95_latency_ms, None,
            f"latency was measured on this host, not on the target ({profile.device})")
    return [
        rep.budget("max_accuracy_drop_points", b.max_accuracy_drop_points, drop),
        rep.budget("bundle_size_mb", b.bundle_size_mb, round(bundle_bytes / MIB, 4)),
        latency,
        rep.budget("peak_memory_mb", b.peak_memory_mb, round(peak_rss_mb, 1),
                   "peak RSS of the runtime process on this host"),
    ]


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not cleaned:
        raise UsageError(f"model name {name!r} gives an empty file name")
    return cleaned
