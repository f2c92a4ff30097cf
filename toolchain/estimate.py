"""Latency estimates for hardware that is not on the desk: a roofline over the whole model
from the profile's peak numbers. Compute time is the MACs over the peak rate of the cores
the model uses, at an assumed efficiency; memory time is the weights over the memory
bandwidth; the slower of the two plus a fixed per-inference overhead. Uncalibrated: every
figure it gives is labelled `estimated` and says how it was made."""

from __future__ import annotations

from typing import Any

from toolchain.profiles import HardwareProfile

EFFICIENCY = 0.3  # share of peak that small-batch inference reaches; an assumption
OVERHEAD_MS = 0.05  # per-inference dispatch cost; an assumption
P95_OVER_P50 = 1.2  # an assumption
BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "int8": 1}
METHOD = (f"uncalibrated roofline: MACs over the profile's peak at {EFFICIENCY:.0%} efficiency "
          f"vs weights over its memory bandwidth, plus {OVERHEAD_MS} ms per inference; "
          f"p95 = {P95_OVER_P50} x p50")


def roofline_ms(profile: HardwareProfile, precision: str, macs: int, params: int) -> float:
    cores = min(profile.threads, profile.cores)
    peak = profile.peak_gmacs_per_core[precision] * 1e9 * cores * EFFICIENCY
    compute_s = macs / peak
    memory_s = params * BYTES_PER_WEIGHT[precision] / (profile.memory_bandwidth_gbps * 1e9)
    return max(compute_s, memory_s) * 1e3 + OVERHEAD_MS


def estimate(profile: HardwareProfile, precision: str, macs: int, params: int,
             why: str) -> dict[str, Any]:
    p50 = roofline_ms(profile, precision, macs, params)
    return {"p50": round(p50, 4), "p95": round(p50 * P95_OVER_P50, 4), "source": "estimated",
            "method": METHOD, "why": why}
