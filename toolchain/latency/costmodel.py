"""The per-operator latency cost model.

Each operator costs its arithmetic (MACs with channel counts rounded up to whole vector blocks,
as kernels compute them; elements for ops without MACs) over the profile's
peak rate for its data type, scaled by an efficiency factor per op kind; the bytes it moves
over the profile's memory bandwidth, scaled by a memory factor; and a fixed overhead per op of
its kind. A model adds a fixed overhead per inference. In symbols, with features in ms at peak,

    latency = sum_k (c_k * compute_k + o_k * n_ops_k) + c_mem * memory + c_inf

All coefficients are fitted (non-negative least squares on relative error) by measuring
micro-models against the measuring machine's own profile (`host-cpu`), per backend and
precision, and stored under the CPU they were measured on (`fitstore.py`): the shipped
`hardware-profiles/fits/costmodel.json` is the reference, a short automatic calibration
(`selfcal.py`) rescales it to each new CPU, `toolchain profiles fit` refits in full. Another
profile is estimated by its own peak numbers with the same coefficients (none faster than that
profile's peak); the fixed overheads transfer by the ratio of single-core fp32 peaks of the
fit's CPU and the profile. A GPU profile is
estimated by the kernel model of `floors.py` instead, and no estimate goes below the profile's
fixed-cost floor (`lower_bound_ms`). A calibration from device measurements multiplies a
profile's estimates by a fitted scale (`toolchain profiles calibrate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np

from targets.base import KINDS, Backend, Op
from toolchain.profiles import HardwareProfile, ProfileSearch

FEATURES = (*[f"compute_{k}" for k in KINDS], "memory", *[f"per_op_{k}" for k in KINDS],
            "per_inference")
_OVERHEADS = slice(len(KINDS) + 1, None)  # the fixed costs: per op of each kind, per inference
_COMPUTE = slice(0, len(KINDS))  # arithmetic over peak, per op kind
HOST_PROFILE = "host-cpu"


def features(ops: list[Op], profile: HardwareProfile) -> np.ndarray:
    cores = min(profile.threads, profile.cores)
    f = np.zeros(len(FEATURES))
    for op in ops:
        peak = profile.peak_gmacs_per_core[op.dtype] * 1e9 * cores
        kind = KINDS.index(op.kind)
        f[kind] += op.work / peak * 1e3
        f[len(KINDS)] += op.bytes / (profile.memory_bandwidth_gbps * 1e9) * 1e3
        f[len(KINDS) + 1 + kind] += 1.0
    f[-1] = 1.0
    return f


@dataclass
class Fit:
    backend: str
    precision: str
    coefficients: dict[str, float]
    fit_date: str
    models: int
    host_profile: str
    train_mape: float
    # the CPU it was measured on (toolchain.host.HostCPU.record); empty in fits made before
    # fits recorded their CPU
    cpu: dict[str, Any] = field(default_factory=dict)
    method: str = "full"  # "full": every micro-model; "calibration": a reference fit rescaled
    base: str = ""  # for a calibration: the reference fit it scaled, and its CPU
    wall_s: float = 0.0  # measuring and fitting, seconds
    spread: float = 0.0  # median over models of (slowest / fastest repeated median) - 1
    busy_note: str = ""  # set when the host looked busy while measuring

    def vector(self) -> np.ndarray:
        return np.array([self.coefficients[k] for k in FEATURES])

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fit(rows: list[tuple[np.ndarray, float]], backend: str, precision: str) -> Fit:
    """NNLS on relative error: each row (features, measured ms) weighs 1/measured. The fit is
    recorded as made on this machine's CPU."""
    from scipy.optimize import nnls

    from toolchain.host import detect

    a = np.stack([f / y for f, y in rows])
    coef, _ = nnls(a, np.ones(len(rows)))
    pred = np.stack([f for f, _ in rows]) @ coef
    measured = np.array([y for _, y in rows])
    mape = float(np.median(np.abs(pred - measured) / measured))
    return Fit(backend, precision, dict(zip(FEATURES, map(float, coef), strict=True)),
               date.today().isoformat(), len(rows), HOST_PROFILE, mape, detect().record())


def load_calibration(profile: HardwareProfile,
                     search: ProfileSearch | None = None) -> dict[str, Any] | None:
    for path in (search or ProfileSearch()).calibration_files(profile):
        if path.exists():
            return json.loads(path.read_text())
    return None


