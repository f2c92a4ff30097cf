"""Opt-in data capture: a sample of the inputs the device serves, with the served prediction,
its confidence and, when the application reports it (Device.feedback), the true label; shipped
through the telemetry spool as "capture" messages for the listener to keep as training data.

Nothing is captured unless capture_rate > 0 (and telemetry is on). Sampling is a
deterministic stride: inference n is captured when floor(n * rate) > floor((n - 1) * rate),
so a rate of 0.25 takes every 4th (the rate is read as a fraction with a denominator of at
most a million: `as_fraction`). What is captured is the float32 batch `Model.batch` made of
the caller's input (before the bundle's normalization: what `toolchain build --data` takes).
The process captures at most `max_bytes` of sample bytes; the sample that would pass the cap
stops capture for good (event "capture_cap_reached", once).

A message ("capture" kind, topic <prefix>/<device>/capture) carries at most
CAPTURE_CHUNK_BYTES of sample bytes and CAPTURE_CHUNK_SAMPLES samples, so that base64 and the
per-sample fields stay under protocol.MAX_PAYLOAD_BYTES whatever the sample size; a sample
larger than a chunk is not captured (counted as dropped). Body:
  {"format": 1, "dtype": "float32", "shape": [n, *sample_shape],
   "data": base64 of the n samples' C-order little-endian bytes,
   "inference_ids": [n str], "predictions": [n int], "confidence": [n float],
   "labels": [n int or null],
   "late_labels": [[inference_id, label], ...]}   # labels for samples shipped earlier
Pending samples ship when a chunk is full and whenever a telemetry window closes (the
window's "capture" section: {"samples", "bytes", "dropped"} of that window). A label that
arrives after its sample shipped goes in a later message's late_labels (the last
SHIPPED_MEMORY shipped ids are remembered for that; older ones' labels are not sent).
"""

from __future__ import annotations

import base64
import logging
import math
import threading
from collections import deque
from fractions import Fraction
from typing import Any

import numpy as np

log = logging.getLogger("edgepack.capture")

CAPTURE_FORMAT = 1
CAPTURE_CHUNK_BYTES = 128 * 1024  # sample bytes per message (base64: 4/3 of it)
CAPTURE_CHUNK_SAMPLES = 512  # samples per message: ids, predictions, ... ~60 B JSON each
CAPTURE_LATE_LABELS = 1000  # late labels per message: ~40 B JSON each
SHIPPED_MEMORY = 1 << 16  # shipped samples whose late label can still be sent
_LE_FLOAT32 = np.dtype("<f4")


