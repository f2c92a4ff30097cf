"""The bundle manifest (`manifest.json`) as frozen dataclasses. numpy-free, torch-free.

`parse_manifest` / `Manifest.from_dict` is the one reader: it checks every field's type and
presence and raises ManifestError (a BundleError) naming the field path and what was
expected. `Manifest.to_dict` gives back exactly the JSON layout the toolchain writes. Keys
this runtime does not know are ignored, so a newer toolchain may add some within a schema
version. The schema version itself lives in `runtime.bundle` (the format's one source).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.bundle import (
    MANIFEST,
    MAX_ENTRIES,
    MAX_MANIFEST_BYTES,
    MAX_TOTAL_BYTES,
    SCHEMA_VERSION,
    SIGNATURE,
    BundleError,
    member_name_problem,
)
from targets.base import TensorSpec

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(BundleError):
    """A manifest field is missing or has the wrong type or value; the message names it."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """One JSON object of the manifest at a field path; each getter checks one field."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise ManifestError(_expected(path or "(top level)", "an object", value))
        self.data, self.path = value, path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise ManifestError(f"manifest field '{self.where(key)}' is missing")
        return self.data[key]

    def check(self, key: str, ok: bool, what: str) -> Any:
        value = self.get(key)
        if not ok:
            raise ManifestError(_expected(self.where(key), what, value))
        return value

    def text(self, key: str, nullable: bool = False) -> str:
        v = self.get(key)
        return self.check(key, (nullable and v is None) or (isinstance(v, str) and v != ""),
                          "a non-empty string" + (" or null" if nullable else ""))

    def integer(self, key: str, minimum: int | None = None, nullable: bool = False) -> int:
        v = self.get(key)
        what = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}
        ok = (nullable and v is None) or (_is_int(v) and (minimum is None or v >= minimum))
        return self.check(key, ok, what.get(minimum, f"an integer >= {minimum}")
                          + (" or null" if nullable else ""))

    def number(self, key: str, low: float | None = None, high: float | None = None,
               nullable: bool = False) -> float:
        v = self.get(key)
        what = "a number" + (f" >= {low}" if low is not None else "")
        what += (f" and <= {high}" if high is not None else "") + (" or null" if nullable else "")
        ok = (nullable and v is None) or (
            _is_number(v) and (low is None or v >= low) and (high is None or v <= high))
        return self.check(key, ok, what)

    def boolean(self, key: str) -> bool:
        return self.check(key, isinstance(self.get(key), bool), "true or false")

    def obj(self, key: str) -> _Fields:
        return _Fields(self.get(key), self.where(key))

    def mapping(self, key: str) -> dict[str, Any]:
        """A free-form JSON object kept as it is (recipe, preprocessing, estimates)."""
        return dict(self.check(key, isinstance(self.get(key), dict), "an object"))

    def shape(self, key: str, dynamic: bool) -> tuple[int | None, ...]:
        v = self.get(key)
        ok = isinstance(v, list) and all(
            (_is_int(d) and d > 0) or (dynamic and d is None) for d in v)
        what = "a list of positive integers" + (" (null for a dynamic size)" if dynamic else "")
        return tuple(self.check(key, ok, what))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _expected(path: str, what: str, value: Any) -> str:
    return f"manifest field '{path}' must be {what}, got {_shown(value)}"


def _tensor(f: _Fields) -> TensorSpec:
    return TensorSpec(name=f.text("name"), shape=f.shape("shape", dynamic=True),
                      dtype=f.text("dtype"), scale=f.number("scale", nullable=True),
                      zero_point=f.integer("zero_point", nullable=True))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str


@dataclass(frozen=True)
class Target:
    profile: str
    backend: str
    precision: str
    threads: int
    device: str
    budgets: dict[str, float]  # the profile's; the fleet listener's latency rule reads them
    run_needs_torch: bool


@dataclass(frozen=True)
class InputSpec:
    tensor: TensorSpec  # what the model file takes, after preprocessing
    raw_shape: tuple[int, ...]  # one raw sample, before preprocessing
    preprocessing: dict[str, Any]  # runtime.preprocess's record

    def to_dict(self) -> dict[str, Any]:
        return {**self.tensor.to_dict(), "raw_shape": list(self.raw_shape),
                "preprocessing": self.preprocessing}


@dataclass(frozen=True)
class OutputSpec:
    tensor: TensorSpec
    kind: str
    labels: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**self.tensor.to_dict(), "kind": self.kind, "labels": list(self.labels)}


@dataclass(frozen=True)
class Latency:
    p50: float
    p95: float
    source: str  # measured-host, estimated or measured-device
    threads: int | None = None


