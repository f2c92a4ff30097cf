"""The cost model calibrates itself on each CPU it meets.

The first time an estimate needs a backend and precision on a CPU with no fit of its own, a
short calibration measures a dozen micro-models of the fitting set (`micromodels.quick_set`;
exports stop after `EXPORT_BUDGET_S`, so it stays well under a minute) and rescales the reference
fit to them: one factor per op kind's arithmetic, one for the fixed cost of an op, one for
memory traffic and one for the per-inference cost (`GROUPS`), each pulled toward the overall
factor so a kind that few models exercise keeps the overall speed-up. The result is stored in
your data folder under the CPU's signature (`fitstore.py`); `toolchain profiles fit` is the
full refit.

The measurements follow the fitting code's hygiene: the lowest of interleaved per-round
medians, one live session at a time. How far repeated medians of the same model lay apart, and
the load average before starting, are recorded; a calibration on a busy host says so.

`EDGEPACK_HOST_CALIBRATION=off` turns the automatic calibration off (estimates then use the
reference fit, labelled with the CPU it was measured on)."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import time
from collections.abc import Callable, Iterator
from datetime import date

import numpy as np

from targets.base import KINDS
from toolchain.errors import ToolchainError
from toolchain.host import HostCPU, detect
from toolchain.latency import costmodel, fitstore
from toolchain.profiles import HardwareProfile, ProfileSearch

ENV = "EDGEPACK_HOST_CALIBRATION"
EXPORT_BUDGET_S = 28.0  # no model is exported after this; measuring then takes about 8 s more
MIN_MODELS = 6
ROUNDS = 7
MIN_SECONDS = 0.08  # per model per round (and at least 50 runs)
RIDGE = 0.5  # pull of each kind's factor toward the overall factor, in relative-error units
BUSY_SPREAD = 0.5  # repeated medians of one model 50% apart (the median model): a busy host
LOCK_WAIT_S = 300.0  # waiting for another process's calibration of the same CPU

# What the calibration scales, each by a factor of its own: the arithmetic of each op kind, the
# fixed cost of an op (one factor for every kind: dispatching an op and handing it between
# threads is the same work whatever the op computes), memory traffic, and the per-inference
# cost. Scaling an op kind's fixed cost with its arithmetic instead put 3.9 us on every small
# convolution of a MobileNet here (they cost 2-3 us) and overestimated torchvision's small
# models by 30-90%.
GROUPS: dict[str, tuple[str, ...]] = {
    **{kind: (f"compute_{kind}",) for kind in ("conv", "depthwise", "matmul", "pooling")},
    "elementwise": ("compute_elementwise", "compute_other"),
    "per_op": tuple(f"per_op_{kind}" for kind in KINDS),
    "memory": ("memory",),
    "per_inference": ("per_inference",),
}


def enabled() -> bool:
    return os.environ.get(ENV, "auto").strip().lower() not in ("off", "0", "no", "false")


def load_per_core() -> float:
    try:
        return os.getloadavg()[0] / max(detect().cores, 1)
    except (OSError, AttributeError):  # not every platform has a load average
        return 0.0


def busy(rows: list, load_before: float) -> tuple[float, str]:
    """(median spread of repeated medians, a note when the host looked busy, else "")."""
    spread = float(np.median([m.spread for m in rows])) if rows else 0.0
    notes = []
    if spread >= BUSY_SPREAD:
        notes.append(f"repeated medians of the same model lay {spread:.0%} apart (median "
                     "over models)")
    if load_before >= 1.0:
        notes.append(f"load average {load_before:.1f} per core before starting")
    note = ("the host looked busy while measuring: " + "; ".join(notes) +
            "; the lowest median of each model was used") if notes else ""
    return round(spread, 3), note


def rescale(reference: costmodel.Fit, rows: list[tuple[np.ndarray, float]],
            ridge: float = RIDGE) -> tuple[dict[str, float], dict[str, float]]:
    """(new coefficients, factor per group): the reference's coefficients times one factor per
    group, fitted by non-negative least squares on relative error, each factor pulled toward
    the overall (geometric-mean) factor by `ridge`."""
    from scipy.optimize import nnls

    ref = reference.vector()
    index = {name: i for i, name in enumerate(costmodel.FEATURES)}
    names = list(GROUPS)
    measured = np.array([y for _, y in rows])
    contrib = np.zeros((len(rows), len(names)))
    for g, group in enumerate(names):
        cols = [index[k] for k in GROUPS[group]]
        contrib[:, g] = np.stack([f[cols] @ ref[cols] for f, _ in rows])
    predicted = contrib.sum(axis=1)
    usable = predicted > 0
    if not usable.any():
        raise ToolchainError("the reference fit predicts nothing for these models")
    overall = math.exp(float(np.mean(np.log(measured[usable] / predicted[usable]))))
    a = np.vstack([contrib / measured[:, None], ridge * np.eye(len(names)) / overall])
    b = np.concatenate([np.ones(len(rows)), ridge * np.ones(len(names))])
    factors, _ = nnls(a, b)
    # a group no model exercised has no evidence either way: it takes the overall factor
    factors = np.where(contrib.sum(axis=0) > 0, factors, overall)
    coef = ref.copy()
    for g, group in enumerate(names):
        for k in GROUPS[group]:
            coef[index[k]] *= factors[g]
    return (dict(zip(costmodel.FEATURES, map(float, coef), strict=True)),
            {n: round(float(f), 3) for n, f in zip(names, factors, strict=True)})


def calibrate(backend: str, precision: str, search: ProfileSearch | None = None,
              log: Callable[[str], None] = print, cpu: HostCPU | None = None,
              export_budget_s: float = EXPORT_BUDGET_S,
              min_models: int = MIN_MODELS) -> costmodel.Fit:
    """Measure the quick set on this CPU, rescale the reference fit to it, store the result."""
    import targets
    from toolchain.latency.calibrate import measure_items
    from toolchain.latency.micromodels import quick_set

    search = search or ProfileSearch()
    cpu = cpu or detect()
    host = search.load(costmodel.HOST_PROFILE)
    plugin = targets.get(backend)
    reference = fitstore.reference(search, plugin, precision)
    if reference is None:
        raise ToolchainError(f"no reference fit for {backend}/{precision} to calibrate")
    started = time.monotonic()
    load_before = load_per_core()
    rows = measure_items(quick_set(), backend, precision, host, log, min_seconds=MIN_SECONDS,
                         rounds=ROUNDS, export_deadline_s=export_budget_s,
                         min_models=min_models)
    if len(rows) < 2:
        raise ToolchainError(f"only {len(rows)} micro-model(s) could be exported to "
                             f"{backend} {precision}; too few to calibrate")
    feats = [(costmodel.features(m.ops, host), m.ms) for m in rows]
    coefficients, factors = rescale(reference.fit, feats)
    vector = np.array([coefficients[k] for k in costmodel.FEATURES])
    errors = [abs(f @ vector - y) / y for f, y in feats]
    spread, note = busy(rows, load_before)
    fitted = costmodel.Fit(
        backend, precision, coefficients, date.today().isoformat(), len(rows),
        costmodel.HOST_PROFILE, float(np.median(errors)), cpu.record(), method="calibration",
        base=(f"the reference {reference.key} fit of {reference.fit.fit_date} "
              f"({reference.cpu_description}) by kind: "
              + ", ".join(f"{k} x{v:g}" for k, v in factors.items())),
        wall_s=round(time.monotonic() - started, 1), spread=spread, busy_note=note)
    fitstore.save(fitted, search, cpu)
    return fitted


@contextlib.contextmanager
def cpu_lock(search: ProfileSearch, cpu: HostCPU, deadline_s: float = LOCK_WAIT_S,
             log: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold this CPU's calibration lock (True), or give up after `deadline_s` (False): two
    processes that calibrate or fit the same CPU take turns, and neither times the other's
    work. OSError when the data folder cannot hold the lock file."""
    path = fitstore.cpu_file(search, cpu).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        end = time.monotonic() + deadline_s
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    yield False
                    return
                if log and not said:
                    log(f"waiting for another process's calibration of this CPU (up to "
                        f"{deadline_s:.0f} s)")
                    said = True
                time.sleep(0.5)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def needs_fit(profile: HardwareProfile) -> bool:
    """GPU profiles are estimated by the kernel model, not by a CPU fit."""
    return profile.fixed.executor != "gpu"


