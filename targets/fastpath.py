"""What the run halves share for the serving path: the model's input normalization written
into a preallocated buffer, folded into the input quantization for an integer input, and a
256-entry table that dequantizes an 8-bit output. numpy only.

At batch 1 on a small model every numpy call costs about as much as a kilobyte of
arithmetic, so the serving path counts calls: for an int8 input it is one multiply and one
add (the normalization and the quantization scale folded into one per-channel affine map),
a round, a clip and the cast into the interpreter's own input buffer; the finiteness check
is one dot product (NaN or infinity anywhere makes it non-finite).

The folded affine map rounds differently from normalizing first and quantizing after: an
input value that lands within float32 rounding of a half step may quantize one step apart
(tests/test_runtime.py checks the two agree to one step and give the same predictions).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from targets.base import TensorSpec, is_quantized

# A serving-path runner: a raw float32 batch (N, C, ...) in, normalized per channel as
# (x - mean) / std and run; a fresh float32 output array out (never a buffer the next call
# writes). Raises ValueError for NaN or infinite inputs.
Runner = Callable[[np.ndarray], np.ndarray]

EIGHT_BIT = ("int8", "uint8")

# np.clip's ufunc: np.clip itself wraps it in Python that costs several times the clip on a
# small input; where this numpy does not expose it, a minimum and a maximum do the same.
try:
    from numpy._core.umath import clip as _clip_ufunc
except ImportError:  # numpy 1
    try:
        from numpy.core.umath import clip as _clip_ufunc
    except ImportError:
        _clip_ufunc = None


def nonfinite_error(x: np.ndarray) -> ValueError:
    bad = int(x.size - np.isfinite(x).sum())
    return ValueError(f"the input holds {bad} NaN or infinite value(s): inputs must be finite "
                      "numbers")


def _operand(v: np.ndarray | float) -> np.ndarray:
    """A per-channel constant as a ufunc takes it fastest: one channel as a 0-d float32 array
    (measured on 1024 values: 0.43 us a multiply, against 0.59 with a numpy scalar and 0.9 with
    a (1, 1, 1, 1) array to broadcast), several as float32 (1, C, 1, 1)."""
    v = np.asarray(v, dtype=np.float32)
    return v.reshape(()) if v.size == 1 else v


def quantizing_stage(mean: np.ndarray, std: np.ndarray, spec: TensorSpec,
                     target: np.ndarray) -> Callable[[np.ndarray], None]:
    """x -> round(x * a + b) clipped to the integer type, written into `target` (the
    backend's input buffer, shaped like the model's batch). ValueError on NaN or infinity."""
    a, b = (_operand(v) for v in folded_affine(mean, std, spec))
    lo, hi = (_operand(v) for v in int_range(spec))
    buf = np.empty(target.shape, dtype=np.float32)
    flat = buf.reshape(-1)
    multiply, add, rint, dot, isfinite = np.multiply, np.add, np.rint, flat.dot, math.isfinite
    clip = _clip_ufunc

    def prepare(x: np.ndarray) -> None:
        multiply(x, a, out=buf)
        add(buf, b, out=buf)
        # the sum of squares is not finite when a NaN or an infinity is in x (or, rarely,
        # when values above about 1e19 overflow it: then x is checked value by value)
        if not isfinite(dot(flat)) and not np.isfinite(x).all():
            raise nonfinite_error(x)
        rint(buf, out=buf)
        if clip is not None:
            clip(buf, lo, hi, out=buf)
        else:
            np.minimum(buf, hi, out=buf)
            np.maximum(buf, lo, out=buf)
        target[...] = buf

    return prepare


def float_stage(mean: np.ndarray, std: np.ndarray,
                target: np.ndarray) -> Callable[[np.ndarray], None]:
    """x -> (x - mean) / std computed as runtime.preprocess.apply does (the same float32
    operations, so the same bits), written into the float32 `target`."""
    m, s = _operand(mean), _operand(std)
    flat = target.reshape(-1)
    subtract, divide, dot, isfinite = np.subtract, np.divide, flat.dot, math.isfinite

    def prepare(x: np.ndarray) -> None:
        subtract(x, m, out=target)
        divide(target, s, out=target)
        if not isfinite(dot(flat)) and not np.isfinite(x).all():
            raise nonfinite_error(x)

    return prepare


def normalized(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std as a new array, for batches the preallocated buffers do not fit;
    ValueError on NaN or infinity."""
    if not np.isfinite(x).all():
        raise nonfinite_error(x)
    return (x - mean) / std


def static_shape(shape: tuple[int | None, ...], batch: int) -> tuple[int, ...] | None:
    """A tensor's shape with its batch dimension set: None when another one is dynamic."""
    if not shape or any(d is None for d in shape[1:]):
        return None
    return (batch, *shape[1:])


def folded_affine(mean: np.ndarray, std: np.ndarray,
                  spec: TensorSpec) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with round(x * a + b) the quantized value of (x - mean) / std: a = 1 / (std *
    scale), b = zero_point - mean / (std * scale), worked out in float64."""
    step = np.asarray(std, dtype=np.float64) * float(spec.scale)
    a = (1.0 / step).astype(np.float32)
    b = (spec.zero_point - np.asarray(mean, dtype=np.float64) / step).astype(np.float32)
    return a, b


def int_range(spec: TensorSpec) -> tuple[float, float]:
    info = np.iinfo(np.dtype(spec.dtype))
    return float(info.min), float(info.max)


def dequantize_table(spec: TensorSpec) -> np.ndarray:
    """table[byte] = the float value of an 8-bit output byte, computed as targets.base's
    dequantize does (so the values are the same to the bit); index it with a uint8 view."""
    values = np.arange(256, dtype=np.int64)
    if spec.dtype == "int8":
        values = values.astype(np.uint8).view(np.int8)  # byte 255 is -1
    q = values.astype(spec.dtype)
    return ((q.astype(np.float32) - spec.zero_point) * spec.scale).astype(np.float32)


def eight_bit(spec: TensorSpec) -> bool:
    return spec.dtype in EIGHT_BIT and is_quantized(spec)
