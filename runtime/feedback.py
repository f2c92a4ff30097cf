"""Ground-truth feedback: inference ids, and the ledger that checks a reported label against
what the device served.

Every inference row a Device runs gets an id `"<session>-<n>"`: `session` is 8 random hex
characters drawn when the process starts, `n` counts the process's inference rows from 1 (a
batch of B rows takes n..n+B-1). The serving path stores each row's predicted class in a ring
of RING entries (`served[n & MASK]`, one numpy store per call); nothing else happens per
inference. `Ledger.accept` then takes `(inference_id, label)` and answers whether the served
prediction was right, refusing with a one-line FeedbackError what it cannot judge: an id of
another session, one not served yet or older than the ring, a label the model does not have,
a second label for the same inference, and an inference served by a bundle that a reload has
since replaced (its label would be counted against the wrong model).
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RING = 1 << 16  # the inferences remembered for feedback; a power of two (n & MASK)
MASK = RING - 1
MAX_ID_CHARS = 64
_ID = re.compile(r"([0-9a-f]{8})-([1-9][0-9]{0,18})")
LABELS_SHOWN = 5  # label names an error message lists


class FeedbackError(ValueError):
    """A feedback the device cannot count; the message is one line for the caller."""


def new_session() -> str:
    return secrets.token_hex(4)


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def label_index(label: Any, labels: Sequence[str],
                names: dict[str, int] | None = None) -> int:
    """A class index (an int) or a label name (a str; a string of digits that is no label
    name is taken as an index) -> the class index; FeedbackError otherwise."""
    count = len(labels)
    if isinstance(label, bool) or not isinstance(label, int | str | np.integer):
        raise FeedbackError(f"label must be a class index (integer) or a label name "
                            f"(string), not {type(label).__name__}")
    if isinstance(label, str):
        index = (names or {name: i for i, name in enumerate(labels)}).get(label)
        if index is not None:
            return index
        if not (label.isascii() and label.isdigit() and len(label) <= 6):
            shown = ", ".join(map(repr, labels[:LABELS_SHOWN]))
            more = ", ..." if count > LABELS_SHOWN else ""
            raise FeedbackError(f"label {_show(label)} is not a label name of this model "
                                f"({shown}{more}) nor a class index 0..{count - 1}")
        label = int(label)
    if not 0 <= label < count:
        raise FeedbackError(f"label {_show(int(label))} is not a class index of this model "
                            f"(0..{count - 1})")
    return int(label)


def _bundle_name(info: dict[str, Any]) -> str:
    return f"{info.get('model')} {info.get('version')} ({str(info.get('sha256'))[:12]})"


class Ledger:
    """What feedback is judged against: the ring of served predictions (written by the
    Device's serving path), the bundle that served each range of n, and the counts for the
    telemetry window's "feedback" section."""

    def __init__(self, session: str, next_n: Callable[[], int], bundle: dict[str, Any]) -> None:
        self.session = session
        self.served = np.zeros(RING, dtype=np.int32)  # written by Device.classify/predict
        self._next_n = next_n  # the device's counter: the n its next inference will take
        self._lock = threading.Lock()
        # the n a bundle started serving at, oldest first (pruned to what the ring holds)
        self._bundles: list[tuple[int, dict[str, Any]]] = [(1, bundle)]
        self._labelled: np.ndarray | None = None  # n of the last label per slot (lazily)
        self._names: tuple[Sequence[str], dict[str, int]] | None = None
        self.count = self.correct = 0  # this window's
        self.totals = {"accepted": 0, "correct": 0, "refused": 0}

    def inference_ids(self, first: int, count: int) -> list[str]:
        prefix = self.session + "-"
        return [prefix + str(n) for n in range(first, first + count)]

    def bundle_changed(self, next_n: int, bundle: dict[str, Any]) -> None:
        """A new bundle serves from inference `next_n` on (called under the device's model
        lock, where the counter and the model change together)."""
        with self._lock:
            # a bundle served [its first n, the next one's): kept while the ring holds some
            ends = [first for first, _ in self._bundles[1:]] + [next_n]
            keep = [b for b, end in zip(self._bundles, ends, strict=True)
                    if end > next_n - RING]
            self._bundles = [*keep, (next_n, bundle)]

    def parse_id(self, inference_id: Any) -> int:
        """The n of one of this session's inference ids still in the ring; FeedbackError."""
        if not isinstance(inference_id, str):
            raise FeedbackError(f"inference_id must be a string like "
                                f"'{self.session}-1', not {type(inference_id).__name__}")
        if len(inference_id) > MAX_ID_CHARS or not (m := _ID.fullmatch(inference_id)):
            raise FeedbackError(f"inference_id {_show(inference_id)} is not an inference id "
                                f"(like '{self.session}-1')")
        session, n = m.group(1), int(m.group(2))
        if session != self.session:
            raise FeedbackError(f"inference {inference_id} is not from this device process "
                                f"(session {session}, this one is {self.session}: "
                                f"restarted, or another device)")
        self._check_held(inference_id, n)
        return n

    def _check_held(self, inference_id: str, n: int) -> None:
        next_n = self._next_n()
        if n >= next_n:
            raise FeedbackError(f"no inference {inference_id} yet (the last one is "
                                f"{self.session}-{next_n - 1})")
        if n < next_n - RING:
            raise FeedbackError(f"inference {inference_id} is too old: only the last {RING} "
                                f"inferences are remembered")

    def accept(self, inference_id: Any, label: Any, labels: Sequence[str],
               serving: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        """Judge one label: (result, n, label index). `labels`/`serving`: the model serving
        now. Raises FeedbackError, counted as refused."""
        try:
            with self._lock:
                return self._accept_locked(inference_id, label, labels, serving)
        except FeedbackError:
            with self._lock:
                self.totals["refused"] += 1
            raise

    def _accept_locked(self, inference_id: Any, label: Any, labels: Sequence[str],
                       serving: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        n = self.parse_id(inference_id)
        served_by = next((b for first, b in reversed(self._bundles) if first <= n),
                         self._bundles[0][1])
        if served_by.get("sha256") != self._bundles[-1][1].get("sha256"):
            raise FeedbackError(f"inference {inference_id} was served by "
                                f"{_bundle_name(served_by)}, since replaced by "
                                f"{_bundle_name(serving)}: its label is not counted")
        if self._names is None or self._names[0] is not labels:
            self._names = (labels, {name: i for i, name in enumerate(labels)})
        index = label_index(label, labels, self._names[1])
        slot = n & MASK
        prediction = int(self.served[slot])
        self._check_held(inference_id, n)  # read before a newer inference took the slot
        if self._labelled is None:
            self._labelled = np.zeros(RING, dtype=np.int64)
        if self._labelled[slot] == n:
            raise FeedbackError(f"inference {inference_id} already has a label")
        self._labelled[slot] = n
        correct = prediction == index
        self.count += 1
        self.correct += correct
        self.totals["accepted"] += 1
        self.totals["correct"] += correct
        return ({"inference_id": inference_id, "label": index, "prediction": prediction,
                 "correct": correct}, n, index)

    def section(self) -> dict[str, Any] | None:
        """The window's "feedback" section (None without labels); resets the counts. Called
        by Telemetry under its window lock as a window closes."""
        with self._lock:
            count, correct = self.count, self.correct
            self.count = self.correct = 0
        if not count:
            return None
        return {"count": count, "correct": correct, "accuracy": round(correct / count, 6)}