def needed(backend: str, precision: str, search: ProfileSearch | None = None) -> bool:
    """Whether an estimate for this backend and precision would calibrate this CPU first: it
    is on, the backend builds and runs here, a reference fit covers it (its own or one of its
    declared stand-ins'), and this CPU has no fit of its own for it."""
    import targets

    if not enabled() or backend not in targets.BACKENDS:
        return False
    plugin = targets.get(backend)
    if plugin.run_unavailable_reason() or plugin.build_unavailable_reason():
        return False
    search = search or ProfileSearch()
    if fitstore.reference(search, plugin, precision) is None:
        return False  # nothing to rescale: its estimates stay the labelled roofline
    try:
        return f"{backend}/{precision}" not in fitstore.host_fits(search, detect())
    except fitstore.FitFileError:
        return True  # damaged: the calibration replaces it


def ensure_host_fit(backend: str, precision: str, search: ProfileSearch | None = None,
                    log: Callable[[str], None] = print) -> str | None:
    """Calibrate this CPU for the backend and precision unless it has its own fit already,
    calibration is off, or the backend cannot run here. Returns a line for the report when
    something was done or could not be, else None. A failed calibration is reported, never
    raised: the estimate then uses the reference fit, labelled as another CPU's."""
    search = search or ProfileSearch()
    if not needed(backend, precision, search):
        return None
    cpu = detect()
    key = f"{backend}/{precision}"
    try:
        with cpu_lock(search, cpu, LOCK_WAIT_S, log) as held:
            if not held:
                return (f"another process held the calibration lock of this CPU for more than "
                        f"{LOCK_WAIT_S:.0f} s; estimated with the reference fit")
            try:
                if key in fitstore.host_fits(search, cpu):  # made while we waited
                    return None
            except fitstore.FitFileError as exc:
                log(f"{exc}; calibrating again")
            log(f"calibrating the latency cost model for this CPU ({cpu.description}), "
                f"{key}: first use here, well under a minute; stored under "
                f"{fitstore.cpu_file(search, cpu)}")
            fitted = calibrate(backend, precision, search, log, cpu)
    except Exception as exc:  # an export, session or disk failure must not fail the build
        first = str(exc).splitlines()[0] if str(exc) else ""
        return (f"the calibration of {key} on this CPU failed ({type(exc).__name__}: "
                f"{first}); estimated with the reference fit")
    line = (f"calibrated {key} on this CPU in {fitted.wall_s:.0f} s ({fitted.models} "
            f"micro-models, median error on them {fitted.train_mape:.0%})")
    if fitted.busy_note:
        line += f"; {fitted.busy_note}"
    log(line)
    return line

