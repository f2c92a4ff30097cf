"""Assemble the bundle: the files that go in it (model, golden inputs/outputs, reference
distributions), the parts of the manifest that come from the profile and the backend, and
`package`, which writes them. The manifest's types live in `runtime.manifest`, the archive
format in `runtime.bundle` (one source of truth for both sides)."""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import toolchain
from runtime import preprocess
from runtime.bundle import write_bundle
from runtime.manifest import Golden, Manifest, Provenance, Target
from targets.base import Backend
from toolchain.profiles import HardwareProfile

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CONFIDENCE_BINS = 20
INPUT_BINS = 32
REFERENCE_SAMPLES = 1000
# Golden tolerances: fp32 results differ slightly across CPUs (FMA, SIMD width, threads).
GOLDEN_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (1e-3, 1e-2), "int8": (1e-2, 5e-2)}
GOLDEN_INPUTS, GOLDEN_OUTPUTS = "golden/inputs.npy", "golden/outputs.npy"
DISTRIBUTIONS = "reference/distributions.json"


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


def write_golden(work: Path, inputs: np.ndarray, outputs: np.ndarray,
                 precision: str) -> tuple[Golden, dict[str, Path]]:
    """Save the golden inputs and the outputs the build measured for them; returns the
    manifest's golden record and the files to include."""
    folder = work / "golden"
    folder.mkdir(exist_ok=True)
    np.save(folder / "inputs.npy", inputs.astype(np.float32))
    np.save(folder / "outputs.npy", outputs.astype(np.float32))
    atol, rtol = GOLDEN_TOLERANCE[precision]
    golden = Golden(inputs=GOLDEN_INPUTS, outputs=GOLDEN_OUTPUTS, count=int(len(inputs)),
                    atol=atol, rtol=rtol, min_top1_agreement=1.0)
    return golden, {GOLDEN_INPUTS: folder / "inputs.npy", GOLDEN_OUTPUTS: folder / "outputs.npy"}


def write_distributions(work: Path, distributions: dict[str, Any]) -> dict[str, Path]:
    """Save the reference distributions; the files to include, under DISTRIBUTIONS."""
    path = work / "distributions.json"
    path.write_text(json.dumps(distributions))
    return {DISTRIBUTIONS: path}


def model_entries(backend: Backend, model_file: Path) -> tuple[str, dict[str, Path]]:
    """The main model file's archive name, and every file the backend needs to load it."""
    return (f"model/{model_file.name}",
            {f"model/{f.name}": f for f in backend.model_files(model_file)})


def target_record(profile: HardwareProfile, backend: Backend, precision: str) -> Target:
    return Target(profile=profile.name, backend=backend.name, precision=precision,
                  threads=profile.threads, device=profile.device,
                  # the fleet listener's latency rule compares windows with these
                  budgets=dataclasses.asdict(profile.budgets),
                  run_needs_torch=backend.capabilities.run_needs_torch)


def provenance_record(*, source_model: str, source_model_sha256: str | None, data: str,
                      data_sha256: str, recipe: dict[str, Any], seed: int) -> Provenance:
    """Where the bundle came from, stamped with this toolchain, the time and Python."""
    return Provenance(source_model=source_model, source_model_sha256=source_model_sha256,
                      data=data, data_sha256=data_sha256, recipe=recipe, seed=seed,
                      toolchain_version=toolchain.__version__,
                      built_at=datetime.now(UTC).isoformat(timespec="seconds"),
                      python=platform.python_version())


def package(out_path: Path, manifest: Manifest, files: dict[str, Path],
            key: Ed25519PrivateKey | None = None) -> Path:
    """Write the bundle: `manifest` (its files table is filled in here) and `files`, archive
    name -> local file. Every file the manifest points at must be among `files`."""
    if missing := [f"{where} = {name}" for where, name in manifest.referenced_files().items()
                   if name not in files]:
        raise ValueError(f"manifest points at files not packaged: {', '.join(missing)}")
    return write_bundle(out_path, manifest.to_dict(), files, key=key)
