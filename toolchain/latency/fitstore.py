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

import fcntl
import json
import math
import os
import stat
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
        if not self.native and not f.cpu.get("peak_fp32_gmacs_per_core"):
            text += ("; that CPU's peak was not recorded, so its fixed costs are carried over "
                     "as if it had this host's")
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
    _check_fields(fit, key, path)
    fit.cpu = {**cpu, **fit.cpu}
    _check_cpu(fit.cpu, f"fit file {path}: fit {key!r}")
    return fit


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _check_fields(fit: Fit, key: str, path: Path) -> None:
    where = f"fit file {path}: fit {key!r}"
    for name in ("fit_date", "host_profile", "method", "base", "busy_note"):
        if not isinstance(getattr(fit, name), str):
            raise FitFileError(f"{where}: {name} must be text")
    if isinstance(fit.models, bool) or not isinstance(fit.models, int) or fit.models < 0:
        raise FitFileError(f"{where}: models = {fit.models!r}; expected a whole number >= 0")
    for name in ("train_mape", "wall_s", "spread"):
        if not _number(getattr(fit, name)) or getattr(fit, name) < 0:
            raise FitFileError(f"{where}: {name} = {getattr(fit, name)!r}; expected a finite "
                               "number >= 0")
    if not isinstance(fit.cpu, dict):
        raise FitFileError(f"{where}: cpu must be an object")


def _check_cpu(cpu: dict[str, Any], where: str) -> None:
    if not isinstance(cpu.get("signature"), str):
        raise FitFileError(f"{where}: 'cpu' must be an object with a 'signature'")
    if not isinstance(cpu.get("description", ""), str):
        raise FitFileError(f"{where}: cpu description must be text")
    peak = cpu.get("peak_fp32_gmacs_per_core")
    if peak is not None and (not _number(peak) or peak <= 0):
        raise FitFileError(f"{where}: cpu peak_fp32_gmacs_per_core = {peak!r}; expected a "
                           "finite number > 0")


def _read_capped(path: Path) -> str | None:
    """The text of a fit file, None when there is none; a file that is not a regular file or
    is over the cap is refused before it is read (a FIFO or /dev/zero would never end)."""
    try:
        # non-blocking: opening a FIFO for reading would otherwise wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FitFileError(f"fit file {path}: not a regular file")
            data = handle.read(MAX_FIT_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FitFileError(f"fit file {path}: not readable ({exc.strerror or exc})") from exc
    if len(data) > MAX_FIT_FILE_BYTES:
        raise FitFileError(f"fit file {path}: more than a fit file's {MAX_FIT_FILE_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def read(path: Path) -> tuple[dict[str, Any], dict[str, Fit]]:
    """(the CPU record, the fits by "backend/precision") of one fit file; FitFileError when it
    is missing or cannot be used as it is."""
    if (found := _read_if_there(path)) is None:
        raise FitFileError(f"fit file {path}: not found")
    return found


def _read_if_there(path: Path) -> tuple[dict[str, Any], dict[str, Fit]] | None:
    """As `read`, None when the file does not exist (an unreadable one is an error)."""
    text = _read_capped(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FitFileError(f"fit file {path}: not valid JSON ({str(exc)[:200]})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("fits"), dict):
        raise FitFileError(f"fit file {path}: expected an object with 'fits'")
    cpu = data.get("cpu", {"signature": UNRECORDED})  # schema 1 did not record the CPU
    if not isinstance(cpu, dict):
        raise FitFileError(f"fit file {path}: 'cpu' must be an object with a 'signature'")
    _check_cpu(cpu, f"fit file {path}")
    return cpu, {key: _fit_of(key, value, cpu, path) for key, value in data["fits"].items()}


def host_fits(search: ProfileSearch, cpu: HostCPU) -> dict[str, Fit]:
    """This CPU's own fits (none when its file is missing; FitFileError when damaged)."""
    path = cpu_file(search, cpu)
    found = _read_if_there(path)
    if found is None:
        return {}
    recorded, fits = found
    if recorded.get("signature") != cpu.signature:
        raise FitFileError(f"fit file {path}: made for CPU {recorded.get('signature')!r}, "
                           f"not {cpu.signature!r}")
    return fits


def reference_fits(search: ProfileSearch) -> dict[str, Fit]:
    """The reference fits by key, the first file that has a key winning. A damaged file in
    your data folder is passed over; a damaged shipped one is an error (a broken install)."""
    fits: dict[str, Fit] = {}
    legacy, shipped = reference_files(search)
    try:
        found = _read_if_there(legacy)
    except FitFileError:
        found = None  # your own old file, damaged: passed over; the shipped one stands
    for got in (found, _read_if_there(shipped)):
        for key, value in (got[1] if got else {}).items():
            fits.setdefault(key, value)
    return fits


def _keys(backend: Backend, precision: str) -> list[str]:
    """The asked fit, then its stand-ins: its fp32 fit, then those of the backends it declares."""
    keys = [f"{backend.name}/{precision}", f"{backend.name}/fp32"]
    for other in backend.cost_fit_fallbacks:
        keys += [f"{other}/{precision}", f"{other}/fp32"]
    return list(dict.fromkeys(keys))


def _choice(sources: list[dict[str, Fit]], keys: list[str],
            cpu: HostCPU | None) -> Choice | None:
    """The first key any source has (the asked key before its stand-ins, whoever holds it),
    sources in order of preference for the same key."""
    for key in keys:
        for fits in sources:
            if key in fits:
                fit = fits[key]
                native = cpu is not None and fit.cpu.get("signature") == cpu.signature
                return Choice(fit, key, native, "" if key == keys[0] else
                              f"no fit for {keys[0]}; used {key}")
    return None


def reference(search: ProfileSearch, backend: Backend, precision: str,
              cpu: HostCPU | None = None) -> Choice | None:
    """The reference fit for the backend and precision (or its stand-ins): this host's only if
    it was measured on a CPU with `cpu`'s signature."""
    return _choice([reference_fits(search)], _keys(backend, precision), cpu)


def choose(search: ProfileSearch, cpu: HostCPU, backend: Backend,
           precision: str) -> Choice | None:
    """The fit for the backend and precision, this CPU's own before the reference's; failing
    both, the same for its stand-ins (its fp32 fit, then the backends it declares). None when
    there is none. A damaged file of this CPU's is passed over here (the next calibration
    replaces it); a damaged reference is an error."""
    try:
        own = host_fits(search, cpu)
    except FitFileError:
        own = {}
    return _choice([own, reference_fits(search)], _keys(backend, precision), cpu)


def save(new: Fit, search: ProfileSearch, cpu: HostCPU) -> Path:
    """Store a fit made on this CPU in its file in your data folder (written whole, then moved
    into place: a reader never sees half a file). A damaged file is replaced."""
    path = cpu_file(search, cpu)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # read, add, write under a lock: two processes saving two fits keep both
        with open(path.with_name(f".{path.name}.save-lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                existing = host_fits(search, cpu)
            except FitFileError:
                existing = {}
            existing[f"{new.backend}/{new.precision}"] = new
            data = {"schema_version": SCHEMA_VERSION, "cpu": cpu.record(),
                    "fits": {k: v.to_dict() for k, v in sorted(existing.items())}}
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise FitFileError(f"fit file {path}: cannot be written ({exc.strerror or exc})") from exc
    return path
