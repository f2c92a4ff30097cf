"""Hardware profiles: one TOML file per target, loaded into a frozen dataclass and passed down.

Where profiles are looked for is a `ProfileSearch`, passed down from the command line (never
read from the environment behind the caller's back). First match wins: the folders the user
named (`--profiles-dir`), then `profiles/` in the user's data folder, then the profiles that
ship with edgepack. The same object says where cost-model fits and calibrations are read
(the user's first, then the shipped ones) and written (the user's data folder).

A profile with `[hardware] detect = "host"` describes this machine: its device, core count
and peak compute are detected when it is loaded (`toolchain.host`), not written down.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain.errors import UsageError
from toolchain.paths import shipped_profiles_dir, user_data_dir

SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
BUILTIN_DIR = shipped_profiles_dir()
FIT_NAME = "costmodel.json"

# Numbers a profile must state, each with a source note in its [sources] table.
_SOURCED_FIELDS = (
    "hardware.cores",
    "hardware.memory_for_model_mb",
    "hardware.memory_bandwidth_gbps",
    *(f"hardware.peak_gmacs_per_core.{p}" for p in PRECISIONS),
    "budgets.p95_latency_ms",
    "budgets.bundle_size_mb",
    "budgets.peak_memory_mb",
    "budgets.max_accuracy_drop_points",
)
EXECUTORS = ("cpu", "gpu")
_GPU_BACKENDS = ("tensorrt", "onnxruntime-gpu", "aoti")
# The fixed costs a profile without a [latency] table gets (per kernel us, per inference us,
# p95/p50[, GPU compute efficiency]): the shipped profiles' middle values, said in the estimate.
_ASSUMED_COSTS = {"cpu": (1.0, 10.0, 1.5), "gpu": (3.0, 20.0, 1.2, 0.25)}
# Limits that catch a unit slip (ms written as us, a percentage for a ratio), not physics.
_LATENCY_LIMITS = {"per_kernel_us": (0.01, 10_000.0), "per_inference_us": (0.01, 1_000_000.0),
                   "tail_ratio_p95": (1.0, 10.0), "compute_efficiency": (0.001, 1.0)}


@dataclass(frozen=True)
class Budgets:
    p95_latency_ms: float
    bundle_size_mb: float
    peak_memory_mb: float
    max_accuracy_drop_points: float


@dataclass(frozen=True)
class FixedCosts:
    """What one inference costs on the target whatever its arithmetic (`[latency]`), and how
    its latency spreads. `executor` "gpu": kernels launched by a host onto an accelerator;
    "cpu": operators run one after another by a runtime on CPU cores."""

    executor: str
    per_kernel_us: float  # the least one kernel (GPU launch and gap) or one op dispatch costs
    per_inference_us: float  # the least one inference adds (GPU: sync and copies; CPU: invoke)
    tail_ratio_p95: float  # p95 / p50 on the device itself, not on this host
    compute_efficiency: float = 1.0  # GPU only: share of peak a batch-1 kernel reaches
    assumed: bool = False  # the profile has no [latency] table: these are our defaults


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    backends: tuple[str, ...]
    precision: str
    threads: int
    device: str
    cores: int
    measurable_on_host: bool
    memory_for_model_mb: float
    memory_bandwidth_gbps: float
    peak_gmacs_per_core: dict[str, float]
    budgets: Budgets
    sources: dict[str, str]
    path: Path
    fixed: FixedCosts
    prune_ratio: float = 0.0  # [compression] prune_ratio: the default channel pruning, 0 = none

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "backends": list(self.backends),
            "precision": self.precision,
            "threads": self.threads,
            "device": self.device,
            "measurable_on_host": self.measurable_on_host,
        }


@dataclass(frozen=True)
class ProfileSearch:
    """Where profiles, fits and calibrations are found, and where new ones are written."""

    extra_dirs: tuple[Path, ...] = ()
    data_dir: Path = field(default_factory=user_data_dir)

    def profile_dirs(self) -> list[Path]:
        return [*self.extra_dirs, self.data_dir / "profiles", BUILTIN_DIR]

    def available(self) -> dict[str, Path]:
        """Profile name -> file, in search order (a user's folder shadows the built-in one)."""
        found: dict[str, Path] = {}
        for folder in self.profile_dirs():
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
        return found

    def load(self, name: str) -> HardwareProfile:
        profiles = self.available()
        if name not in profiles:
            valid = ", ".join(sorted(profiles)) or "(none found)"
            raise UsageError(f"unknown target {name!r}; valid targets: {valid}")
        return load_profile_file(profiles[name])

    # cost-model fits and calibrations ---------------------------------------------------------
    def calibration_files(self, profile: HardwareProfile) -> list[Path]:
        return [self.calibration_output(profile),
                profile.path.parent / "calibration" / f"{profile.name}.json"]

    def calibration_output(self, profile: HardwareProfile) -> Path:
        return self.data_dir / "calibration" / f"{profile.name}.json"


def available_profiles(search: ProfileSearch | None = None) -> dict[str, Path]:
    return (search or ProfileSearch()).available()


def load_profile(name: str, search: ProfileSearch | None = None) -> HardwareProfile:
    return (search or ProfileSearch()).load(name)


def _field(data: dict, dotted: str, path: Path, kind: type | tuple[type, ...]) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UsageError(f"profile {path}: missing field {dotted!r}")
        node = node[part]
    if kind is float and isinstance(node, int) and not isinstance(node, bool):
        node = float(node)
    if not isinstance(node, kind) or (kind is not bool and isinstance(node, bool)):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise UsageError(f"profile {path}: field {dotted!r} must be {want}, got {node!r}")
    return node


def _positive(value: float, dotted: str, path: Path) -> float:
    if value <= 0:
        raise UsageError(f"profile {path}: field {dotted!r} must be positive, got {value!r}")
    return value


def load_profile_file(path: Path) -> HardwareProfile:
    """Parse and validate one profile; every error names the file and the field."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"profile {path}: cannot be read as TOML: {exc}") from exc
    version = _field(data, "schema_version", path, int)
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"profile {path}: field 'schema_version' is {version}, this toolchain reads "
            f"{SCHEMA_VERSION}"
        )
    name = _field(data, "name", path, str)
    _detect_host(data, path)
    if name != path.stem:
        raise UsageError(f"profile {path}: field 'name' is {name!r} but the file is {path.name}")
    backends = _field(data, "deployment.backends", path, list)
    if not backends or not all(isinstance(b, str) for b in backends):
        raise UsageError(f"profile {path}: field 'deployment.backends' must list backend names")
    from targets import known_backends

    known = known_backends()
    for b in backends:
        if b not in known:
            raise UsageError(
                f"profile {path}: field 'deployment.backends' names unknown backend {b!r}; "
                f"known: {', '.join(sorted(known))}"
            )
    precision = _field(data, "deployment.precision", path, str)
    if precision not in PRECISIONS:
        raise UsageError(
            f"profile {path}: field 'deployment.precision' is {precision!r}; "
            f"valid: {', '.join(PRECISIONS)}"
        )
    threads = int(_positive(_field(data, "deployment.threads", path, int), "deployment.threads",
                            path))
    peak = {
        p: _positive(_field(data, f"hardware.peak_gmacs_per_core.{p}", path, float),
                     f"hardware.peak_gmacs_per_core.{p}", path)
        for p in PRECISIONS
    }
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        raise UsageError(f"profile {path}: field 'sources' must be a table")
    for dotted in _SOURCED_FIELDS:
        note = sources.get(dotted)
        if not isinstance(note, str) or not note.strip():
            raise UsageError(f"profile {path}: field 'sources.\"{dotted}\"' must say where "
                             f"{dotted} comes from")
    budgets = Budgets(
        **{
            key: _positive(_field(data, f"budgets.{key}", path, float), f"budgets.{key}", path)
            for key in Budgets.__dataclass_fields__
        }
    )
    return HardwareProfile(
        name=name,
        description=_field(data, "description", path, str),
        backends=tuple(backends),
        precision=precision,
        threads=threads,
        device=_field(data, "hardware.device", path, str),
        cores=int(_positive(_field(data, "hardware.cores", path, int), "hardware.cores", path)),
        measurable_on_host=_field(data, "hardware.measurable_on_host", path, bool),
        memory_for_model_mb=_positive(
            _field(data, "hardware.memory_for_model_mb", path, float),
            "hardware.memory_for_model_mb", path),
        memory_bandwidth_gbps=_positive(
            _field(data, "hardware.memory_bandwidth_gbps", path, float),
            "hardware.memory_bandwidth_gbps", path),
        peak_gmacs_per_core=peak,
        budgets=budgets,
        sources=dict(sources),
        path=path,
        fixed=_fixed_costs(data, path, sources),
        prune_ratio=_prune_ratio(data, path),
    )


def _fixed_costs(data: dict, path: Path, sources: dict) -> FixedCosts:
    """The `[latency]` table: every number finite, within sane limits, and sourced. A profile
    written before the table existed still loads, with stated defaults (`assumed`)."""
    import math

    if "latency" not in data:
        backends = data.get("deployment", {}).get("backends", [])
        gpu = bool(backends) and backends[0] in _GPU_BACKENDS
        return FixedCosts("gpu" if gpu else "cpu", *_ASSUMED_COSTS["gpu" if gpu else "cpu"],
                          assumed=True)
    executor = _field(data, "latency.executor", path, str)
    if executor not in EXECUTORS:
        raise UsageError(f"profile {path}: field 'latency.executor' is {executor!r}; valid: "
                         f"{', '.join(EXECUTORS)}")
    keys = ["per_kernel_us", "per_inference_us", "tail_ratio_p95"]
    if executor == "gpu":
        keys.append("compute_efficiency")
    values = {}
    for key in keys:
        dotted = f"latency.{key}"
        value = _field(data, dotted, path, float)
        low, high = _LATENCY_LIMITS[key]
        if not math.isfinite(value) or not low <= value <= high:
            raise UsageError(f"profile {path}: field {dotted!r} must be a number from {low:g} "
                             f"to {high:g}, got {value!r}")
        note = sources.get(dotted)
        if not isinstance(note, str) or not note.strip():
            raise UsageError(f"profile {path}: field 'sources.\"{dotted}\"' must say where "
                             f"{dotted} comes from")
        values[key] = value
    return FixedCosts(executor=executor, **values)


def _prune_ratio(data: dict, path: Path) -> float:
    table = data.get("compression", {})
    if not isinstance(table, dict):
        raise UsageError(f"profile {path}: field 'compression' must be a table")
    if "prune_ratio" not in table:
        return 0.0
    ratio = _field(data, "compression.prune_ratio", path, float)
    if not 0 <= ratio < 1:
        raise UsageError(f"profile {path}: field 'compression.prune_ratio' must be in [0, 1), "
                         f"got {ratio}")
    return ratio


def _detect_host(data: dict, path: Path) -> None:
    """Fill a `detect = "host"` profile's device, cores and peak compute from this machine,
    with source notes that say they were detected."""
    hardware = data.get("hardware")
    if not isinstance(hardware, dict) or "detect" not in hardware:
        return
    if hardware["detect"] != "host":
        raise UsageError(f"profile {path}: field 'hardware.detect' must be \"host\", got "
                         f"{hardware['detect']!r}")
    from toolchain.host import detect

    cpu = detect()
    peak, how = cpu.peak_gmacs_per_core()
    hardware.update(device=cpu.description, cores=cpu.cores, peak_gmacs_per_core=peak)
    if isinstance(data.get("description"), str):
        data["description"] = f"{data['description']}; here: {cpu.description}"
    sources = data.setdefault("sources", {})
    if isinstance(sources, dict):
        sources["hardware.cores"] = "detected: CPUs this process may run on (affinity)"
        sources["hardware.device"] = "detected: /proc/cpuinfo model name and flags"
        for precision, note in how.items():
            sources[f"hardware.peak_gmacs_per_core.{precision}"] = (
                f"detected: {note}; clock from {cpu.ghz_source}")
