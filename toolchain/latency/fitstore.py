"""Cost-model fits, each stored under the CPU it was measured on.

The efficiency factors of a fit describe one CPU: the same micro-model ran 2.8x slower on an
AVX2-only EPYC than on the AVX-512 machine the shipped fit came from. So every fit file names
its CPU (`toolchain.host.HostCPU.record`), and:

- your data folder holds `fits/<cpu signature>.json`, one file per CPU, written by the automatic
  calibration (`selfcal.py`) and by `toolchain profiles fit`;
- the shipped `hardware-profiles/fits/costmodel.json` is the reference: the fit the project
  measured, on the CPU its file names. A calibration scales it to this CPU.

`choose` answers with this CPU's own fit for a backend and precision when there is one, else the
reference, and says which: only a fit with this machine's signature is "this host". A file that
something else damaged is refused with its reason, never half-read."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from targets.base import Backend
from toolchain.errors import ToolchainError
from toolchain.host import HostCPU
from toolchain.latency.costmodel import FEATURES, Fit
from toolchain.profiles import BUILTIN_DIR, FIT_NAME, ProfileSearch

SCHEMA_VERSION = 2
MAX_FIT_FILE_BYTES = 1 << 20  # a fit file is a few kB; anything larger is not ours
UNRECORDED = "unrecorded"  # the signature of a fit made before fits recorded their CPU


class FitFileError(ToolchainError):
    """A fit file that cannot be used as it is: unreadable, not ours, or damaged."""


@dataclass(frozen=True)
class Choice:
    """The fit an estimate uses and what may be said about it."""

    fit: Fit
    key: str  # "backend/precision" of the fit used
    native: bool  # measured on this machine's CPU
    note: str  # set when the fit is a stand-in for the asked backend or precision

    @property
    def cpu_description(self) -> str:
        return str(self.fit.cpu.get("description") or "an unrecorded CPU")

    def describe(self) -> str:
        """How the estimate's factors were made, naming the CPU they were measured on."""
        f = self.fit
        if f.method == "calibration":
            how = (f"calibrated on {f.models} micro-models in {f.wall_s:.0f} s ({f.fit_date}), "
                   f"scaling {f.base}")
        else:
            how = f"fitted on {f.models} micro-models ({f.fit_date})"
        where = "this host" if self.native else f"{self.cpu_description}, not this host"
        text = f"cost model {f.backend}/{f.precision} {how}, on {where}"
        return text + (f"; {self.note}" if self.note else "")


def cpu_file(search: ProfileSearch, cpu: HostCPU | str) -> Path:
    signature = cpu if isinstance(cpu, str) else cpu.signature
    return search.data_dir / "fits" / f"{signature}.json"


def reference_files(search: ProfileSearch) -> list[Path]:
    """Fits not made for this CPU's signature, in the order they are preferred: one left in your
    data folder by `toolchain profiles fit` before fits recorded their CPU, then the shipped."""
    return [search.data_dir / "fits" / FIT_NAME, BUILTIN_DIR / "fits" / FIT_NAME]


def _fit_of(key: str, value: Any, cpu: dict[str, Any], path: Path) -> Fit:
    if not isinstance(value, dict):
        raise FitFileError(f"fit file {path}: fit {key!r} is not a table")
    known = {f.name for f in fields(Fit)}
    try:
        fit = Fit(**{k: v for k, v in value.items() if k in known})
    except TypeError as exc:
        raise FitFileError(f"fit file {path}: fit {key!r} lacks fields ({exc})") from exc
    coefficients = fit.coefficients
    if not isinstance(coefficients, dict) or set(coefficients) != set(FEATURES):
        raise FitFileError(f"fit file {path}: fit {key!r} must have the coefficients "
                           f"{', '.join(FEATURES)}")
    for name, c in coefficients.items():
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) \
                or c < 0:
            raise FitFileError(f"fit file {path}: fit {key!r} coefficient {name} = {c!r}; "
                               "expected a finite number >= 0")
    if f"{fit.backend}/{fit.precision}" != key:
        raise FitFileError(f"fit file {path}: fit {key!r} says it is "
                           f"{fit.backend}/{fit.precision}")
    fit.cpu = {**cpu, **(fit.cpu or {})}
    return fit


