"""What physics allows: the fixed costs an inference pays whatever its arithmetic, a model of a
GPU that launches kernels, and the target's own latency spread.

Kernels: a runtime fuses an elementwise op (bias, activation, BatchNorm's scale and shift, a
residual add) into the convolution or matmul right before it (TensorRT fuses conv+BN+ReLU
and the residual add; ONNX Runtime and XNNPACK fuse conv+bias+activation), so each
convolution, matmul or pooling op starts a kernel and the elementwise ops after it ride along.
An elementwise op with no such op before it is a kernel of its own.

The lower bound of an inference is `kernels x per_kernel_us + per_inference_us` from the
profile's `[latency]` table; no estimate goes below it. A GPU kernel costs the largest of its
launch, its arithmetic at `compute_efficiency` of the peak over all SMs, and its bytes over
the memory bandwidth. p95 on a target is its p50 times the profile's `tail_ratio_p95`: a model
of that device, never this host's measured tail."""

from __future__ import annotations

import numpy as np

from targets.base import Op
from toolchain.profiles import HardwareProfile

_STARTS_KERNEL = ("conv", "depthwise", "matmul", "pooling")
_FUSES = ("conv", "depthwise", "matmul")
# a host measurement whose p95 is this many times its p50 was taken on a busy machine
BUSY_HOST_TAIL = 3.0


def kernels(ops: list[Op]) -> list[list[Op]]:
    """The ops grouped into the kernels a runtime launches, in graph order."""
    groups: list[list[Op]] = []
    for op in ops:
        fusable = op.kind in ("elementwise", "other") and groups and groups[-1][0].kind in _FUSES
        if fusable and (op.kind == "elementwise" or _is_batchnorm(op)):
            groups[-1].append(op)
        else:
            groups.append([op])
    return groups


def _is_batchnorm(op: Op) -> bool:
    return "batchnorm" in op.name.lower().replace("_", "")


def lower_bound_ms(ops: list[Op], profile: HardwareProfile) -> float:
    """The fixed costs alone: one dispatch per kernel plus one per inference."""
    fixed = profile.fixed
    return (len(kernels(ops)) * fixed.per_kernel_us + fixed.per_inference_us) / 1e3


def floor_note(ops: list[Op], profile: HardwareProfile) -> str:
    fixed = profile.fixed
    what = "launch" if fixed.executor == "gpu" else "dispatch"
    return (f"{len(kernels(ops))} kernels x {fixed.per_kernel_us:g} us {what} + "
            f"{fixed.per_inference_us:g} us per inference"
            + (" (assumed: the profile has no [latency] table)" if fixed.assumed else ""))


def gpu_ms(ops: list[Op], profile: HardwareProfile, precision: str) -> float:
    """Sum over kernels of max(launch, arithmetic, memory), plus the per-inference cost.
    Arithmetic runs at the profile's precision where the graph is fp32 (TensorRT builds the
    engine in the precision it is asked for), at the op's own type otherwise."""
    fixed = profile.fixed
    bandwidth = profile.memory_bandwidth_gbps * 1e9
    total_us = fixed.per_inference_us
    for group in kernels(ops):
        seconds = 0.0
        for op in group:
            dtype = precision if op.dtype == "fp32" else op.dtype
            peak = profile.peak_gmacs_per_core[dtype] * 1e9 * profile.cores
            seconds += op.work / (peak * fixed.compute_efficiency)
        # fused ops work in registers: the kernel moves the bytes of the op that starts it
        memory = group[0].bytes / bandwidth
        total_us += max(fixed.per_kernel_us, seconds * 1e6, memory * 1e6)
    return total_us / 1e3


def with_target_tail(estimate: dict, profile: HardwareProfile) -> dict:
    """Add p95 from the target's tail model (the profile's tail_ratio_p95, with its source)."""
    ratio = profile.fixed.tail_ratio_p95
    estimate["p95"] = round(estimate["p50"] * ratio, 4)
    source = profile.sources.get("latency.tail_ratio_p95", "")
    estimate["p95_note"] = (f"p50 x {ratio:g}, the p95/p50 of {profile.name} from its profile "
                            f"({source})")
    return estimate


BUSY_STRETCH_RATIO = 1.5  # medians of stretches of the same run this far apart: a busy host


def host_stretch_note(samples_ms: list[float], stretches: int = 10) -> str | None:
    """A line when the medians of consecutive stretches of one measurement disagree: the
    model did not change, so the machine did (another process took the cores for a while)."""
    if len(samples_ms) < stretches * 10:
        return None
    medians = [float(np.median(part)) for part in np.array_split(np.asarray(samples_ms),
                                                                  stretches)]
    low, high = min(medians), max(medians)
    if low > 0 and high / low >= BUSY_STRETCH_RATIO:
        return (f"this host looked busy while measuring: the medians of {stretches} consecutive "
                f"stretches of runs ranged {low:.4f}-{high:.4f} ms ({high / low:.1f}x); its "
                "p95 and p99 describe the machine's other work, not the model")
    return None


def host_tail_note(latency_ms: dict) -> str | None:
    """A line when this host's own measurement looks taken on a busy machine."""
    p50, p95 = latency_ms.get("p50") or 0.0, latency_ms.get("p95") or 0.0
    if p50 > 0 and p95 / p50 >= BUSY_HOST_TAIL:
        return (f"this host looked busy while measuring: its p95 is {p95 / p50:.1f}x its p50; "
                "the host figures are noisy, and the target's p95 does not use them")
    return None
