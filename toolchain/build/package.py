"""Assemble the bundle: manifest, model file, golden inputs/outputs, reference distributions.
The archive format itself lives in `runtime.bundle` (one source of truth for both sides)."""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from runtime import preprocess
from runtime.bundle import SCHEMA_VERSION, write_bundle
from targets.base import Backend, TensorSpec

CONFIDENCE_BINS = 20
INPUT_BINS = 32
REFERENCE_SAMPLES = 1000
# Golden tolerances: fp32 results differ slightly across CPUs (FMA, SIMD width, threads).
GOLDEN_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (1e-3, 1e-2), "int8": (1e-2, 5e-2)}


def reference_distributions(x_raw: np.ndarray, logits: np.ndarray, labels: list[str],
                            source: str) -> dict[str, Any]:
    """What drift is measured against: input statistics and histogram, predicted-class mix,
    confidence histogram and per-class logit statistics, on held-out data."""
    probs = preprocess.softmax(logits)
    pred = probs.argmax(-1)
    conf = probs.max(-1)
    lo, hi = float(x_raw.min()), float(x_raw.max())
    if hi <= lo:
        hi = lo + 1.0
    in_counts, in_edges = np.histogram(x_raw, bins=INPUT_BINS, range=(lo, hi))
    conf_counts, conf_edges = np.histogram(conf, bins=CONFIDENCE_BINS, range=(0.0, 1.0))
    n = max(len(x_raw), 1)
    return {
        "source": source,
        "count": int(len(x_raw)),
        "input": {
            "per_channel": [
                {"mean": float(c.mean()), "std": float(c.std()), "min": float(c.min()),
                 "max": float(c.max())}
                for c in np.moveaxis(x_raw, 1, 0).reshape(x_raw.shape[1], -1)
            ],
            "histogram": {"edges": in_edges.tolist(),
                          "proportions": (in_counts / in_counts.sum()).tolist()},
        },
        "output": {
            "predicted_class": {"labels": labels,
                                "proportions": (np.bincount(pred, minlength=len(labels)) / n)
                                .tolist()},
            "confidence": {"edges": conf_edges.tolist(),
                           "proportions": (conf_counts / n).tolist(),
                           "mean": float(conf.mean())},
            "logits": {"mean": logits.mean(0).tolist(), "std": logits.std(0).tolist()},
        },
        # Per-sample values for the device's two-sample tests (KS), a bounded subset.
        "samples": {
            "input_channel_means": np.round(
                x_raw[:REFERENCE_SAMPLES].reshape(min(n, REFERENCE_SAMPLES), x_raw.shape[1], -1)
                .mean(-1).T, 5).tolist(),
            "confidence": np.round(conf[:REFERENCE_SAMPLES], 5).tolist(),
        },
    }


def package(
    *,
    out_path: Path,
    work: Path,
    model_file: Path,
    model_name: str,
    model_version: str,
    profile: Any,
    backend: Backend,
    precision: str,
    input_spec: TensorSpec,
    output_spec: TensorSpec,
    raw_shape: tuple[int, ...],
    preprocessing: dict[str, Any],
    labels: list[str],
    golden_inputs: np.ndarray,
    golden_outputs: np.ndarray,
    distributions: dict[str, Any],
    metrics: dict[str, Any],
    provenance: dict[str, Any],
    key: bytes | None,
) -> Path:
    golden_dir = work / "golden"
    golden_dir.mkdir(exist_ok=True)
    np.save(golden_dir / "inputs.npy", golden_inputs.astype(np.float32))
    np.save(golden_dir / "outputs.npy", golden_outputs.astype(np.float32))
    dist_path = work / "distributions.json"
    dist_path.write_text(json.dumps(distributions))
    atol, rtol = GOLDEN_TOLERANCE[precision]
    model_entry = f"model/{model_file.name}"
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": model_name, "version": model_version},
        "target": {"profile": profile.name, "backend": backend.name, "precision": precision,
                   "threads": profile.threads, "device": profile.device,
                   # the fleet listener's latency rule compares windows with these
                   "budgets": dataclasses.asdict(profile.budgets),
                   "run_needs_torch": backend.capabilities.run_needs_torch},
        "model_file": model_entry,
        "input": {**input_spec.to_dict(), "raw_shape": list(raw_shape),
                  "preprocessing": preprocessing},
        "output": {**output_spec.to_dict(), "kind": "logits", "labels": labels},
        "metrics": metrics,
        "provenance": {
            **provenance,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
        },
        "golden": {"inputs": "golden/inputs.npy", "outputs": "golden/outputs.npy",
                   "count": int(len(golden_inputs)), "atol": atol, "rtol": rtol,
                   "min_top1_agreement": 1.0},
        "reference_distributions": "reference/distributions.json",
    }
    files = {
        **{f"model/{f.name}": f for f in backend.model_files(model_file)},
        "golden/inputs.npy": golden_dir / "inputs.npy",
        "golden/outputs.npy": golden_dir / "outputs.npy",
        "reference/distributions.json": dist_path,
    }
    return write_bundle(out_path, manifest, files, key=key)
