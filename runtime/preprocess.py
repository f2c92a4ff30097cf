"""Input preprocessing, shared by the build (which evaluates through it) and the runtime,
so a device feeds its model exactly what the build measured. numpy only."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

LOG_MEL_DEFAULTS: dict[str, Any] = {
    "sample_rate": 16000, "clip_samples": 16000, "n_fft": 512, "win": 400, "hop": 160,
    "n_mels": 40, "fmin": 20.0, "fmax": 8000.0, "log_floor": 1e-6}
# What a bundle's log-mel record may ask for (it is hostile input): integer fields and their
# ranges; a clip's features are capped at MAX_FEATURES values.
_LOG_MEL_INTS = {"sample_rate": (4000, 48000), "clip_samples": (256, 192000),
                 "n_fft": (32, 4096), "win": (16, 4096), "hop": (1, 4096), "n_mels": (1, 128)}
MAX_FEATURES = 65536
KINDS = ("normalize", "log-mel")


def normalization(mean: list[float], std: list[float]) -> dict[str, Any]:
    """The manifest's preprocessing record: per-channel (x - mean) / std on NCHW float input."""
    return {"kind": "normalize", "layout": "NCHW", "mean": list(mean), "std": list(std)}


def log_mel_record(mean: list[float], std: list[float], **params: Any) -> dict[str, Any]:
    """The record of an audio bundle: raw input = one clip of `clip_samples` float32 samples
    in [-1, 1] at `sample_rate` (shape (clip_samples,)); model input = the clip's log-mel
    features (runtime.audio.log_mel) normalized per mel band, shaped (1, n_mels, frames)."""
    return {"kind": "log-mel", **LOG_MEL_DEFAULTS, **params, "mean": list(mean),
            "std": list(std)}


def check(spec: dict[str, Any], raw_shape: tuple[int, ...]) -> None:
    """Refuse a preprocessing record `apply` cannot use on samples of `raw_shape`."""
    kind = spec.get("kind")
    if kind == "log-mel":
        _check_log_mel(spec, raw_shape)
        return
    if kind != "normalize":
        raise ValueError(f"unknown preprocessing {kind!r} (this runtime knows "
                         f"{', '.join(map(repr, KINDS))})")
    if spec.get("layout", "NCHW") != "NCHW" or len(raw_shape) != 3:
        raise ValueError(f"'normalize' works on NCHW samples of shape (C, H, W), not "
                         f"{spec.get('layout')!r} samples of shape {raw_shape}")
    _check_moments(spec, raw_shape[0])


def _check_moments(spec: dict[str, Any], channels: int) -> None:
    for key in ("mean", "std"):
        values = spec.get(key)
        if not (isinstance(values, list) and len(values) in (1, channels) and all(
                _finite(v) and (key == "mean" or v != 0) for v in values)):
            raise ValueError(f"'{key}' must be a list of 1 or {channels} finite numbers"
                             + (", none zero" if key == "std" else ""))


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


MAX_SPECTRUM = 1 << 20  # spectrum values of one clip: 4 MiB (the demo's: 98 x 257)


def _check_log_mel(spec: dict[str, Any], raw_shape: tuple[int, ...]) -> None:
    for key, (lo, hi) in _LOG_MEL_INTS.items():
        v = spec.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise ValueError(f"'log-mel' field {key!r} must be an integer from {lo} to {hi}, "
                             f"not {v!r}")
    n_fft, win, hop = spec["n_fft"], spec["win"], spec["hop"]
    if n_fft & (n_fft - 1) or win > n_fft or hop > win or win > spec["clip_samples"]:
        raise ValueError(f"'log-mel' needs n_fft a power of two, hop <= win <= n_fft and win "
                         f"<= clip_samples (n_fft {n_fft}, win {win}, hop {hop})")
    fmin, fmax, floor = spec.get("fmin"), spec.get("fmax"), spec.get("log_floor")
    if not (_finite(fmin) and _finite(fmax) and 0 <= fmin < fmax <= spec["sample_rate"] / 2):
        raise ValueError(f"'log-mel' needs 0 <= fmin < fmax <= sample_rate / 2 (fmin {fmin!r}, "
                         f"fmax {fmax!r})")
    if not (_finite(floor) and 0 < floor < 1):
        raise ValueError(f"'log-mel' field 'log_floor' must be a number between 0 and 1, not "
                         f"{floor!r}")
    frames = frame_count(spec)
    if spec["n_mels"] * frames > MAX_FEATURES:
        raise ValueError(f"'log-mel' features of {spec['n_mels']} x {frames} values: at most "
                         f"{MAX_FEATURES}")
    # what computing them holds for one clip: every frame's spectrum (a tiny hop over a long
    # clip with a big FFT asks for gigabytes while the features stay few)
    if frames * (n_fft // 2 + 1) > MAX_SPECTRUM:
        raise ValueError(f"'log-mel' spectra of {frames} frames x {n_fft // 2 + 1} bins: at "
                         f"most {MAX_SPECTRUM} values a clip (a larger hop or a smaller n_fft)")
    if tuple(raw_shape) != (spec["clip_samples"],):
        raise ValueError(f"'log-mel' takes clips of shape ({spec['clip_samples']},), not "
                         f"samples of shape {tuple(raw_shape)}")
    _check_moments(spec, spec["n_mels"])


def frame_count(spec: dict[str, Any]) -> int:
    """The feature frames of one clip under a log-mel record."""
    return 1 + (spec["clip_samples"] - spec["win"]) // spec["hop"]


def constants(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The (mean, std) `apply` normalizes `features` with, as float32 arrays that broadcast
    over the model's input: (1, C, 1, 1) per image channel, (1, 1, n_mels, 1) per mel band.
    What a backend's serving path folds into its input stage."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown preprocessing {kind!r}")
    shape = (1, -1, 1, 1) if kind == "normalize" else (1, 1, -1, 1)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(shape)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(shape)
    return mean, std


def features(spec: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray] | None:
    """What comes before the normalization: raw clips (N, clip_samples) -> log-mel (N, 1,
    n_mels, frames) for an audio record; None where the raw input is normalized as it is."""
    if spec.get("kind") != "log-mel":
        return None
    from runtime import audio

    params = {k: spec[k] for k in ("sample_rate", "n_fft", "win", "hop", "n_mels", "fmin",
                                   "fmax", "log_floor")}

    def compute(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return audio.log_mel(x.reshape(-1, x.shape[-1]), **params)[:, None]

    return compute


def drift_view(spec: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """Raw inputs (N, ...) as input drift is measured on them, (N, channels, values): the
    raw values for images; the log-mel features (N, n_mels, frames), before normalization,
    for audio, whose raw samples say little (a histogram of sample values hardly sees a new
    voice; the bands' log energies see a voice, noise and a microphone's gain)."""
    feature = features(spec)
    if feature is None:
        return np.asarray(x, dtype=np.float32)
    return feature(x)[:, 0]


def apply(spec: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """Raw inputs (a batch) -> the model's inputs."""
    mean, std = constants(spec)
    feature = features(spec)
    x = np.asarray(x, dtype=np.float32) if feature is None else feature(x)
    return ((x - mean) / std).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
