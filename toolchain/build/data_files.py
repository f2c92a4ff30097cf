"""Reading user data files (an `.npz`, a folder of images per class), every input hostile.

Caps come first, from what the files declare: a zip member's uncompressed size and an array
header's shape x itemsize before an array is read, an image's width x height (from its header)
before it is decoded. Nothing is unpickled (`allow_pickle=False`), no symlink leads out of the
data folder, and each image is shrunk as soon as it is decoded.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.build.safe_archive import check_file_size, gib, one_line, open_checked_zip
from toolchain.errors import UsageError

MAX_DATA_BYTES = 4 * 2**30  # an .npz as it unpacks, and the decoded image set
MAX_CLASSES = 100_000
MAX_IMAGE_PIXELS = 8192 * 8192  # per image, checked from its header before decoding
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NPZ_FORM = "expected x (float32, NCHW) and y (int64 class ids)"

Arrays = tuple[np.ndarray, np.ndarray, list[str]]


def read_npz(path: Path) -> Arrays:
    if not path.is_file():
        raise UsageError(f"data {path}: not a regular file")
    check_file_size(path, "data", MAX_DATA_BYTES)
    with open_checked_zip(path, "data", MAX_DATA_BYTES) as zf:
        members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        for key in ("x", "y"):
            if key not in members:
                found = ", ".join(members) or "none"
                raise UsageError(f"data {path}: no array {key!r} (found: {found}); {NPZ_FORM}")
        shapes = {k: _header(path, zf, members[k], k) for k in ("x", "y", "labels")
                  if k in members}
        _check_shapes(path, shapes)
        arrays = {k: _read(path, zf, members[k], k) for k in shapes}
    x, y = arrays["x"], arrays["y"].reshape(-1)
    if y.max() >= MAX_CLASSES or y.min() < 0:
        bad = int(y.max()) if y.max() >= MAX_CLASSES else int(y.min())
        raise UsageError(f"data {path}: y holds class id {bad}; class ids must be 0 to "
                         f"{MAX_CLASSES - 1} (at most {MAX_CLASSES} classes)")
    y = y.astype(np.int64)
    num_classes = int(y.max()) + 1
    if "labels" in arrays:
        labels = [str(s) for s in arrays["labels"].reshape(-1)]
        if len(labels) < num_classes:
            raise UsageError(f"data {path}: {len(labels)} labels for {num_classes} classes")
    else:
        labels = [str(i) for i in range(num_classes)]
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise UsageError(f"data {path}: x holds NaN or infinite values; every value must be "
                         "a finite number")
    return x.astype(np.float32), y, labels


def _header(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo,
            key: str) -> tuple[tuple[int, ...], np.dtype]:
    """The array's shape and dtype from its .npy header, refused when reading it would be
    too big, would need pickle, or when the member cannot hold that many bytes."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f".npy format version {version} is not supported")
            shape, _, dtype = readers[version](f, max_header_size=10_000)
        except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile) as exc:
            raise UsageError(f"data {path}: array {key!r} is not a readable .npy "
                             f"({one_line(exc)})") from exc
    if dtype.hasobject:
        raise UsageError(f"data {path}: array {key!r} holds Python objects (dtype {dtype}), "
                         "which would need pickle; store numbers (and labels as strings)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_DATA_BYTES:
        raise UsageError(f"data {path}: array {key!r} of shape {shape} and dtype {dtype} needs "
                         f"{nbytes} bytes, over the {gib(MAX_DATA_BYTES)} limit")
    if nbytes > info.file_size:
        raise UsageError(f"data {path}: array {key!r} declares shape {shape} ({nbytes} bytes) "
                         f"but its member holds only {info.file_size} bytes")
    return shape, dtype


def _check_shapes(path: Path, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    (xs, xt), (ys, yt) = shapes["x"], shapes["y"]
    if len(xs) != 4:
        raise UsageError(f"data {path}: x has shape {xs}; expected 4 dimensions (N, C, H, W)")
    if xt.kind not in "fiu" or yt.kind not in "iu":
        raise UsageError(f"data {path}: x must be real numbers and y integer class ids "
                         f"(got {xt} and {yt})")
    n_y = math.prod(ys)
    if len(ys) > 2 or n_y != xs[0]:
        raise UsageError(f"data {path}: x has {xs[0]} samples but y has {n_y}"
                         + (f" (y has shape {ys}; expected (N,))" if len(ys) > 1 else ""))
    if xs[0] == 0:
        raise UsageError(f"data {path}: holds no samples (x has shape {xs})")
    if 0 in xs[1:]:
        raise UsageError(f"data {path}: x has shape {xs}; each sample needs C, H and W >= 1")
    if "labels" in shapes and (math.prod(shapes["labels"][0]) > MAX_CLASSES
                               or shapes["labels"][1].kind not in "USiu"):
        raise UsageError(f"data {path}: labels must be at most {MAX_CLASSES} strings")


def _read(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    with zf.open(info) as f:
        try:
            return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise UsageError(f"data {path}: array {key!r} cannot be read "
                             f"({one_line(exc)})") from exc


def read_image_folder(path: Path, size: int) -> Arrays:
    root = path.resolve()
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UsageError(f"data {path}: expected one subfolder of images per class "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(classes) > MAX_CLASSES:
        raise UsageError(f"data {path}: {len(classes)} class folders; at most {MAX_CLASSES}")
    files: list[tuple[int, Path]] = []
    for index, folder in enumerate(classes):
        _inside(root, folder)
        images = [f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise UsageError(f"data {folder}: class folder holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}); remove it or add some")
        for f in images:
            _inside(root, f)
            if not f.is_file():
                raise UsageError(f"data {f}: not a regular file")
        files += [(index, f) for f in images]
    if len(files) * 3 * size * size * 4 > MAX_DATA_BYTES:
        raise UsageError(f"data {path}: {len(files)} images at {size}x{size} need more than "
                         f"{gib(MAX_DATA_BYTES)}; use fewer images or a smaller --image-size")
    arrays = [_image(f, size) for _, f in files]
    if any(a.ndim == 3 for a in arrays):  # one colour image makes the whole set RGB
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays]
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y = np.asarray([i for i, _ in files], dtype=np.int64)
    return np.ascontiguousarray(x), y, [c.name for c in classes]


def _inside(root: Path, p: Path) -> None:
    if not p.resolve().is_relative_to(root):
        raise UsageError(f"data {p}: a link out of the data folder {root}; "
                         "copy the file into the folder instead")


def _image(f: Path, size: int) -> np.ndarray:
    """One image, its pixel count checked from the header, decoded and resized at once."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im: Any = Image.open(f)
        with im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UsageError(f"data {f}: image of {w}x{h} pixels is over the "
                                 f"{MAX_IMAGE_PIXELS} pixel limit; shrink it first")
            mode = "L" if im.mode in ("L", "1") else "RGB"
            small = im.convert(mode).resize((size, size), Image.BILINEAR)
    except UsageError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own, far higher, cap
        raise UsageError(f"data {f}: image over the {MAX_IMAGE_PIXELS} pixel limit "
                         f"({one_line(exc)}); shrink it first") from exc
    except Exception as exc:  # PIL raises many types for broken files (OSError, bombs, ...)
        raise UsageError(f"data {f}: not a readable image ({one_line(exc)})") from exc
    return np.asarray(small, np.float32) / 255
