"""Input preprocessing, shared by the build (which evaluates through it) and the runtime,
so a device feeds its model exactly what the build measured. numpy only."""

from __future__ import annotations

from typing import Any

import numpy as np


def normalization(mean: list[float], std: list[float]) -> dict[str, Any]:
    """The manifest's preprocessing record: per-channel (x - mean) / std on NCHW float input."""
    return {"kind": "normalize", "layout": "NCHW", "mean": list(mean), "std": list(std)}


def apply(spec: dict[str, Any], x: np.ndarray) -> np.ndarray:
    if spec.get("kind") != "normalize":
        raise ValueError(f"unknown preprocessing {spec.get('kind')!r}")
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