def check_options(rate: Any, max_mb: Any) -> None:
    """ValueError, in words, for capture options out of range."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or \
            not (math.isfinite(rate) and (rate == 0 or 1e-6 <= rate <= 1)):
        raise ValueError(f"capture_rate must be 0 (off) or a number from 0.000001 to 1 "
                         f"(every inference), not {rate!r}")
    if isinstance(max_mb, bool) or not isinstance(max_mb, int | float) or \
            not (math.isfinite(max_mb) and max_mb > 0):
        raise ValueError(f"capture_max_mb must be a positive number of MiB, not {max_mb!r}")


def as_fraction(rate: float) -> Fraction:
    """The rate as the stride reads it: a fraction (denominator at most a million), so that
    0.1 takes exactly every 10th and 1/3 every 3rd, in exact integer arithmetic."""
    return Fraction(rate).limit_denominator(1_000_000)


def nth_sampled(k: int, rate: Fraction) -> int:
    """The n of the k-th captured inference: the smallest n with floor(n * rate) >= k."""
    return -(-k * rate.denominator // rate.numerator)


class Capture:
    """Sampled inputs on their way to the spool. The serving path calls `take` for every
    batch (it returns at once when the batch holds no picked inference, or capture stopped);
    Device.feedback calls `label`; each closing window calls `section`."""

    def __init__(self, telemetry: Any, session: str, rate: float, max_bytes: int) -> None:
        if not 1e-6 <= rate <= 1 or max_bytes <= 0:
            raise ValueError("capture needs 1e-6 <= rate <= 1 and a positive byte cap")
        self.telemetry = telemetry  # runtime.telemetry.Telemetry: `capture(body, bundle)`
        self.session = session
        self.rate = as_fraction(rate)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.stopped = False
        # pending: samples taken and not shipped yet, all of one shape and bundle
        self._data = bytearray()
        self._shape: tuple[int, ...] | None = None
        self._bundle: dict[str, Any] | None = None
        self._ns: list[int] = []
        self._predictions: list[int] = []
        self._confidence: list[float] = []
        self._labels: list[int | None] = []
        self._pending_at: dict[int, int] = {}  # n -> its index in the pending lists
        self._late: list[list[Any]] = []
        self._shipped: deque[int] = deque()
        self._shipped_set: set[int] = set()
        self.total = {"samples": 0, "bytes": 0, "dropped": 0, "messages": 0}
        self._window = {"samples": 0, "bytes": 0, "dropped": 0}

    # -- the serving path ---------------------------------------------------------------------
    def take(self, batch: np.ndarray, first: int, predictions: np.ndarray,
             confidence: np.ndarray) -> None:
        """Rows of `batch` (inferences first..first+len-1) that the rate picks: inference n
        is picked when floor(n * rate) steps up at n. Worked out from n alone, not from what
        was taken before: serving threads call this in any order (numbers are handed out
        under the model lock, captures after it)."""
        if self.stopped:
            return
        p, q = self.rate.numerator, self.rate.denominator
        k_lo, k_hi = (first - 1) * p // q, (first + len(batch) - 1) * p // q
        if k_hi == k_lo:
            return
        with self._lock:
            for k in range(k_lo + 1, k_hi + 1):
                if self.stopped:  # the cap: the rest of the batch is not captured either
                    break
                i = nth_sampled(k, self.rate) - first
                self._add(batch[i], first + i, int(predictions[i]), float(confidence[i]))

    def _add(self, row: np.ndarray, n: int, prediction: int, confidence: float) -> None:
        size = row.size * 4
        if size > CAPTURE_CHUNK_BYTES:
            self._count_dropped()
            if self.total["dropped"] == 1:
                log.warning("captured inputs of %d bytes do not fit a capture message "
                            "(%d bytes at most): not captured", size, CAPTURE_CHUNK_BYTES)
            return
        if self.total["bytes"] + size > self.max_bytes:
            self._count_dropped()
            self.stopped = True
            self.telemetry.event("capture_cap_reached", max_bytes=self.max_bytes,
                                 samples=self.total["samples"], bytes=self.total["bytes"])
            return
        bundle = self.telemetry.bundle
        if self._ns and (row.shape != self._shape or bundle is not self._bundle
                         or len(self._data) + size > CAPTURE_CHUNK_BYTES
                         or len(self._ns) >= CAPTURE_CHUNK_SAMPLES):
            self._ship()
        self._shape, self._bundle = row.shape, bundle
        self._data += row.astype(_LE_FLOAT32, copy=False).tobytes()
        self._pending_at[n] = len(self._ns)
        self._ns.append(n)
        self._predictions.append(prediction)
        self._confidence.append(round(confidence, 6))
        self._labels.append(None)
        for counts in (self.total, self._window):
            counts["samples"] += 1
            counts["bytes"] += size

    def _count_dropped(self) -> None:
        self.total["dropped"] += 1
        self._window["dropped"] += 1

    # -- labels and shipping ------------------------------------------------------------------
    def label(self, n: int, label: int) -> None:
        """Device.feedback accepted `label` for inference n."""
        with self._lock:
            at = self._pending_at.get(n)
            if at is not None:
                self._labels[at] = label
            elif n in self._shipped_set:
                self._late.append([f"{self.session}-{n}", label])
                if len(self._late) >= CAPTURE_LATE_LABELS:
                    self._ship()

    def _ship(self) -> None:
        """Send what is pending (lock held): the samples, and late labels up to a message's
        share."""
        if not self._ns and not self._late:
            return
        count = len(self._ns)
        prefix = self.session + "-"
        late, self._late = self._late[:CAPTURE_LATE_LABELS], self._late[CAPTURE_LATE_LABELS:]
        body = {"format": CAPTURE_FORMAT, "dtype": "float32",
                "shape": [count, *(self._shape or ())],
                "data": base64.b64encode(self._data).decode("ascii"),
                "inference_ids": [prefix + str(n) for n in self._ns],
                "predictions": self._predictions, "confidence": self._confidence,
                "labels": self._labels, "late_labels": late}
        self.telemetry.capture(body, self._bundle)
        self.total["messages"] += 1
        for n in self._ns:
            if len(self._shipped) >= SHIPPED_MEMORY:
                self._shipped_set.discard(self._shipped.popleft())
            self._shipped.append(n)
            self._shipped_set.add(n)
        self._data = bytearray()
        self._ns, self._predictions, self._confidence, self._labels = [], [], [], []
        self._pending_at = {}
        if self._late:  # more late labels than one message takes
            self._ship()

    def flush(self) -> None:
        with self._lock:
            self._ship()

    def section(self) -> dict[str, Any]:
        """A window closes: ship what is pending; the window's "capture" section."""
        with self._lock:
            self._ship()
            out, self._window = self._window, {"samples": 0, "bytes": 0, "dropped": 0}
        return out
