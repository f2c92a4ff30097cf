"""Load a verified bundle and run it: the runtime's Python API."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import targets
from runtime import preprocess
from runtime.bundle import BundleError, extract_bundle
from runtime.manifest import Manifest
from runtime.signing import TrustStore, load_trust
from targets.base import BackendUnavailable, Session


@dataclass(frozen=True)
class SelfTestResult:
    ok: bool
    max_abs_error: float
    tolerance: float
    top1_agreement: float
    message: str


class Model:
    """A bundle's model, loaded in its backend. `predict` takes raw inputs shaped like the
    manifest's `input.raw_shape` (one sample or a batch) and returns the model's outputs."""

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None,
                 owns_folder: bool) -> None:
        self.folder = folder
        self.manifest = manifest
        self._owns_folder = owns_folder
        backend = manifest.target.backend
        if backend not in targets.BACKENDS:
            raise BundleError(
                f"bundle needs backend {backend!r}, which this runtime does not have "
                f"(registered: {', '.join(sorted(targets.BACKENDS))})"
            )
        plugin = targets.get(backend)
        if reason := plugin.run_unavailable_reason():
            raise BackendUnavailable(f"bundle needs backend {backend!r}: {reason}")
        self.threads = threads or manifest.target.threads
        self.session: Session = plugin.open_session(folder / manifest.model_file, self.threads)
        self.raw_shape = manifest.input.raw_shape
        self.labels: list[str] = list(manifest.output.labels)

    @property
    def backend(self) -> str:
        return self.manifest.target.backend

    def _batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.shape == self.raw_shape:
            x = x[None]
        if x.ndim != len(self.raw_shape) + 1 or x.shape[1:] != self.raw_shape:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model: it takes "
                f"{self.raw_shape} or a batch (N, {', '.join(map(str, self.raw_shape))})"
            )
        return x

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Raw input -> outputs (logits for a classifier), float32, batch first."""
        x = preprocess.apply(self.manifest.input.preprocessing, self._batch(x))
        return self.session.run(x)

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw input -> (class ids, confidence = top softmax probability)."""
        probs = preprocess.softmax(self.predict(x))
        return probs.argmax(axis=-1), probs.max(axis=-1)

    def self_test(self) -> SelfTestResult:
        """Run the golden inputs and compare with the outputs the build measured."""
        golden = self.manifest.golden
        inputs = np.load(self.folder / golden.inputs)
        expected = np.load(self.folder / golden.outputs)
        got = self.predict(inputs)
        if got.shape != expected.shape:
            return SelfTestResult(False, float("inf"), golden.atol, 0.0,
                                  f"golden output shape {got.shape} != expected {expected.shape}")
        err = float(np.max(np.abs(got - expected))) if got.size else 0.0
        scale = float(np.max(np.abs(expected))) if expected.size else 1.0
        tolerance = golden.atol + golden.rtol * scale
        agree = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
        ok = err <= tolerance and agree >= golden.min_top1_agreement
        message = (
            f"golden self-test {'passed' if ok else 'FAILED'}: {len(inputs)} inputs, max |error| "
            f"{err:.3g} (tolerance {tolerance:.3g}), top-1 agreement {agree:.0%}"
        )
        return SelfTestResult(ok, err, tolerance, agree, message)

    def close(self) -> None:
        if self._owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    bundle: Path | str,
    *,
    trust: TrustStore | Path | str | None = None,
    threads: int | None = None,
    workdir: Path | str | None = None,
    self_test: bool = True,
) -> Model:
    """Verify a bundle (archive safety, hashes, signature), extract it into `workdir` (a
    fresh temporary folder if not given), load its model, and by default run the golden
    self-test. With `trust` (a trust file, or runtime.signing.load_trust's result) the bundle
    must be signed by a trusted, unrevoked key. Raises BundleError with a clear message on
    any mismatch, runtime.signing.TrustFileError when the trust file is malformed."""
    if trust is not None and not isinstance(trust, TrustStore):
        trust = load_trust(trust)
    owns = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="edgepack-")) if owns else Path(workdir)
    try:
        manifest = extract_bundle(bundle, folder, trust=trust)
        model = Model(folder, manifest, threads, owns)
        if self_test:
            result = model.self_test()
            if not result.ok:
                raise BundleError(result.message)
        return model
    except BaseException:
        if owns:
            shutil.rmtree(folder, ignore_errors=True)
        raise
