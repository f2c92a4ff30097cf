"""What every backend's run half provides. numpy only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    outputs (N, ...): quantizing inputs and dequantizing outputs is the session's job."""

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
