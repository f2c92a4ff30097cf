"""Hardware profiles: one TOML file per target, loaded into a frozen dataclass and passed down.

Profiles are searched in, first match wins: the folders named in $EDGEPACK_PROFILES_DIR
(os.pathsep-separated), then the repository's `hardware-profiles/`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.errors import UsageError

SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "hardware-profiles"

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


@dataclass(frozen=True)
class Budgets:
    p95_latency_ms: float
    bundle_size_mb: float
    peak_memory_mb: float
    max_accuracy_drop_points: float


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


def profile_dirs() -> list[Path]:
    extra = os.environ.get("EDGEPACK_PROFILES_DIR", "")
    dirs = [Path(p) for p in extra.split(os.pathsep) if p]
    return [*dirs, BUILTIN_DIR]


def available_profiles() -> dict[str, Path]:
    """Profile name -> file, in search order (a user's folder shadows the built-in one)."""
    found: dict[str, Path] = {}
    for folder in profile_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def load_profile(name: str) -> HardwareProfile:
    profiles = available_profiles()
    if name not in profiles:
        valid = ", ".join(sorted(profiles)) or "(none found)"
        raise UsageError(f"unknown target {name!r}; valid targets: {valid}")
    return load_profile_file(profiles[name])


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
        prune_ratio=_prune_ratio(data, path),
    )


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
