"""Training data: the built-in digits, an `.npz` file, or a folder of images per class.

Every source becomes raw float32 NCHW arrays split into train/validation/test, stratified by
class with a fixed seed. Raw means before normalization: the per-channel mean and std of the
training split go into the bundle, and the runtime normalizes exactly as the build did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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
    sources: str = ""  # several --data sources: what each gave to training
    # runtime.preprocess's record when it is not per-channel normalization of the raw
    # samples (the keyword demo's log-mel features)
    preprocessing: dict | None = None
    demo_model: str = "demo-cnn"  # the built-in model trained on it when no --model is given
    recipe_defaults: dict | None = None  # {section: {key: value}} over the profile's defaults

    @property
    def in_channels(self) -> int:
        """The model input's channels: the raw samples' first axis, 1 for log-mel."""
        return 1 if self.preprocessing is not None else self.sample_shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.x_train)}/{len(self.x_val)}/{len(self.x_test)} "
                f"train/val/test samples of {self.sample_shape}, {self.num_classes} classes"
                + (f" ({self.sources})" if self.sources else ""))


def load_data(ref: str, seed: int, image_size: int = 32) -> Dataset:
    """`digits`, `keywords` (or `keywords:N`: N clips per keyword), a path to an `.npz` file,
    or a folder with one subfolder of images per class."""
    if ref == "keywords" or ref.startswith("keywords:"):
        return keyword_dataset(ref, seed)
    return split(*read_source(ref, image_size), seed)


def keyword_dataset(ref: str, seed: int) -> Dataset:
    """The keyword-spotting demo (toolchain.build.keywords): 1 s clips at 16 kHz; the
    clips of the held-out voices are the test split, the others are split (stratified,
    seeded) into training and validation; log-mel features normalized per mel band."""
    import sys

    from runtime import preprocess
    from toolchain.build import keywords as kw

    cfg = kw.KeywordConfig()
    if ref != "keywords":
        try:
            n = int(ref.split(":", 1)[1])
        except ValueError:
            n = 0
        if not 3 <= n <= 5000:
            raise UsageError(f"data {ref!r}: keywords:N takes N clips per keyword, 3 to 5000")
        base = kw.KeywordConfig()
        cfg = kw.KeywordConfig(per_keyword=n, unknown=max(3, round(n * base.unknown /
                                                                    base.per_keyword)),
                               silence=max(3, round(n * base.silence / base.per_keyword)))
    data = kw.make(cfg, seed, log=lambda m: print(f"    {m}", file=sys.stderr, flush=True))
    seen = np.flatnonzero(~data.held_out)
    rng = np.random.default_rng(seed)
    val_share = SPLIT[1] / (SPLIT[0] + SPLIT[1])
    train, val = [], []
    for cls in range(len(kw.LABELS)):
        idx = rng.permutation(seen[data.y[seen] == cls])
        n_val = max(1, round(len(idx) * val_share)) if len(idx) > 1 else 0
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    train, val = np.sort(train), np.sort(val)
    test = np.flatnonzero(data.held_out)
    if not len(test) or not len(val):
        raise UsageError(f"data {ref!r}: too few clips for a held-out-voice test split")
    record = preprocess.log_mel_record([0.0], [1.0])
    feats = preprocess.drift_view(record, data.x[train])  # (N, n_mels, frames)
    mean = feats.mean(axis=(0, 2)).astype(float).tolist()
    std = [max(s, 1e-6) for s in feats.std(axis=(0, 2)).astype(float).tolist()]
    record = preprocess.log_mel_record(mean, std)
    held = len(kw.held_out_voices(cfg))
    return Dataset(ref, list(kw.LABELS), data.x[train], data.y[train], data.x[val],
                   data.y[val], data.x[test], data.y[test], _sha256(data.x, data.y),
                   mean, std, f"test split: the clips of {held} of {len(kw.voices())} voices, "
                   "never trained or validated on", record, demo_model="keyword-cnn",
                   # the keyword CNN (19M MACs) loses ~1.7 points on unseen voices at the
                   # speaker's 50% pruning and none at 40% (measured, README)
                   recipe_defaults={"prune": {"ratio": 0.4}})


def read_source(ref: str, image_size: int = 32) -> tuple[str, np.ndarray, np.ndarray, list[str]]:
    """One --data source -> (its name, x, y, labels), not split."""
    if ref == "keywords" or ref.startswith("keywords:"):
        raise UsageError(f"data {ref!r} is audio with its own split by voice: give it as "
                         "the only --data source")
    if ref == "digits":
        x, y, labels = _digits()
        return "digits", x, y, labels
    path = Path(ref)
    if not path.exists():
        raise UsageError(
            f"data {ref!r} not found; --data takes 'digits', 'keywords', an .npz file with "
            f"arrays x (float32, NCHW) and y (int64), or a folder with one subfolder of images "
            f"per class"
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
    return path.name, x, y, labels


def load_sources(refs: Sequence[str], seed: int, image_size: int = 32,
                 mix: float | None = None) -> Dataset:
    """Several --data sources as one dataset: each is split (stratified, seeded) on its
    own and the splits are joined, so every source is in validation and test. `mix` (0 < R
    < 1) makes R the share of the training and validation splits drawn from the sources
    after the first, resampled with the seed (with replacement when they hold fewer): the
    validation split is what the bundle's drift reference describes. The sources must have
    the same sample shape and the same classes (a source may lack the last classes of
    another: captured data rarely sees every class). One source is load_data's."""
    refs = list(refs)
    if not refs:
        raise UsageError("--data: give at least one source")
    if mix is not None and not (0 < mix < 1 and len(refs) > 1):
        raise UsageError(f"--mix {mix:g}: give a share between 0 and 1 (exclusive) and a "
                         "second --data source to draw it from")
    if len(refs) == 1:
        return load_data(refs[0], seed, image_size)
    sources = [read_source(ref, image_size) for ref in refs]
    # a source that names its classes by index ("0", "1", ...: what `toolchain dataset
    # export` writes, captures carry no names) takes the named sources' classes by index
    named = [s[3] for s in sources if not _by_index(s[3])] or [s[3] for s in sources]
    labels = max(named, key=len)
    shape = sources[0][1].shape[1:]
    for ref, (_, x, _, names) in zip(refs, sources, strict=True):
        if x.shape[1:] != shape:
            raise UsageError(f"data {ref!r}: samples of shape {tuple(x.shape[1:])}, but "
                             f"{refs[0]!r} has {tuple(shape)}; every --data source needs the "
                             "same sample shape")
        if names != labels[:len(names)] and not (_by_index(names)
                                                 and len(names) <= len(labels)):
            raise UsageError(f"data {ref!r}: classes {_show_labels(names)} do not match "
                             f"{_show_labels(labels)}; every --data source needs the same "
                             "classes, in the same order")
    splits = []
    for i, (name, x, y, names) in enumerate(sources):
        # the first source is split exactly as alone; the others may lack samples of a
        # class (fewer than 3 go to training)
        rng = np.random.default_rng(seed if i == 0 else [seed, i])
        parts = _split_indices(name, y, names, rng, strict=i == 0)
        splits.append([(x[p], y[p]) for p in parts])
    first_train, other_train = splits[0][0], [s[0] for s in splits[1:]]
    pool_x = np.concatenate([p[0] for p in other_train])
    pool_y = np.concatenate([p[1] for p in other_train])
    detail = f"{len(first_train[1])} train samples from {refs[0]}"
    if mix is not None:
        if not len(pool_y):
            raise UsageError(f"--mix {mix:g}: the sources after the first have no training "
                             "samples to draw from")
        want = round(mix * len(first_train[1]) / (1 - mix))
        rng = np.random.default_rng([seed, len(refs), 0x6D6978])
        pick = np.sort(rng.choice(len(pool_y), want, replace=want > len(pool_y)))
        detail += (f", {want} drawn from the other {len(refs) - 1} source(s)' "
                   f"{len(pool_y)} (--mix {mix:g})")
        pool_x, pool_y = pool_x[pick], pool_y[pick]
    else:
        detail += f", {len(pool_y)} from the other {len(refs) - 1} source(s)"
    x_train = np.concatenate([first_train[0], pool_x])
    y_train = np.concatenate([first_train[1], pool_y])
    x_val = np.concatenate([s[1][0] for s in splits])
    y_val = np.concatenate([s[1][1] for s in splits])
    if mix is not None:
        # validation takes the same mix: it is what the bundle's drift reference describes,
        # and a version trained for new data must not find that data drifted
        x_val, y_val = _mixed(splits[0][1], [s[1] for s in splits[1:]], mix,
                              np.random.default_rng([seed, len(refs), 0x76616C]))
    x_test = np.concatenate([s[2][0] for s in splits])
    y_test = np.concatenate([s[2][1] for s in splits])
    digest = hashlib.sha256()  # every source's arrays, in order, and the mix
    for _, x, y, _ in sources:
        digest.update(_sha256(x, y).encode())
    digest.update(f"mix={mix}".encode())
    mean, std = _moments(x_train)
    name = " + ".join(refs) + (f" (mix {mix:g}, seed {seed})" if mix is not None else "")
    return Dataset(name, labels, x_train, y_train, x_val, y_val, x_test, y_test,
                   digest.hexdigest(), mean, std, detail)


