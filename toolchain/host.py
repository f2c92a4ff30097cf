"""The machine the toolchain runs on, detected rather than written down: CPU model, core
count, the instruction-set extensions that decide kernel speed, clock, and the peak compute
per core that follows from them. A profile with `[hardware] detect = "host"` (host-cpu) takes
these at load time, so its report describes this machine, whichever machine that is.

`HostCPU.signature` names the CPU for the cost model: every fit and calibration is stored under
the signature of the CPU it was measured on, and only a fit with this machine's signature is
presented as "this host"."""

from __future__ import annotations

import hashlib
import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Flags worth naming, in the order they are listed: they decide which kernels run.
_NAMED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "avx512_fp16", "amx_int8", "asimd", "asimddp", "i8mm", "sve")
_DEFAULT_GHZ = 2.0  # when the clock cannot be read; said so in the sources
CPUINFO = Path("/proc/cpuinfo")  # read through this name so a test can present another CPU


@dataclass(frozen=True)
class HostCPU:
    model: str
    cores: int  # usable by this process (affinity), not the whole machine
    flags: frozenset[str]
    ghz: float
    ghz_source: str
    arch: str
    vendor: str = ""
    # family/model/stepping: a VM often names its CPU only "AMD EPYC"; these tell generations apart
    stepping: str = ""

    @property
    def signature(self) -> str:
        """A stable name for this CPU as the cost model sees it: model, family/model/stepping,
        the flags that decide kernel speed and the usable cores. The clock is left out (it
        moves with the governor); a change of any of the rest is another CPU."""
        identity = "|".join([self.arch, self.vendor, self.model, self.stepping,
                             ",".join(self.named_flags), str(self.cores)])
        slug = re.sub(r"[^a-z0-9]+", "-", self.model.lower()).strip("-")[:32] or "cpu"
        return f"{slug}-{self.cores}c-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"

    def record(self) -> dict[str, object]:
        """What a stored fit says about the CPU it was measured on."""
        return {"signature": self.signature, "description": self.description,
                "model": self.model, "flags": self.named_flags, "cores": self.cores,
                "ghz": self.ghz, "arch": self.arch,
                "peak_fp32_gmacs_per_core": self.peak_gmacs_per_core()[0]["fp32"]}

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
        text = CPUINFO.read_text(errors="replace")
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
    vendor = info.get("vendor_id") or info.get("CPU implementer") or ""
    stepping = "/".join(info.get(k, "") for k in ("cpu family", "model", "stepping",
                                                    "CPU part", "CPU variant")).strip("/")
    return HostCPU(model, _usable_cores(), flags, round(ghz, 3), ghz_source, platform.machine(),
                   vendor, stepping)
