"""`toolchain profile`: how fast, how big, how much memory, on a target, and how sure we are.

Measured on this machine (the real backend, the target's thread count, in a fresh torch-free
process): latency percentiles with their spread, cold start, peak memory, size on disk, and
per-layer times where the backend offers them. Estimated for the target by the cost model,
labelled as such, beside the measurement. Budgets checked; the caller exits 3 on a miss."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from targets import BACKENDS, backend_module
from toolchain import costmodel
from toolchain.assess import measure_fresh
from toolchain.errors import ToolchainError, UsageError
from toolchain.graph_ops import graph_ops
from toolchain.profiles import HardwareProfile, load_profile

TOP_LAYERS = 10


def layer_times(backend: str, model_file: Path, threads: int, shape: tuple[int, ...],
                runs: int = 50) -> tuple[list[dict[str, Any]], str]:
    """Per-layer mean times from the backend's own profiler, slowest first."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    totals: dict[tuple[str, str], float] = {}
    if backend == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.enable_profiling = True
        options.intra_op_num_threads = threads
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
        session = ort.InferenceSession(str(model_file), options,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(runs):
            session.run(None, {name: x})
        trace = Path(session.end_profiling())
        for event in json.loads(trace.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                key = (event["name"][: -len("_kernel_time")],
                       event.get("args", {}).get("op_name", ""))
                totals[key] = totals.get(key, 0.0) + event["dur"] / 1000
        source = "ONNX Runtime profiler"
    elif backend == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(model_file), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True,
            "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        for _ in range(runs):
            request.infer({0: x})
            for info in request.profiling_info:
                key = (info.node_name, info.node_type)
                totals[key] = totals.get(key, 0.0) + info.real_time.total_seconds() * 1000
        source = "OpenVINO performance counters"
    else:
        return [], (f"{backend} offers no per-layer timing through its Python API "
                    "(LiteRT's op profiler lives in the C++ benchmark tool)")
    whole = sum(totals.values()) or 1.0
    layers = [{"name": n, "type": t, "ms": ms / runs, "share": ms / whole}
              for (n, t), ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    return layers, source


def _budgets(profile: HardwareProfile, latency_p95: float, latency_source: str,
             size_bytes: int, peak_rss_mb: float) -> list[dict[str, Any]]:
    from toolchain.report import budget

    b = profile.budgets
    return [
        budget("p95_latency_ms", b.p95_latency_ms, round(latency_p95, 4), latency_source),
        budget("bundle_size_mb", b.bundle_size_mb, round(size_bytes / 2**20, 4)),
        budget("peak_memory_mb", b.peak_memory_mb, round(peak_rss_mb, 1),
               "peak RSS of the runtime process on this host"),
    ]


def profile(source: str, target: str, *, input_shape: tuple[int, ...] | None = None,
            runs: int = 300, min_seconds: float = 2.0,
            trust_pickle: bool = False) -> dict[str, Any]:
    prof = load_profile(target)
    host = load_profile(costmodel.HOST_PROFILE)
    with tempfile.TemporaryDirectory(prefix="edgepack-profile-") as tmp:
        model_file, backend, precision, shape, size = _materialize(
            source, prof, Path(tmp), input_shape, trust_pickle)
        measured = measure_fresh(backend, model_file, prof.threads, shape, runs,
                                 min_seconds=min_seconds, warmup=50, samples=True)
        ops = graph_ops(model_file)
        layers, layers_source = layer_times(backend, model_file, prof.threads, shape)
    lat = measured["latency_ms"]
    samples = lat.pop("samples", [])
    tail = lat["p95"] / lat["p50"] if lat["p50"] else 1.0
    on_host = costmodel.estimate(ops, host, backend, precision, host)
    result: dict[str, Any] = {
        "source": source,
        "target": prof.name,
        "device": prof.device,
        "backend": backend,
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
    }
    if prof.measurable_on_host:
        result["budgets"] = _budgets(prof, lat["p95"], "measured on this host", size,
                                     measured["peak_rss_mb"])
    else:
        est = costmodel.estimate(ops, prof, backend, precision, host)
        est["p95"] = round(est["p50"] * tail, 4)
        est["p95_note"] = "p50 estimate times the tail ratio p95/p50 measured on this host"
        result["estimated_target"] = est
        result["budgets"] = _budgets(prof, est["p95"], f"{est['source']}, not measured", size,
                                     measured["peak_rss_mb"])
    return result


def _materialize(source: str, prof: HardwareProfile, work: Path,
                 input_shape: tuple[int, ...] | None,
                 trust_pickle: bool) -> tuple[Path, str, str, tuple[int, ...], int]:
    """(model file, backend, precision, input shape, size on disk) for a bundle or a model."""
    if source.endswith(".edgepack"):
        from runtime.bundle import BundleError, extract_bundle

        if not Path(source).is_file():
            raise UsageError(f"bundle {source!r} not found")
        try:
            manifest = extract_bundle(Path(source), work / "bundle")
        except BundleError as exc:
            raise UsageError(f"bundle {source}: {exc}") from exc
        backend = manifest["target"]["backend"]
        if backend not in BACKENDS or backend_module(backend).run_unavailable_reason():
            raise UsageError(f"bundle {source} needs backend {backend!r}, which cannot run here")
        shape = (1, *manifest["input"]["raw_shape"])
        return (work / "bundle" / manifest["model_file"], backend,
                manifest["target"]["precision"], shape, Path(source).stat().st_size)
    return _export_model(source, prof, work, input_shape, trust_pickle)


def _export_model(ref: str, prof: HardwareProfile, work: Path,
                  input_shape: tuple[int, ...] | None,
                  trust_pickle: bool) -> tuple[Path, str, str, tuple[int, ...], int]:
    import torch

    from targets.export_log import converter_output_to, log_tail
    from toolchain.ingest import ingest_model
    from toolchain.pipeline import choose_backend
    from toolchain.progress import Progress

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
    backend = choose_backend(prof, model, [], Progress(quiet=True))
    module = backend_module(backend)
    source: Any = model.onnx_path if model.kind == "onnx" else model.module
    example: Any = torch.zeros(shape) if model.kind == "torch" else np.zeros(shape)
    log = work / "export.log"
    try:
        with converter_output_to(log):
            path = module.export(source, example, work)
    except Exception as exc:
        raise ToolchainError(f"export to {backend} failed: {exc}\n{log_tail(log)}") from exc
    size = sum(f.stat().st_size for f in module.model_files(path))
    return path, backend, "fp32", shape, size
