"""Fitting the cost model on this machine, checking it on held-out models, and calibrating a
profile from measurements made on its real device."""

from __future__ import annotations

import gc
import json
import math
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

import targets
from targets.base import Backend, Op, QuantizeJob
from toolchain.errors import UsageError
from toolchain.latency import costmodel
from toolchain.latency.micromodels import Item
from toolchain.profiles import HardwareProfile, ProfileSearch


def measure_items(items: list[Item], backend: str, precision: str, profile: HardwareProfile,
                  log: Callable[[str], None] = print, min_seconds: float = 0.25,
                  rounds: int = 5) -> list[tuple[str, list[Op], float]]:
    """Export each model to the backend (in `precision`), read its operators, and measure its
    p50 latency at batch 1 with the profile's thread count: the lowest of `rounds` p50s, the
    rounds interleaved across models. This machine is a shared VM whose second core is now
    and then busy elsewhere, which halves a 2-thread run; the lowest p50 is the machine's own
    speed, and the same statistic is used for fitting and for checking."""
    import torch

    from runtime.bench import time_runs
    from targets.export_log import converter_output_to

    plugin = targets.get(backend)
    prepared = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, factory, shape) in enumerate(items):
            torch.manual_seed(i)
            model = factory().eval()
            folder = Path(tmp) / f"{i:03d}"
            folder.mkdir()
            example = torch.randn(shape)
            try:
                with converter_output_to(folder / "export.log"):
                    path = plugin.export(model, example, folder)
                if precision != "fp32":
                    calibration = np.random.default_rng(i).standard_normal((16, *shape[1:]))
                    path = plugin.quantize(QuantizeJob(
                        precision, path, model, example.numpy(),
                        calibration.astype(np.float32), folder / "q"))
            except Exception as exc:  # e.g. a weightless micro-model has nothing to quantize
                log(f"{name}: skipped, {backend} {precision} export failed "
                    f"({type(exc).__name__})")
                continue
            prepared.append((name, path, example.numpy(), plugin.graph_ops(path)))
        p50s: list[list[float]] = [[] for _ in prepared]
        for _ in range(rounds):
            for i, (_, path, x, _) in enumerate(prepared):
                # one live session at a time, as on a device: an idle session's spinning
                # worker threads would steal the cores from the one being timed
                session = plugin.open_session(path, profile.threads)
                p50s[i].append(time_runs(session.run, x, 20, 50, min_seconds)["p50"])
                del session
                gc.collect()
    rows = []
    for (name, _, _, ops), times in zip(prepared, p50s, strict=True):
        rows.append((name, ops, float(np.min(times))))
        log(f"{name}: {rows[-1][2]:.4f} ms (rounds {', '.join(f'{t:.4f}' for t in times)}), "
            f"{len(ops)} ops")
    return rows


def fit_host(items: list[Item], backend: str, precision: str,
             log: Callable[[str], None] = print, save: bool = True,
             search: ProfileSearch | None = None) -> costmodel.Fit:
    search = search or ProfileSearch()
    host = search.load(costmodel.HOST_PROFILE)
    rows = measure_items(items, backend, precision, host, log)
    fitted = costmodel.fit([(costmodel.features(ops, host), ms) for _, ops, ms in rows],
                           backend, precision)
    if save:
        costmodel.save_fit(fitted, search)
    return fitted


def _bench_files(paths: list[Path]) -> list[dict[str, Any]]:
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"measurements {path}: not readable JSON ({exc})") from exc
        items = data if isinstance(data, list) else [data]
        for item in items:
            if "latency_ms" not in item or "bundle" not in item:
                raise UsageError(f"measurements {path}: expected `edge-runtime bench --json` "
                                 "output (with 'bundle' and 'latency_ms')")
            item.setdefault("_file", str(path))
            results.append(item)
    return results


def bundle_ops(bundle: Path) -> tuple[list[Op], Backend, str]:
    from runtime.bundle import BundleError, extract_bundle

    with tempfile.TemporaryDirectory() as tmp:
        try:
            manifest = extract_bundle(bundle, Path(tmp))
        except BundleError as exc:
            raise UsageError(f"bundle {bundle}: {exc}") from exc
        name = manifest.target.backend
        if name not in targets.BACKENDS:
            raise UsageError(f"bundle {bundle}: backend {name!r} is not registered here")
        backend = targets.get(name)
        ops = backend.graph_ops(Path(tmp) / manifest.model_file)
        return ops, backend, manifest.target.precision


def calibrate(profile_name: str, measurement_files: list[Path],
              bundles_dir: Path | None = None,
              search: ProfileSearch | None = None) -> dict[str, Any]:
    """Refit a profile's estimates from device measurements: one scale on all efficiency
    factors, the geometric mean of measured / estimated p50 over every measurement."""
    search = search or ProfileSearch()
    profile = search.load(profile_name)
    host = search.load(costmodel.HOST_PROFILE)
    ratios = []
    for item in _bench_files(measurement_files):
        bundle = Path(item["bundle"])
        if not bundle.exists() and bundles_dir is not None:
            bundle = bundles_dir / bundle.name
        if not bundle.exists():
            raise UsageError(f"measurements {item['_file']}: bundle {item['bundle']} not found "
                             "(pass --bundles DIR where the measured bundles are)")
        ops, backend, precision = bundle_ops(bundle)
        est = costmodel.estimate(ops, profile, backend, precision, host, use_calibration=False,
                                 search=search)
        ratios.append(float(item["latency_ms"]["p50"]) / est["p50"])
    scale = math.exp(float(np.mean(np.log(ratios))))
    record = {"profile": profile.name, "scale": scale, "measurements": len(ratios),
              "date": date.today().isoformat(),
              "spread": float(np.std(np.log(ratios))) if len(ratios) > 1 else 0.0}
    path = search.calibration_output(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    record["path"] = str(path)
    return record
