"""The Backend protocol: what every backend plugin declares and provides. numpy only.

A backend is one subpackage of `targets/` holding everything about it, each half in its own
module so that importing one never imports the others' libraries:

    run       torch-free: unavailable_reason(), open_session(path, threads), model_files(main);
              optionally build_unavailable_reason() when the build needs more than running
              does (a GPU to compile for)
    export    export(model, example, out_dir) -> the main model file (may import torch)
    quantizer quantize(job) -> model file; float_units(module, fp32_path) -> layer names;
              accuracy_aware(job, x_val, y_val, max_drop) and qat(job, train) where declared
    graph     read_ops(path) -> [Op]: the operators the cost model prices
    profiler  layer_times(path, threads, x, runs) -> ({(name, type): total ms}, source)

The package's `__init__` declares one `Backend` (name, capabilities, module paths) and
nothing else; `targets.registry` lists the packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend's runtime library is not installed here."""


class ExportUnsupported(RuntimeError):
    """This backend cannot be produced from the given model (e.g. LiteRT from an ONNX file)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...]  # None where the dimension is dynamic
    dtype: str  # numpy dtype name as the backend sees it ("float32", "int8", ...)
    scale: float | None = None  # set for quantized tensors
    zero_point: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


class Session(Protocol):
    """A loaded model. `run` takes a preprocessed float32 batch (N, ...) and returns float32
    outputs (N, ...): quantizing inputs and dequantizing outputs is the session's job. A
    session may also offer `runner(mean, std)`, the runtime's serving path on raw inputs
    (targets.fastpath); runtime.model normalizes, then calls `run`, where it does not."""

    input: TensorSpec
    output: TensorSpec

    def run(self, x: np.ndarray) -> np.ndarray: ...


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    info = np.iinfo(np.dtype(spec.dtype))
    q = np.round(x / spec.scale) + spec.zero_point
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    return ((q.astype(np.float32) - spec.zero_point) * spec.scale).astype(np.float32)


def is_quantized(spec: TensorSpec) -> bool:
    return np.dtype(spec.dtype).kind in "iu" and bool(spec.scale)


def eval_mode(model: Any) -> Any:
    """model.eval(), for modules that allow it. A torch.export graph module refuses eval()
    and needs none: it was captured in the mode it was exported in."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


# ---- operators, as the cost model sees them ---------------------------------------------

KINDS = ("conv", "depthwise", "matmul", "elementwise", "pooling", "other")
LANES = 8  # kernels work on channel blocks of this many (AVX2/AVX-512 and NEON kernels alike)