@dataclass(frozen=True)
class ModelMetrics:
    accuracy: float
    size_bytes: int
    params: int
    macs: int
    latency_ms: Latency

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> ModelMetrics:
        f = _Fields(d, path)
        lat = f.obj("latency_ms")
        return cls(f.number("accuracy", 0, 1), f.integer("size_bytes", 0),
                   f.integer("params", 0), f.integer("macs", 0),
                   Latency(lat.number("p50", 0), lat.number("p95", 0), lat.text("source"),
                           lat.integer("threads", 1) if lat.has("threads") else None))

    def to_dict(self) -> dict[str, Any]:
        lat = self.latency_ms
        return {"accuracy": self.accuracy, "size_bytes": self.size_bytes, "params": self.params,
                "macs": self.macs,
                "latency_ms": {"p50": lat.p50, "p95": lat.p95, "source": lat.source,
                               **({"threads": lat.threads} if lat.threads is not None else {})}}


@dataclass(frozen=True)
class Gate:
    max_accuracy_drop_points: float
    passed: bool
    drop_points: float


@dataclass(frozen=True)
class Metrics:
    """What the build measured. The fields the runtime and the tools read are typed; the rest
    of the build's record (stages, peak_rss_mb, cold_start_ms, target_latency_ms) is kept
    as it came in `extra`."""

    reference: ModelMetrics
    final: ModelMetrics
    gate: Gate
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "reference": self.reference.to_dict(),
                "final": self.final.to_dict(), "gate": asdict(self.gate)}


@dataclass(frozen=True)
class Provenance:
    source_model: str
    source_model_sha256: str | None
    data: str
    data_sha256: str
    recipe: dict[str, Any]
    seed: int
    toolchain_version: str
    built_at: str  # ISO 8601, UTC
    python: str


@dataclass(frozen=True)
class Golden:
    inputs: str
    outputs: str
    count: int
    atol: float
    rtol: float
    min_top1_agreement: float = 1.0


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    target: Target
    model_file: str
    input: InputSpec
    output: OutputSpec
    metrics: Metrics
    provenance: Provenance
    golden: Golden
    reference_distributions: str | None
    files: dict[str, FileEntry] = field(default_factory=dict)  # filled in by write_bundle
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Check and read a parsed manifest.json. Raises ManifestError naming the field."""
        top = _Fields(d, "")
        top.check("schema_version", top.get("schema_version") == SCHEMA_VERSION,
                  f"{SCHEMA_VERSION} (the version this runtime reads)")
        files = top.obj("files")
        manifest = cls(
            model=_model(top.obj("model")), target=_target(top.obj("target")),
            model_file=top.text("model_file"), input=_input(top.obj("input")),
            output=_output(top.obj("output")), metrics=_metrics(top.obj("metrics")),
            provenance=_provenance(top.obj("provenance")), golden=_golden(top.obj("golden")),
            reference_distributions=(top.text("reference_distributions", nullable=True)
                                     if top.has("reference_distributions") else None),
            files=_files(files),
        )
        # Paths the runtime opens must be files the hash check covered.
        for path, name in manifest.referenced_files().items():
            if name not in manifest.files:
                raise ManifestError(_expected(path, "a file listed in 'files'", name))
        return manifest

    def referenced_files(self) -> dict[str, str]:
        """{field path: archive name} for every file the manifest points at."""
        refs = {"model_file": self.model_file, "golden.inputs": self.golden.inputs,
                "golden.outputs": self.golden.outputs}
        if self.reference_distributions is not None:
            refs["reference_distributions"] = self.reference_distributions
        return refs

    def to_dict(self) -> dict[str, Any]:
        """The on-disk JSON layout (write_bundle sorts the keys)."""
        t = self.target
        d: dict[str, Any] = {
            "schema_version": self.schema_version,
            "model": {"name": self.model.name, "version": self.model.version},
            "target": {"profile": t.profile, "backend": t.backend, "precision": t.precision,
                       "threads": t.threads, "device": t.device, "budgets": dict(t.budgets),
                       "run_needs_torch": t.run_needs_torch},
            "model_file": self.model_file,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "metrics": self.metrics.to_dict(),
            "provenance": asdict(self.provenance),
            "golden": asdict(self.golden),
            "files": {name: asdict(e) for name, e in self.files.items()},
        }
        if self.reference_distributions is not None:
            d["reference_distributions"] = self.reference_distributions
        return d


def parse_manifest(data: bytes) -> Manifest:
    """manifest.json's bytes -> Manifest, refusing oversized, non-JSON or invalid ones."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError(f"{MANIFEST} is not valid JSON ({str(exc)[:200]})") from exc
    return Manifest.from_dict(raw)


