"""The cost model's fallback when no fit is stored: a roofline over the whole model from the
profile's peak numbers. Compute time is the MACs over the peak rate of the cores the model
uses, at an assumed efficiency; memory time is the weights over the memory bandwidth; the
slower of the two plus a fixed per-inference overhead."""

from __future__ import annotations

from toolchain.profiles import HardwareProfile

EFFICIENCY = 0.3  # share of peak that small-batch inference reaches; an assumption
OVERHEAD_MS = 0.05  # per-inference dispatch cost; an assumption
BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "int8": 1}


def roofline_ms(profile: HardwareProfile, precision: str, macs: int, params: int) -> float:
    cores = min(profile.threads, profile.cores)
    peak = profile.peak_gmacs_per_core[precision] * 1e9 * cores * EFFICIENCY
    compute_s = macs / peak
    memory_s = params * BYTES_PER_WEIGHT[precision] / (profile.memory_bandwidth_gbps * 1e9)
    return max(compute_s, memory_s) * 1e3 + OVERHEAD_MS

