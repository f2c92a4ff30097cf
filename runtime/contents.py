"""Checks of contents that may be hostile even when every hash matches: .npy/.npz arrays
(golden arrays in a bundle, inputs given to `edge-runtime run`) and the bundle's reference
distributions. An array's header is read and checked (numeric dtype, declared size within a
cap and equal to the bytes present) before any of it is loaded; pickles are never loaded.
numpy only."""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

MAX_ARRAY_BYTES = 1024**3  # a batch of raw inputs; golden arrays are far smaller
_NUMERIC_KINDS = "biuf"


class ContentError(ValueError):
    """An array or a record is not what it must be; the message names it and says why."""


def _checked_header(f: IO[bytes], what: str, max_bytes: int, present: int | None) -> None:
    """Read a .npy header from `f` and refuse what must not be loaded. `present` is the
    number of bytes the file holds (None when unknown)."""
    fmt = np.lib.format
    start = f.tell()
    try:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        if version not in read:
            raise ContentError(f"{what}: .npy format version {version} is not supported")
        shape, _, dtype = read[version](f)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ContentError(f"{what} is not a .npy array ({one_line(exc)})") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in _NUMERIC_KINDS:
        raise ContentError(f"{what} has dtype {dtype}: arrays must hold plain numbers "
                           "(bool, integer or float), never objects or records")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise ContentError(f"{what} declares shape {shape} ({nbytes} bytes): at most "
                           f"{max_bytes} bytes")
    if present is not None and present - (f.tell() - start) != nbytes:
        raise ContentError(f"{what} declares shape {shape} ({nbytes} bytes of data) but holds "
                           f"{present - (f.tell() - start)}")


def load_npy(path: Path, what: str | None = None,
             max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """A .npy file's numeric array; ContentError when it is anything else."""
    what = what or str(path)
    try:
        with open(path, "rb") as f:
            _checked_header(f, what, max_bytes, path.stat().st_size)
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        if isinstance(exc, ContentError):
            raise
        raise ContentError(f"{what} cannot be read as a .npy array ({one_line(exc)})") from exc


def load_npz(path: Path, names: tuple[str, ...],
             max_bytes: int = MAX_ARRAY_BYTES) -> dict[str, np.ndarray]:
    """The arrays `names` that a .npz file holds (missing ones are left out)."""
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z:
            members = {info.filename.removesuffix(".npy"): info for info in z.infolist()}
            for name in names:
                if (info := members.get(name)) is None:
                    continue
                what = f"{path}: array {name!r}"
                if info.file_size > max_bytes + 4096:
                    raise ContentError(f"{what} is {info.file_size} bytes: at most {max_bytes}")
                with z.open(info) as f:
                    _checked_header(f, what, max_bytes, info.file_size)
                with z.open(info) as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile, RuntimeError,
            NotImplementedError) as exc:
        if isinstance(exc, ContentError):
            raise
        raise ContentError(f"{path} cannot be read as a .npz archive ({one_line(exc)})") from exc
    return out


def check_finite(x: np.ndarray, what: str) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(x.size - np.isfinite(x).sum())
        raise ContentError(f"{what} holds {bad} NaN or infinite value(s): inputs must be "
                           "finite numbers")


def check_reference(ref: Any, what: str) -> dict[str, Any]:
    """The reference distributions record, checked where the device's drift statistics
    read it: optional parts, each of the right type when present."""
    if not isinstance(ref, dict):
        raise ContentError(f"{what} must be a JSON object, got {type(ref).__name__}")
    if "count" in ref and not (type(ref["count"]) is int and ref["count"] >= 0):
        raise ContentError(f"{what}: 'count' must be a non-negative integer")
    hist = _get(ref, what, "input", "histogram")
    if hist is not None:
        edges = _numbers(hist.get("edges"), f"{what}: input.histogram.edges")
        props = _numbers(hist.get("proportions"), f"{what}: input.histogram.proportions")
        if len(edges) < 2 or len(props) != len(edges) - 1 or not edges[-1] > edges[0]:
            raise ContentError(f"{what}: input.histogram needs increasing edges (at least 2) "
                               "and one proportion per bin")
    for path in (("output", "predicted_class"), ("output", "confidence")):
        part = _get(ref, what, *path)
        if part is not None and "proportions" in part:
            _numbers(part["proportions"], f"{what}: {'.'.join(path)}.proportions")
    samples = _get(ref, what, "samples")
    if samples is not None:
        if "confidence" in samples:
            _numbers(samples["confidence"], f"{what}: samples.confidence")
        means = samples.get("input_channel_means", [])
        if not isinstance(means, list):
            raise ContentError(f"{what}: samples.input_channel_means must be a list of lists")
        for i, channel in enumerate(means):
            _numbers(channel, f"{what}: samples.input_channel_means[{i}]")
    return ref


def _get(ref: dict[str, Any], what: str, *path: str) -> dict[str, Any] | None:
    node: Any = ref
    for i, key in enumerate(path):
        if not isinstance(node, dict):
            raise ContentError(f"{what}: {'.'.join(path[:i])} must be an object")
        if key not in node:
            return None
        node = node[key]
    if not isinstance(node, dict):
        raise ContentError(f"{what}: {'.'.join(path)} must be an object")
    return node


def _numbers(value: Any, what: str) -> list[float]:
    ok = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in value)
    if not ok:
        raise ContentError(f"{what} must be a list of finite numbers")
    return value


def one_line(exc: BaseException) -> str:
    """An exception as one short line (library messages may span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