def _model(f: _Fields) -> ModelInfo:
    return ModelInfo(f.text("name"), f.text("version"))


def _target(f: _Fields) -> Target:
    budgets = f.obj("budgets") if f.has("budgets") else _Fields({}, f.where("budgets"))
    return Target(
        profile=f.text("profile"), backend=f.text("backend"), precision=f.text("precision"),
        threads=f.integer("threads", 1), device=f.text("device"),
        budgets={k: budgets.number(k) for k in budgets.data},
        run_needs_torch=f.boolean("run_needs_torch") if f.has("run_needs_torch") else False)


def _input(f: _Fields) -> InputSpec:
    prep = f.obj("preprocessing")
    prep.text("kind")
    return InputSpec(_tensor(f), f.shape("raw_shape", dynamic=False), prep.data)


def _output(f: _Fields) -> OutputSpec:
    labels = f.get("labels")
    f.check("labels", isinstance(labels, list) and all(isinstance(x, str) for x in labels),
            "a list of strings")
    return OutputSpec(_tensor(f), f.text("kind"), tuple(labels))


def _metrics(f: _Fields) -> Metrics:
    gate = f.obj("gate")
    typed = ("reference", "final", "gate")
    return Metrics(
        reference=ModelMetrics.from_dict(f.get("reference"), f.where("reference")),
        final=ModelMetrics.from_dict(f.get("final"), f.where("final")),
        gate=Gate(gate.number("max_accuracy_drop_points", 0), gate.boolean("passed"),
                  gate.number("drop_points")),
        extra={k: v for k, v in f.data.items() if k not in typed})


def _provenance(f: _Fields) -> Provenance:
    return Provenance(
        source_model=f.text("source_model"),
        source_model_sha256=f.text("source_model_sha256", nullable=True),
        data=f.text("data"), data_sha256=f.text("data_sha256"), recipe=f.mapping("recipe"),
        seed=f.integer("seed"), toolchain_version=f.text("toolchain_version"),
        built_at=f.text("built_at"), python=f.text("python"))


def _golden(f: _Fields) -> Golden:
    return Golden(
        inputs=f.text("inputs"), outputs=f.text("outputs"), count=f.integer("count", 1),
        atol=f.number("atol", 0), rtol=f.number("rtol", 0),
        min_top1_agreement=(f.number("min_top1_agreement", 0, 1)
                            if f.has("min_top1_agreement") else 1.0))


def _files(f: _Fields) -> dict[str, FileEntry]:
    """The files table: every name a plain relative entry name, no two the same but for
    case (one file on a case-insensitive disk), none both a file and a folder, bounded in
    count and in total size."""
    names = list(f.data)
    if len(names) > MAX_ENTRIES - 2:
        raise ManifestError(_expected("files", f"an object of at most {MAX_ENTRIES - 2} files",
                                      f"{len(names)} files"))
    folded: dict[str, str] = {}
    for name in names:
        if name in (MANIFEST, SIGNATURE) or (problem := member_name_problem(name)):
            raise ManifestError(f"manifest field 'files' has an unsafe name {_shown(name)}: "
                                + (problem or f"{name} is the bundle's own entry"))
        if (other := folded.setdefault(name.casefold(), name)) != name:
            raise ManifestError(f"manifest field 'files' lists {other!r} and {name!r}, which "
                                "differ only in case")
    folders = {name.casefold().rsplit("/", 1)[0] for name in names if "/" in name}
    if clash := sorted(n for n in names if n.casefold() in _parents(folders)):
        raise ManifestError(f"manifest field 'files' lists {clash[0]!r} both as a file and as "
                            "a folder")
    entries = {name: _file(f.obj(name)) for name in names}
    total = sum(e.size for e in entries.values())
    if total > MAX_TOTAL_BYTES:
        raise ManifestError(f"manifest field 'files' declares {total} bytes: at most "
                            f"{MAX_TOTAL_BYTES}")
    return entries


def _parents(folders: set[str]) -> set[str]:
    """Every folder and each of its ancestors."""
    out: set[str] = set()
    for folder in folders:
        parts = folder.split("/")
        out |= {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out


def _file(f: _Fields) -> FileEntry:
    sha = f.get("sha256")
    f.check("sha256", isinstance(sha, str) and bool(_SHA256.fullmatch(sha)),
            "64 lowercase hex digits")
    return FileEntry(sha, f.integer("size", 0))