def pad_lanes(n: int) -> int:
    """n rounded up to whole blocks of LANES."""
    return -(-int(n) // LANES) * LANES


@dataclass(frozen=True)
class Op:
    """One operator of an exported model, with what drives its cost."""

    name: str
    kind: str  # one of KINDS
    dtype: str  # the arithmetic's data type: fp32, fp16 or int8
    macs: int  # multiply-accumulates; for ops without them, elements produced
    bytes: int  # inputs read plus outputs written
    padded_macs: int = 0  # the MACs with channel counts rounded up to whole blocks of LANES

    @property
    def work(self) -> int:
        return self.padded_macs or self.macs


def arithmetic_dtype(numpy_dtype: object) -> str:
    kind = np.dtype(numpy_dtype)
    if kind in (np.int8, np.uint8):
        return "int8"
    if kind == np.float16:
        return "fp16"
    return "fp32"


# ---- the plugin contract ------------------------------------------------------------------

@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared once; the build, the runtime and the tests read these
    instead of comparing backend names."""

    precisions: tuple[str, ...]  # what it can ship; fp32 is always one
    dynamic_batch: bool  # one model file runs any batch size
    run_needs_torch: bool  # the run half needs torch (the manifest says so)
    from_onnx: bool  # can be made from an ONNX file, not only from a PyTorch model
    extra: str  # the pip extra that installs the run half
    layer_profiler: bool  # per-layer times through the Python API
    float_layers: bool = False  # the quantizer can keep named layers in float
    accuracy_aware: bool = False  # the quantizer has an accuracy-aware mode
    qat: bool = False  # quantization-aware fine-tuning
    quantizes_from_torch: bool = False  # int8 needs the PyTorch module, not the fp32 export
    accelerator: str = "cpu"  # what it runs on in production: "cpu" or "nvidia-gpu"


@dataclass
class QuantizeJob:
    """One quantization: the fp32 export in this backend and what calibrates it."""

    precision: str
    fp32_path: Path
    module: Any  # the torch module it came from, or None (an ONNX input model)
    example: np.ndarray  # one preprocessed sample, batch first
    calibration: np.ndarray  # preprocessed samples
    out_dir: Path
    float_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Backend:
    """A registered backend: its declaration plus lazy access to its halves."""

    name: str
    description: str
    capabilities: Capabilities
    model_file: str  # the main model file's name inside a bundle's model/ folder
    # the halves' module paths, imported only when used
    run_module: str
    export_module: str
    quantizer_module: str | None = None
    graph_module: str | None = None
    profiler_module: str | None = None
    no_profiler_reason: str = "no per-layer profiler through its Python API"
    # other backends whose cost-model fit stands in when this one has none
    cost_fit_fallbacks: tuple[str, ...] = ()

    def _module(self, path: str | None, what: str) -> ModuleType:
        if path is None:
            raise NotImplementedError(f"backend {self.name} has no {what}")
        return importlib.import_module(path)

    # the run half (torch-free) --------------------------------------------------------------
    def run_unavailable_reason(self) -> str | None:
        """Why the run half cannot run here (its library is missing), or None."""
        return self._module(self.run_module, "run half").unavailable_reason()

    def build_unavailable_reason(self) -> str | None:
        """Why a build should not pick this backend here, or None."""
        run = self._module(self.run_module, "run half")
        check = getattr(run, "build_unavailable_reason", run.unavailable_reason)
        return check()

    def open_session(self, model_path: Path, threads: int) -> Session:
        return self._module(self.run_module, "run half").open_session(Path(model_path), threads)

    def model_files(self, main: Path) -> list[Path]:
        """The main model file and everything it needs beside it."""
        return self._module(self.run_module, "run half").model_files(Path(main))

    # the build halves -----------------------------------------------------------------------
    def export(self, model: Any, example: Any, out_dir: Path) -> Path:
        """A torch module (or a Path to an ONNX file, where capabilities.from_onnx) exported
        to out_dir; returns the main model file."""
        return self._module(self.export_module, "exporter").export(model, example, out_dir)

    def supports(self, precision: str) -> bool:
        return precision == "fp32" or precision in self.capabilities.precisions

    def _quantizer_call(self, job: QuantizeJob, log_name: str, call: Callable[[Any], Path]
                        ) -> Path:
        """Run `call(quantizer module)` with the converters' chatter sent to a log in
        job.out_dir."""
        from targets.export_log import converter_output_to

        job.out_dir.mkdir(parents=True, exist_ok=True)
        with converter_output_to(job.out_dir / log_name):
            return call(self._module(self.quantizer_module, "quantizer"))

    def quantize(self, job: QuantizeJob) -> Path:
        return self._quantizer_call(job, "quantize.log", lambda q: q.quantize(job))

    def float_units(self, module: Any, fp32_path: Path) -> list[str]:
        """The names of what the quantizer can keep in float (layers or graph nodes)."""
        return self._module(self.quantizer_module, "quantizer").float_units(module, fp32_path)

    def quantize_accuracy_aware(self, job: QuantizeJob, x_val: np.ndarray, y_val: np.ndarray,
                                max_drop: float) -> Path:
        return self._quantizer_call(
            job, "quantize.log", lambda q: q.accuracy_aware(job, x_val, y_val, max_drop))

    def quantize_qat(self, job: QuantizeJob, train: Callable[[Any], None]) -> Path:
        return self._quantizer_call(job, "export.log", lambda q: q.qat(job, train))

    # latency ----------------------------------------------------------------------------------
    def graph_ops(self, model_file: Path) -> list[Op]:
        return self._module(self.graph_module, "graph reader").read_ops(Path(model_file))

    def layer_times(self, model_file: Path, threads: int, shape: tuple[int, ...],
                    runs: int = 50) -> tuple[list[dict[str, Any]], str]:
        """Per-layer mean times from the backend's own profiler, slowest first, and the
        profiler's name; ([], why not) where the backend has none."""
        if self.profiler_module is None:
            return [], f"{self.name} offers {self.no_profiler_reason}"
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        totals, source = self._module(self.profiler_module, "profiler").layer_times(
            Path(model_file), threads, x, runs)
        whole = sum(totals.values()) or 1.0
        layers = [{"name": n, "type": t, "ms": ms / runs, "share": ms / whole}
                  for (n, t), ms in sorted(totals.items(), key=lambda kv: -kv[1])]
        return layers, source
