"""Training data: the built-in digits, an `.npz` file, or a folder of images per class.

Every source becomes raw float32 NCHW arrays split into train/validation/test, stratified by
class with a fixed seed. Raw means before normalization: the per-channel mean and std of the
training split go into the bundle, and the runtime normalizes exactly as the build did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain.build.data_files import read_image_folder, read_npz
from toolchain.build.safe_archive import one_line
from toolchain.errors import UsageError

SPLIT = (0.70, 0.15, 0.15)  # train, validation, test


@dataclass
class Dataset:
    name: str
    labels: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str  # of the full source arrays, before splitting
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.x_train)}/{len(self.x_val)}/{len(self.x_test)} "
                f"train/val/test samples of {self.sample_shape}, {self.num_classes} classes")


def load_data(ref: str, seed: int, image_size: int = 32) -> Dataset:
    """`digits`, a path to an `.npz` file, or a folder with one subfolder of images per class."""
    if ref == "digits":
        x, y, labels = _digits()
        name = "digits"
    else:
        path = Path(ref)
        if not path.exists():
            raise UsageError(
                f"data {ref!r} not found; --data takes 'digits', an .npz file with arrays x "
                f"(float32, NCHW) and y (int64), or a folder with one subfolder of images per class"
            )
        try:
            if path.is_dir():
                x, y, labels = read_image_folder(path, image_size)
            elif path.suffix.lower() == ".npz":
                x, y, labels = read_npz(path)
            else:
                raise UsageError(f"data {ref!r}: expected 'digits', an .npz file or a folder "
                                 "of images")
        except OSError as exc:  # unreadable files or folders (permissions, I/O errors)
            raise UsageError(f"data {ref!r}: cannot be read ({one_line(exc)})") from exc
        name = path.name
    return split(name, x, y, labels, seed)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear (align_corners=False) interpolation weights, shape (n_out, n_in)."""
    centers = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    centers = np.clip(centers, 0, n_in - 1)
    lo = np.floor(centers).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = centers - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # (N, 8, 8) in [0, 1]
    r = _resize_matrix(8, 32)
    x = np.einsum("ij,njk,lk->nil", r, images, r).astype(np.float32)[:, None]
    return x, digits.target.astype(np.int64), [str(i) for i in range(10)]


def split(name: str, x: np.ndarray, y: np.ndarray, labels: list[str], seed: int) -> Dataset:
    """Stratified train/validation/test split; the same seed gives the same split."""
    counts = np.bincount(y, minlength=len(labels))
    if (small := [labels[i] for i, c in enumerate(counts) if 0 < c < 3]):
        raise UsageError(f"data {name}: classes {', '.join(small)} have fewer than 3 samples; "
                         "each class needs at least one sample for train, validation and test")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for cls in range(len(labels)):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_val = max(1, round(len(idx) * SPLIT[1]))
        n_test = max(1, round(len(idx) * SPLIT[2]))
        parts[0] += idx[n_val + n_test:].tolist()
        parts[1] += idx[:n_val].tolist()
        parts[2] += idx[n_val : n_val + n_test].tolist()
    train, val, test = (np.sort(np.asarray(p, dtype=np.int64)) for p in parts)
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    xt = x[train]
    mean = xt.mean(axis=(0, 2, 3)).astype(float).tolist()
    std = [max(s, 1e-6) for s in xt.std(axis=(0, 2, 3)).astype(float).tolist()]
    return Dataset(name, labels, x[train], y[train], x[val], y[val], x[test], y[test],
                   digest.hexdigest(), mean, std)
