"""The machine the toolchain runs on, detected rather than written down: CPU model, core
count, the instruction-set extensions that decide kernel speed, clock, and the peak compute
per core that follows from them. A profile with `[hardware] detect = "host"` (host-cpu) takes
these at load time, so its report describes this machine, whichever machine that is."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Flags worth naming, in the order they are listed: they decide which kernels run.
_NAMED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "avx512_fp16", "amx_int8", "asimd", "asimddp", "i8mm", "sve")
_DEFAULT_GHZ = 2.0  # when the clock cannot be read; said so in the sources


@dataclass(frozen=True)
class HostCPU:
    model: str
    cores: int  # usable by this process (affinity), not the whole machine
    flags: frozenset[str]
    ghz: float
    ghz_source: str
    arch: str

    @property
    def named_flags(self) -> list[str]:
        return [f for f in _NAMED_FLAGS if f in self.flags]

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni", "asimddp"} & self.flags)

    @property
    def description(self) -> str:
        flags = ", ".join(self.named_flags) or "no SIMD extensions detected"
        return f"{self.model}, {self.cores} core(s) @ {self.ghz:.2f} GHz ({flags})"

    def peak_gmacs_per_core(self) -> tuple[dict[str, float], dict[str, str]]:
        """Peak multiply-accumulates per core per data type, with how each was worked out."""
        if self.arch in ("x86_64", "AMD64", "i686"):
            lanes, fmas = (8, 2) if "avx2" in self.flags else (4, 1)
            fp32_how = (f"{fmas} FMA pipe(s) x {lanes} fp32 lanes ({32 * lanes}-bit datapath "
                        f"assumed) x {self.ghz:.2f} GHz")
        else:  # Arm: two 128-bit NEON FMA pipes on big cores
            lanes, fmas = 4, 2
            fp32_how = f"2 NEON FMA pipes x 4 fp32 lanes x {self.ghz:.2f} GHz"
        fp32 = round(fmas * lanes * self.ghz, 1)
        int8_factor = 4 if self.vnni else 2
        int8_how = ("int8 dot-product instructions (VNNI/SDOT): 4 int8 MACs per 32-bit lane"
                    if self.vnni else "no int8 dot-product instructions: int8 through 16-bit "
                    "multiply-adds, about 2x the fp32 rate")
        fp16_fast = bool({"avx512_fp16", "fphp"} & self.flags)
        peak = {"fp32": fp32, "fp16": fp32 * (2 if fp16_fast else 1), "int8": fp32 * int8_factor}
        how = {"fp32": fp32_how,
               "fp16": "fp16 arithmetic at twice the fp32 rate" if fp16_fast else
               "no fp16 arithmetic here; fp16 runs at the fp32 rate",
               "int8": int8_how}
        return peak, how


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _clock_ghz(info: dict[str, str]) -> tuple[float, str]:
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(max_freq.read_text()) / 1e6, f"{max_freq}"
    except (OSError, ValueError):
        pass
    try:
        return float(info["cpu MHz"]) / 1000, "'cpu MHz' in /proc/cpuinfo"
    except (KeyError, ValueError):
        return _DEFAULT_GHZ, f"clock not readable here; {_DEFAULT_GHZ} GHz assumed"


@lru_cache(maxsize=1)
def detect() -> HostCPU:
    info = _cpuinfo()
    model = (info.get("model name") or info.get("Hardware") or info.get("cpu model")
             or platform.processor() or platform.machine() or "unknown CPU")
    flags = frozenset((info.get("flags") or info.get("Features") or "").split())
    ghz, ghz_source = _clock_ghz(info)
    return HostCPU(model, _usable_cores(), flags, round(ghz, 3), ghz_source, platform.machine())
