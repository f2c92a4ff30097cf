"""Assess a candidate model as it would ship: export it to the backend (in its precision),
evaluate it there on the validation and test splits, count it, and time it in a fresh
torch-free process with the target's thread count. Every stage of the build ends with one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from targets.base import Backend
from targets.export_log import converter_output_to, log_tail
from toolchain.errors import ToolchainError
from toolchain.latency.measure import measure_fresh


@dataclass
class Context:
    """What every assessment needs, fixed for one build."""

    backend: Backend
    threads: int
    x_train: np.ndarray  # preprocessed
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    work: Path
    bench_runs: int
    calibration_samples: int
    log: Any = print
    _count: int = 0

    def new_dir(self, stage: str) -> Path:
        self._count += 1
        folder = self.work / f"{self._count:02d}-{stage}"
        folder.mkdir()
        return folder

    @property
    def calibration(self) -> np.ndarray:
        return self.x_train[: self.calibration_samples]


@dataclass
class Candidate:
    stage: str
    precision: str
    model_file: Path
    module: Any  # the torch module it came from (None for an ONNX input model)
    accuracy: float  # held-out test split, in the backend
    val_accuracy: float
    params: int
    macs: int
    size_bytes: int
    latency: dict[str, Any]
    peak_rss_mb: float
    cold_start_ms: float
    did: str
    float_layers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"accuracy": round(self.accuracy, 6), "val_accuracy": round(self.val_accuracy, 6),
                "params": self.params, "macs": self.macs, "size_bytes": self.size_bytes,
                "latency_ms": self.latency, "precision": self.precision, "did": self.did,
                **({"float_layers": list(self.float_layers)} if self.float_layers else {})}


def export_fp32(ctx: Context, source: Any, folder: Path) -> Path:
    """source: a torch module, or a Path to an ONNX file."""
    log = folder / "export.log"
    try:
        if isinstance(source, Path):
            example: Any = ctx.x_test[:1]
        else:
            import torch

            example = torch.from_numpy(ctx.x_test[:1])
        with converter_output_to(log):
            return ctx.backend.export(source, example, folder)
    except Exception as exc:
        raise ToolchainError(f"export to {ctx.backend.name} failed: {exc}\n"
                             f"{log_tail(log)}") from exc


def accuracy_in_backend(ctx: Context, model_file: Path) -> tuple[float, float, Any]:
    session = ctx.backend.open_session(model_file, ctx.threads)
    val = float(np.mean(session.run(ctx.x_val).argmax(-1) == ctx.y_val))
    test = float(np.mean(session.run(ctx.x_test).argmax(-1) == ctx.y_test))
    return val, test, session


def measure(ctx: Context, model_file: Path) -> dict[str, Any]:
    return measure_fresh(ctx.backend.name, model_file, ctx.threads, (1, *ctx.x_test.shape[1:]),
                         ctx.bench_runs)


def assess(ctx: Context, stage: str, model_file: Path, module: Any, precision: str,
           params_macs: tuple[int, int], did: str,
           float_layers: tuple[str, ...] = ()) -> Candidate:
    val, test, _ = accuracy_in_backend(ctx, model_file)
    measured = measure(ctx, model_file)
    lat = measured["latency_ms"]
    latency = {"p50": round(lat["p50"], 4), "p95": round(lat["p95"], 4),
               "source": "measured-host", "threads": ctx.threads}
    size = sum(f.stat().st_size for f in ctx.backend.model_files(model_file))
    candidate = Candidate(stage, precision, model_file, module, test, val, params_macs[0],
                          params_macs[1], size, latency,
                          measured["peak_rss_mb"], measured["cold_start_ms"], did, float_layers)
    ctx.log(f"{stage}: {precision}, validation {val:.2%}, test {test:.2%}, "
            f"{candidate.size_bytes} bytes, {params_macs[0]} params, {params_macs[1]} MACs, "
            f"p50 {latency['p50']:.3f} ms")
    return candidate