def read(path: Path) -> tuple[dict[str, Any], dict[str, Fit]]:
    """(the CPU record, the fits by "backend/precision") of one fit file."""
    try:
        size = path.stat().st_size
        if size > MAX_FIT_FILE_BYTES:
            raise FitFileError(f"fit file {path}: {size} bytes, more than a fit file's "
                               f"{MAX_FIT_FILE_BYTES}")
        data = json.loads(path.read_text())
    except OSError as exc:
        raise FitFileError(f"fit file {path}: not readable ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise FitFileError(f"fit file {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("fits"), dict):
        raise FitFileError(f"fit file {path}: expected an object with 'fits'")
    cpu = data.get("cpu", {"signature": UNRECORDED})  # schema 1 did not record the CPU
    if not isinstance(cpu, dict) or not isinstance(cpu.get("signature"), str):
        raise FitFileError(f"fit file {path}: 'cpu' must be an object with a 'signature'")
    return cpu, {key: _fit_of(key, value, cpu, path) for key, value in data["fits"].items()}


def host_fits(search: ProfileSearch, cpu: HostCPU) -> dict[str, Fit]:
    """This CPU's own fits (none when its file is missing; FitFileError when damaged)."""
    path = cpu_file(search, cpu)
    if not path.exists():
        return {}
    recorded, fits = read(path)
    if recorded.get("signature") != cpu.signature:
        raise FitFileError(f"fit file {path}: made for CPU {recorded.get('signature')!r}, "
                           f"not {cpu.signature!r}")
    return fits


def reference_fits(search: ProfileSearch) -> dict[str, Fit]:
    """The reference fits by key, the first file that has a key winning."""
    fits: dict[str, Fit] = {}
    for path in reference_files(search):
        if path.exists():
            for key, value in read(path)[1].items():
                fits.setdefault(key, value)
    return fits


def _keys(backend: Backend, precision: str) -> list[str]:
    """The asked fit, then its stand-ins: its fp32 fit, then those of the backends it declares."""
    keys = [f"{backend.name}/{precision}", f"{backend.name}/fp32"]
    for other in backend.cost_fit_fallbacks:
        keys += [f"{other}/{precision}", f"{other}/fp32"]
    return list(dict.fromkeys(keys))


def _pick(fits: dict[str, Fit], keys: list[str]) -> tuple[str, Fit] | None:
    for key in keys:
        if key in fits:
            return key, fits[key]
    return None


def _choice(fits: dict[str, Fit], keys: list[str], cpu: HostCPU | None) -> Choice | None:
    if found := _pick(fits, keys):
        key, fit = found
        native = cpu is not None and fit.cpu.get("signature") == cpu.signature
        return Choice(fit, key, native, "" if key == keys[0] else
                      f"no fit for {keys[0]}; used {key}")
    return None


def reference(search: ProfileSearch, backend: Backend, precision: str,
              cpu: HostCPU | None = None) -> Choice | None:
    """The reference fit for the backend and precision (or its stand-ins): this host's only if
    it was measured on a CPU with `cpu`'s signature."""
    return _choice(reference_fits(search), _keys(backend, precision), cpu)


def choose(search: ProfileSearch, cpu: HostCPU, backend: Backend,
           precision: str) -> Choice | None:
    """This CPU's fit for the backend and precision (or, failing that, for its stand-ins), else
    the reference's; None when neither has one. A damaged file of this CPU's is passed over
    here (the next calibration replaces it); a damaged reference is an error."""
    try:
        own = host_fits(search, cpu)
    except FitFileError:
        own = {}
    return (_choice(own, _keys(backend, precision), cpu)
            or reference(search, backend, precision, cpu))


def save(new: Fit, search: ProfileSearch, cpu: HostCPU) -> Path:
    """Store a fit made on this CPU in its file in your data folder (written whole, then moved
    into place: a reader never sees half a file). A damaged file is replaced."""
    path = cpu_file(search, cpu)
    try:
        existing = host_fits(search, cpu)
    except FitFileError:
        existing = {}
    existing[f"{new.backend}/{new.precision}"] = new
    data = {"schema_version": SCHEMA_VERSION, "cpu": cpu.record(),
            "fits": {k: v.to_dict() for k, v in sorted(existing.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
