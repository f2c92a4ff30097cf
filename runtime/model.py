"""Load a verified bundle and run it: the runtime's Python API."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import targets
from runtime import preprocess
from runtime.bundle import MANIFEST, BundleError, extract_bundle
from runtime.contents import ContentError, check_finite, check_reference, load_npy, one_line
from runtime.manifest import Manifest
from runtime.signing import TrustStore, load_trust
from targets.base import BackendUnavailable, Session

_FLOAT32 = np.dtype(np.float32)

@dataclass(frozen=True)
class SelfTestResult:
    ok: bool
    max_abs_error: float
    tolerance: float
    top1_agreement: float
    message: str


class Model:
    """A bundle's model, loaded in its backend. `predict` takes raw inputs shaped like the
    manifest's `input.raw_shape` (one sample or a batch) and returns the model's outputs.
    One call at a time: the serving path writes into buffers allocated once (runtime.device
    serializes its callers)."""

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
        self.raw_shape = manifest.input.raw_shape
        try:
            preprocess.check(manifest.input.preprocessing, self.raw_shape)
        except ValueError as exc:
            raise BundleError(f"{MANIFEST}: field 'input.preprocessing': {exc}") from exc
        self.golden = _golden_arrays(folder, manifest)
        self.reference: dict[str, Any] | None = _reference(folder, manifest)
        self.threads = threads or manifest.target.threads
        try:
            self.session: Session = plugin.open_session(folder / manifest.model_file,
                                                        self.threads)
        except (BundleError, BackendUnavailable):
            raise
        except Exception as exc:  # each backend library raises its own types
            raise BundleError(f"backend {backend!r} cannot load {manifest.model_file}: "
                              f"{one_line(exc)}") from exc
        self.labels: list[str] = list(manifest.output.labels)
        # raw inputs -> what input drift is measured on (audio: its log-mel features); None
        # where that is the raw input itself
        spec = manifest.input.preprocessing
        self.drift_view: Callable[[np.ndarray], np.ndarray] | None = (
            None if preprocess.features(spec) is None
            else lambda x: preprocess.drift_view(spec, x))
        self._one = (1, *self.raw_shape)
        # A batch from `batch` -> outputs, float32, batch first: a new array each call. The
        # backend's function itself, not a method around it: one call less per inference.
        self.run: Callable[[np.ndarray], np.ndarray] = self._serving_path()

    def _serving_path(self) -> Callable[[np.ndarray], np.ndarray]:
        """The backend's fast path (targets.fastpath: preallocated buffers, normalization
        folded into the input stage) where it offers one, else normalize, then run."""
        spec = self.manifest.input.preprocessing
        runner = getattr(self.session, "runner", None)
        fast = runner(*preprocess.constants(spec)) if runner is not None else None
        feature = preprocess.features(spec)  # audio: log-mel features before normalizing
        if fast is not None and feature is None:
            return fast
        if fast is not None:
            def featured(x: np.ndarray) -> np.ndarray:
                check_finite(x, "the input")
                return fast(feature(x))

            return featured
        run = self.session.run

        def reference(x: np.ndarray) -> np.ndarray:
            check_finite(x, "the input")
            return run(preprocess.apply(spec, x))

        return reference

    @property
    def backend(self) -> str:
        return self.manifest.target.backend

    def batch(self, x: np.ndarray) -> np.ndarray:
        """Raw input (one sample or a batch) -> a float32 batch (N, *raw_shape); ValueError
        when it does not fit. A float32 batch of one passes as it is: NaN and infinities in
        it are refused by `run`, which reads every value anyway."""
        if type(x) is np.ndarray and x.dtype is _FLOAT32 and x.shape == self._one:
            return x  # the serving path's common case: one sample, already a batch
        return self._batch(x)

    def _batch(self, x: np.ndarray) -> np.ndarray:
        if isinstance(x, np.ndarray) and x.dtype.kind not in "biuf":
            raise ValueError(f"inputs of dtype {x.dtype} do not fit this model: it takes "
                             "numbers (float32)")
        try:
            x = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"inputs must be numbers shaped like {self.raw_shape} "
                             f"({one_line(exc)})") from exc
        check_finite(x, "the input")  # before the shape: a NaN is the first thing wrong
        if x.shape == self.raw_shape:
            x = x[None]
        if x.ndim != len(self.raw_shape) + 1 or x.shape[1:] != self.raw_shape:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model: it takes "
                f"{self.raw_shape} or a batch (N, {', '.join(map(str, self.raw_shape))})"
            )
        return x

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Raw input -> outputs (logits for a classifier), float32, batch first: a new array
        each call, never a buffer a later call writes into."""
        if type(x) is np.ndarray and x.dtype is _FLOAT32 and x.shape == self._one:
            return self.run(x)  # `batch` inlined: the serving path's common case
        return self.run(self._batch(x))

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw input -> (class ids, confidence = top softmax probability)."""
        probs = preprocess.softmax(self.predict(x))
        return probs.argmax(axis=-1), probs.max(axis=-1)

    def self_test(self) -> SelfTestResult:
        """Run the golden inputs and compare with the outputs the build measured."""
        golden = self.manifest.golden
        inputs, expected = self.golden
        try:
            got = self.predict(inputs)
        except Exception as exc:  # the backend's own error types: the model does not run
            raise BundleError(f"backend {self.backend!r} cannot run "
                              f"{self.manifest.model_file} on the golden inputs: "
                              f"{one_line(exc)}") from exc
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
    except BaseException:
        if owns:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    # from here on the folder holds only what this call extracted: remove it all on failure
    try:
        model = Model(folder, manifest, threads, owns)
        if self_test:
            result = model.self_test()
            if not result.ok:
                raise BundleError(result.message)
        return model
    except BaseException:
        _empty(folder, remove=owns)
        raise


def _empty(folder: Path, remove: bool) -> None:
    if remove:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _golden_arrays(folder: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """The golden inputs and outputs, checked: loadable numeric arrays, finite, one per
    golden input, shaped like the model's raw input and output."""
    golden = manifest.golden
    try:
        inputs = load_npy(folder / golden.inputs, golden.inputs)
        outputs = load_npy(folder / golden.outputs, golden.outputs)
        check_finite(inputs, golden.inputs)
        check_finite(outputs, golden.outputs)
    except ContentError as exc:
        raise BundleError(str(exc)) from exc
    raw, out = manifest.input.raw_shape, manifest.output.tensor.shape
    if inputs.shape != (golden.count, *raw):
        raise BundleError(f"{golden.inputs} has shape {inputs.shape}: the manifest declares "
                          f"{golden.count} inputs of shape {raw}")
    if len(outputs) != golden.count or outputs.ndim != len(out) or any(
            d is not None and d != got for d, got in zip(out[1:], outputs.shape[1:],
                                                         strict=False)):
        raise BundleError(f"{golden.outputs} has shape {outputs.shape}: the manifest declares "
                          f"{golden.count} outputs of shape {out[1:]}")
    return inputs, outputs


def _reference(folder: Path, manifest: Manifest) -> dict[str, Any] | None:
    name = manifest.reference_distributions
    if name is None:
        return None
    try:
        return check_reference(json.loads((folder / name).read_bytes()), name)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        message = str(exc) if isinstance(exc, ContentError) else \
            f"{name} is not valid JSON ({one_line(exc)})"
        raise BundleError(message) from exc
