"""Input preprocessing, shared by the build (which evaluates through it) and the runtime,
so a device feeds its model exactly what the build measured. numpy only."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def normalization(mean: list[float], std: list[float]) -> dict[str, Any]:
    """The manifest's preprocessing record: per-channel (x - mean) / std on NCHW float input."""
    return {"kind": "normalize", "layout": "NCHW", "mean": list(mean), "std": list(std)}


def check(spec: dict[str, Any], raw_shape: tuple[int, ...]) -> None:
    """Refuse a preprocessing record `apply` cannot use on samples of `raw_shape`."""
    if spec.get("kind") != "normalize":
        raise ValueError(f"unknown preprocessing {spec.get('kind')!r} (this runtime knows "
                         "'normalize')")
    if spec.get("layout", "NCHW") != "NCHW" or len(raw_shape) != 3:
        raise ValueError(f"'normalize' works on NCHW samples of shape (C, H, W), not "
                         f"{spec.get('layout')!r} samples of shape {raw_shape}")
    for key in ("mean", "std"):
        values = spec.get(key)
        if not (isinstance(values, list) and len(values) in (1, raw_shape[0]) and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                and (key == "mean" or v != 0) for v in values)):
            raise ValueError(f"'{key}' must be a list of 1 or {raw_shape[0]} finite numbers"
                             + (", none zero" if key == "std" else ""))


def constants(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (mean, std) as float32 arrays shaped (1, C, 1, 1): what `apply`
    computes with, and what a backend's serving path folds into its input stage."""
    if spec.get("kind") != "normalize":
        raise ValueError(f"unknown preprocessing {spec.get('kind')!r}")
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return mean, std


def apply(spec: dict[str, Any], x: np.ndarray) -> np.ndarray:
    mean, std = constants(spec)
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