def predict_ms(fit_: Fit, ops: list[Op], profile: HardwareProfile,
               host: HardwareProfile, native: bool = True) -> float:
    """The fit's estimate for `profile`. `native`: the fit was measured on this machine's CPU,
    which `host` describes; otherwise even the host is a device the fit never ran on."""
    f = features(ops, profile)
    coef = fit_.vector().copy()
    if profile.name == host.name and native:
        return float(f @ coef)
    # fixed overheads were measured on the fit's CPU: transfer by single-core fp32 speed (a
    # fit that did not record its CPU is taken as made on this host's)
    fitted_on = fit_.cpu.get("peak_fp32_gmacs_per_core") or host.peak_gmacs_per_core["fp32"]
    speed = float(fitted_on) / profile.peak_gmacs_per_core["fp32"]
    coef[_OVERHEADS] *= speed
    # A fitted compute factor under 1 says the host beat its own peak figure (a peak that
    # understates the host, or arithmetic the micro-models' overheads absorbed): on another
    # device only physics is known, and no kernel runs faster than the device's peak.
    coef[_COMPUTE] = np.maximum(coef[_COMPUTE], 1.0)
    return float(f @ coef)


def estimate(ops: list[Op], profile: HardwareProfile, backend: Backend, precision: str,
             host: HardwareProfile, use_calibration: bool = True,
             search: ProfileSearch | None = None) -> dict[str, Any]:
    """The labelled estimate for a model on a profile: p50 in ms, how it was made, and
    `lower_bound_ms`, the profile's fixed costs alone, which p50 never goes below."""
    from toolchain.host import detect
    from toolchain.latency import fitstore, floors

    search = search or ProfileSearch()
    floor = floors.lower_bound_ms(ops, profile)
    choice = fitstore.choose(search, detect(), backend, precision)
    if profile.fixed.executor == "gpu":
        p50 = floors.gpu_ms(ops, profile, precision)
        method = (f"GPU kernel model: {len(floors.kernels(ops))} kernels (elementwise ops fused "
                  f"into the convolution or matmul before them), each max(launch "
                  f"{profile.fixed.per_kernel_us:g} us, arithmetic at "
                  f"{profile.fixed.compute_efficiency:g} of peak, bytes over memory "
                  f"bandwidth), plus {profile.fixed.per_inference_us:g} us per inference")
    elif choice is None:
        from toolchain.latency.roofline import roofline_ms

        macs = sum(o.macs for o in ops if o.kind in ("conv", "depthwise", "matmul"))
        p50 = roofline_ms(profile, precision, macs, 0)
        method = "uncalibrated roofline (no cost-model fit stored)"
    else:
        p50 = predict_ms(choice.fit, ops, profile, host, choice.native)
        on_host = profile.name == host.name and choice.native
        method = choice.describe() + ("" if on_host else
                                      f"; transferred to {profile.name} by its peak numbers")
    label = "estimated"
    calibration = load_calibration(profile, search) if use_calibration else None
    fit_record = None if choice is None or profile.fixed.executor == "gpu" else {
        "key": choice.key, "method": choice.fit.method, "native": choice.native,
        "cpu": choice.cpu_description, "cpu_signature": choice.fit.cpu.get("signature"),
        "fit_date": choice.fit.fit_date}
    if calibration:
        p50 *= calibration["scale"]
        label = f"estimated (calibrated on {calibration['measurements']} measurements)"
        made_with = calibration.get("fit")
        if fit_record and made_with and made_with != fit_identity(fit_record):
            method += (f"; the device calibration's scale was measured against the "
                       f"{made_with.get('key')} fit of {made_with.get('fit_date')} "
                       f"({made_with.get('method')}), not this one: recalibrate")
    if p50 < floor:
        method += f"; raised to the fixed-cost floor ({floors.floor_note(ops, profile)})"
    return {"p50": round(max(p50, floor), 4), "lower_bound_ms": round(floor, 4),
            "lower_bound_note": floors.floor_note(ops, profile), "source": label,
            "method": method, "fit": fit_record}


def fit_identity(record: dict[str, Any]) -> dict[str, Any]:
    """What names a fit in an estimate's `fit` record: which one, made how, when, on which CPU."""
    return {k: record.get(k) for k in ("key", "method", "fit_date", "cpu_signature")}
