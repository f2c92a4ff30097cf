"""Fitting the cost model on this machine, checking it on held-out models, and calibrating a
profile from measurements made on its real device."""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import targets
from targets.base import Backend, Op, QuantizeJob
from toolchain.errors import ToolchainError, UsageError
from toolchain.latency import costmodel
from toolchain.latency.micromodels import Item
from toolchain.profiles import HardwareProfile, ProfileSearch


class Measured(NamedTuple):
    name: str
    ops: list[Op]
    ms: float  # the lowest of the rounds' p50s
    rounds: list[float]  # each round's p50

    @property
    def spread(self) -> float:
        """How far the slowest round's p50 is above the fastest's (0.5: 50% above)."""
        return max(self.rounds) / min(self.rounds) - 1


def measure_items(items: list[Item], backend: str, precision: str, profile: HardwareProfile,
                  log: Callable[[str], None] = print, min_seconds: float = 0.25,
                  rounds: int = 5, export_deadline_s: float | None = None,
                  min_models: int = 1) -> list[Measured]:
    """Export each model to the backend (in `precision`), read its operators, and measure its
    p50 latency at batch 1 with the profile's thread count: the lowest of `rounds` p50s, the
    rounds interleaved across models. This machine is a shared VM whose second core is now
    and then busy elsewhere, which halves a 2-thread run; the lowest p50 is the machine's own
    speed, and the same statistic is used for fitting and for checking. With
    `export_deadline_s`, no model is started after that many seconds once `min_models` are
    ready (the items are taken in order, the most telling first)."""
    import torch

    from runtime.bench import time_runs
    from targets.export_log import converter_output_to

    plugin = targets.get(backend)
    prepared = []
    started = time.monotonic()
    # seeded per model, without moving the caller's random state (a build calibrates midway)
    with tempfile.TemporaryDirectory(prefix="edgepack-fit-") as tmp, torch.random.fork_rng():
        for i, (name, factory, shape) in enumerate(items):
            if (export_deadline_s is not None and len(prepared) >= min_models
                    and time.monotonic() - started > export_deadline_s):
                log(f"time is up after {len(prepared)} of {len(items)} models; measuring those")
                break
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
            log(f"[{i + 1}/{len(items)}] {name}: exported")
        p50s: list[list[float]] = [[] for _ in prepared]
        for r in range(rounds):
            log(f"measuring {len(prepared)} models, round {r + 1}/{rounds}")
            for i, (_, path, x, _) in enumerate(prepared):
                # one live session at a time, as on a device: an idle session's spinning
                # worker threads would steal the cores from the one being timed
                session = plugin.open_session(path, profile.threads)
                p50s[i].append(time_runs(session.run, x, 20, 50, min_seconds)["p50"])
                del session
                gc.collect(0)  # the young generation holds a fresh session's cycles, if any;
                # a full collection with torch loaded takes 0.3 s, more than most timings
    rows = []
    for (name, _, _, ops), times in zip(prepared, p50s, strict=True):
        rows.append(Measured(name, ops, float(np.min(times)), times))
        log(f"{name}: {rows[-1].ms:.4f} ms (rounds {', '.join(f'{t:.4f}' for t in times)}), "
            f"{len(ops)} ops")
    return rows


def fit_host(items: list[Item], backend: str, precision: str,
             log: Callable[[str], None] = print, save: bool = True,
             search: ProfileSearch | None = None) -> costmodel.Fit:
    """The full fit for this CPU: every micro-model, all coefficients refitted."""
    from toolchain.host import detect
    from toolchain.latency import fitstore, selfcal

    search = search or ProfileSearch()
    host = search.load(costmodel.HOST_PROFILE)
    started = time.monotonic()
    load_before = selfcal.load_per_core()
    rows = measure_items(items, backend, precision, host, log)
    if not rows:
        raise ToolchainError(f"no micro-model could be exported to {backend} {precision}")
    fitted = costmodel.fit([(costmodel.features(m.ops, host), m.ms) for m in rows],
                           backend, precision)
    fitted.wall_s = round(time.monotonic() - started, 1)
    fitted.spread, fitted.busy_note = selfcal.busy(rows, load_before)
    if save:
        fitstore.save(fitted, search, detect())
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
    used: dict[str, Any] | None = None
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
        used = est.get("fit") or used
    scale = math.exp(float(np.mean(np.log(ratios))))
    record = {"profile": profile.name, "scale": scale, "measurements": len(ratios),
              "date": date.today().isoformat(),
              "spread": float(np.std(np.log(ratios))) if len(ratios) > 1 else 0.0,
              # the scale corrects this fit's estimates; another fit's it only approximates
              **({"fit": costmodel.fit_identity(used)} if used else {})}
    path = search.calibration_output(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    record["path"] = str(path)
    return record