def _by_index(names: list[str]) -> bool:
    return names == [str(i) for i in range(len(names))]


def _mixed(first: tuple[np.ndarray, np.ndarray], others: list[tuple[np.ndarray, np.ndarray]],
           mix: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`first` plus samples of `others` drawn so that they are `mix` of the result (with
    replacement when they hold fewer); `first` and `others` joined as they are when the
    others hold none."""
    pool_x = np.concatenate([o[0] for o in others])
    pool_y = np.concatenate([o[1] for o in others])
    if not len(pool_y):
        return first
    want = round(mix * len(first[1]) / (1 - mix))
    pick = np.sort(rng.choice(len(pool_y), want, replace=want > len(pool_y)))
    return np.concatenate([first[0], pool_x[pick]]), np.concatenate([first[1], pool_y[pick]])


def _show_labels(labels: list[str]) -> str:
    text = ", ".join(labels[:12]) + (", ..." if len(labels) > 12 else "")
    return f"[{text}] ({len(labels)})"


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
    train, val, test = _split_indices(name, y, labels, np.random.default_rng(seed))
    mean, std = _moments(x[train])
    return Dataset(name, labels, x[train], y[train], x[val], y[val], x[test], y[test],
                   _sha256(x, y), mean, std)


def _split_indices(name: str, y: np.ndarray, labels: list[str], rng: np.random.Generator,
                   strict: bool = True) -> list[np.ndarray]:
    """Per class: SPLIT of its samples to train, validation and test (at least one each).
    A class of fewer than 3 samples is refused (`strict`) or goes to training whole."""
    counts = np.bincount(y, minlength=len(labels))
    small = [i for i, c in enumerate(counts) if 0 < c < 3]
    if strict and small:
        raise UsageError(f"data {name}: classes {', '.join(labels[i] for i in small)} have "
                         "fewer than 3 samples; each class needs at least one sample for "
                         "train, validation and test")
    parts: list[list[int]] = [[], [], []]
    for cls in range(len(labels)):
        idx = rng.permutation(np.flatnonzero(y == cls))
        if cls in small:
            parts[0] += idx.tolist()
            continue
        n_val = max(1, round(len(idx) * SPLIT[1])) if len(idx) else 0
        n_test = max(1, round(len(idx) * SPLIT[2])) if len(idx) else 0
        parts[0] += idx[n_val + n_test:].tolist()
        parts[1] += idx[:n_val].tolist()
        parts[2] += idx[n_val : n_val + n_test].tolist()
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _sha256(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()


def _moments(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training split (what the bundle normalizes with)."""
    mean = x.mean(axis=(0, 2, 3)).astype(float).tolist()
    std = [max(s, 1e-6) for s in x.std(axis=(0, 2, 3)).astype(float).tolist()]
    return mean, std
