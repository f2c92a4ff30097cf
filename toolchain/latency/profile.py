"""`toolchain profile`: how fast, how big, how much memory, on a target, and how sure we are.

Measured on this machine (the real backend, the target's thread count, in a fresh torch-free
process): latency percentiles with their spread, cold start, peak memory, size on disk, and
per-layer times where the backend offers them. Estimated for the target by the cost model,
labelled as such, beside the measurement. Budgets checked; the caller exits 3 on a miss."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import targets
from targets.base import Backend
from toolchain.errors import ToolchainError, UsageError
from toolchain.latency import costmodel, floors, selfcal
from toolchain.latency.measure import measure_fresh
from toolchain.profiles import HardwareProfile, ProfileSearch

TOP_LAYERS = 10


def _budgets(profile: HardwareProfile, latency_p95: float, latency_source: str,
             size_bytes: int, peak_rss_mb: float) -> list[dict[str, Any]]:
    from toolchain.budgets import budget

    b = profile.budgets
    return [
        budget("p95_latency_ms", b.p95_latency_ms, round(latency_p95, 4), latency_source),
        budget("bundle_size_mb", b.bundle_size_mb, round(size_bytes / 2**20, 4)),
        budget("peak_memory_mb", b.peak_memory_mb, round(peak_rss_mb, 1),
               "peak RSS of the runtime process on this host"),
    ]


def profile(source: str, target: str, *, input_shape: tuple[int, ...] | None = None,
            runs: int = 300, min_seconds: float = 2.0,
            trust_pickle: bool = False, search: ProfileSearch | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`log` gets the progress of the cost model's calibration, when this CPU needs one."""
    search = search or ProfileSearch()
    prof = search.load(target)
    host = search.load(costmodel.HOST_PROFILE)
    with tempfile.TemporaryDirectory(prefix="edgepack-profile-") as tmp:
        model_file, backend, precision, shape, size = _materialize(
            source, prof, Path(tmp), input_shape, trust_pickle)
        # before measuring, so the calibration's work is over while the model is timed
        calibration = selfcal.ensure_host_fit(backend.name, precision, search,
                                              log or (lambda _: None))
        measured = measure_fresh(backend.name, model_file, prof.threads, shape, runs,
                                 min_seconds=min_seconds, warmup=50, samples=True)
        ops = backend.graph_ops(model_file)
        layers, layers_source = backend.layer_times(model_file, prof.threads, shape)
    lat = measured["latency_ms"]
    samples = lat.pop("samples", [])
    on_host = costmodel.estimate(ops, host, backend, precision, host, search=search)
    result: dict[str, Any] = {
        "source": source,
        "target": prof.name,
        "device": prof.device,
        "backend": backend.name,
        "precision": precision,
        "threads": prof.threads,
        "ops": len(ops),
        "macs": int(sum(o.macs for o in ops if o.kind in ("conv", "depthwise", "matmul"))),
        "measured_host": {"latency_ms": lat, "cold_start_ms": measured["cold_start_ms"],
                          "peak_rss_mb": measured["peak_rss_mb"], "size_bytes": size,
                          "source": "measured-host"},
        "estimated_host": on_host,
        "layers": layers[:TOP_LAYERS],
        "layers_source": layers_source,
        "samples_ms": samples,
        "notes": [n for n in (floors.host_stretch_note(samples), floors.host_tail_note(lat))
                  if n],
    }
    result["host_busy"] = bool(result["notes"])
    if calibration:
        result["calibration"] = calibration
    if prof.measurable_on_host:
        result["budgets"] = _budgets(prof, lat["p95"], "measured on this host", size,
                                     measured["peak_rss_mb"])
    else:
        est = floors.with_target_tail(
            costmodel.estimate(ops, prof, backend, precision, host, search=search), prof)
        result["estimated_target"] = est
        result["budgets"] = _budgets(prof, est["p95"], f"{est['source']}, not measured", size,
                                     measured["peak_rss_mb"])
    return result


def _materialize(source: str, prof: HardwareProfile, work: Path,
                 input_shape: tuple[int, ...] | None,
                 trust_pickle: bool) -> tuple[Path, Backend, str, tuple[int, ...], int]:
    """(model file, backend, precision, input shape, size on disk) for a bundle or a model."""
    if source.endswith(".edgepack"):
        from runtime.bundle import BundleError, extract_bundle

        if not Path(source).is_file():
            raise UsageError(f"bundle {source!r} not found")
        try:
            manifest = extract_bundle(Path(source), work / "bundle")
        except BundleError as exc:
            raise UsageError(f"bundle {source}: {exc}") from exc
        name = manifest.target.backend
        if name not in targets.BACKENDS or targets.get(name).run_unavailable_reason():
            raise UsageError(f"bundle {source} needs backend {name!r}, which cannot run here")
        shape = (1, *manifest.input.raw_shape)
        return (work / "bundle" / manifest.model_file, targets.get(name),
                manifest.target.precision, shape, Path(source).stat().st_size)
    return _export_model(source, prof, work, input_shape, trust_pickle)


def _export_model(ref: str, prof: HardwareProfile, work: Path,
                  input_shape: tuple[int, ...] | None,
                  trust_pickle: bool) -> tuple[Path, Backend, str, tuple[int, ...], int]:
    import torch

    from targets.export_log import converter_output_to, log_tail
    from toolchain.build.ingest import ingest_model

    model = ingest_model(ref, in_channels=input_shape[1] if input_shape else None,
                         num_classes=None, pretrained=True, trust_pickle=trust_pickle)
    if input_shape is None and model.kind == "onnx":
        import onnx

        dims = onnx.load(str(model.onnx_path)).graph.input[0].type.tensor_type.shape.dim
        input_shape = tuple(d.dim_value or 1 for d in dims)
    if input_shape is None:
        raise UsageError(f"model {ref} does not carry its input shape: pass --input-shape, "
                         "e.g. --input-shape 1,3,224,224")
    shape = (1, *input_shape[1:])
    try:
        backend, _ = targets.choose(prof.backends, from_onnx=model.kind == "onnx")
    except targets.NoBackend as exc:
        raise ToolchainError(f"no backend of profile {prof.name} can be built here: "
                             f"{exc}") from exc
    source: Any = model.onnx_path if model.kind == "onnx" else model.module
    example: Any = torch.zeros(shape) if model.kind == "torch" else np.zeros(shape)
    log = work / "export.log"
    try:
        with converter_output_to(log):
            path = backend.export(source, example, work)
    except Exception as exc:
        raise ToolchainError(f"export to {backend.name} failed: {exc}\n{log_tail(log)}") from exc
    size = sum(f.stat().st_size for f in backend.model_files(path))
    return path, backend, "fp32", shape, size
