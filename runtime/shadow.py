"""Shadow runs: a candidate bundle answers a sample of live inputs beside the served model,
on a thread of its own, so that windows can say how the two compare before anyone swaps.

    runner = ShadowRunner(candidate, info, sample=0.25, cpu_share=0.25).start()
    runner.offer(batch, served_ids, n)   # the serving path: a few operations, never waits
    runner.feedback(n, label)            # ground truth for inference n, for both models
    section = runner.take_window()       # the window's "shadow" section; counters reset

The serving path only copies the sampled rows and puts them on a bounded queue without
blocking (full: the rows are dropped and counted). The thread keeps its busy time under
`cpu_share` of the wall time by pausing elapsed * (1/share - 1) after each run: while it
pauses the queue fills and further samples are dropped, which is what bounds its CPU.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from runtime import preprocess
from runtime.model import Model

QUEUE_ITEMS = 32        # sampled batches waiting for the candidate
MEMORY = 65536          # inferences whose two predictions are remembered for feedback
EARLY_LABELS = 4096     # labels of sampled inferences the candidate has not run yet
LATENCIES = 4096        # candidate runs per window kept for the percentiles (the latest)

log = logging.getLogger("edgepack.shadow")


def sample_step(sample: float) -> int:
    """The share of inferences to shadow -> every k-th inference (k >= 1)."""
    if not 0 < sample <= 1:
        raise ValueError(f"sample must be above 0 and at most 1, not {sample}")
    return max(1, round(1 / sample))


def pause_after(elapsed: float, cpu_share: float) -> float:
    """The pause after a run of `elapsed` seconds that keeps busy / wall at `cpu_share`."""
    return elapsed * (1 / cpu_share - 1)


class _Counts:
    """What one window (or the whole run) saw."""

    def __init__(self) -> None:
        self.count = self.agree = self.dropped = self.errors = 0
        self.confidence = 0.0
        self.feedback = self.correct = self.served_correct = 0

    def summary(self) -> dict[str, Any]:
        fb = self.feedback
        return {"count": self.count, "dropped": self.dropped, "errors": self.errors,
                "agreement": self.agree / self.count if self.count else None,
                "confidence_mean": self.confidence / self.count if self.count else None,
                "feedback": {"count": fb,
                             "accuracy": self.correct / fb if fb else None,
                             "served_accuracy": self.served_correct / fb if fb else None}}


class ShadowRunner:
    """Runs `model`, the candidate, on sampled inputs (`info`: its bundle_info). Only this
    runner's thread calls the model; the caller closes it after `stop`."""

    def __init__(self, model: Model, info: dict[str, Any], *, sample: float,
                 cpu_share: float, queue_items: int = QUEUE_ITEMS,
                 memory: int = MEMORY) -> None:
        if not 0 < cpu_share <= 1:
            raise ValueError(f"cpu_share must be above 0 and at most 1, not {cpu_share}")
        self.model = model
        self.info = info
        self.sample, self.cpu_share = sample, cpu_share
        self.step = sample_step(sample)
        self.candidate = {k: info[k] for k in ("sha256", "model", "version")}
        self._queue: queue.Queue[tuple[np.ndarray, np.ndarray, int] | None] = \
            queue.Queue(queue_items)
        self._lock = threading.Lock()  # the counters: the thread, feedback, the window
        self._window, self._total = _Counts(), _Counts()
        self._latencies = np.zeros(LATENCIES)
        self._runs = 0  # candidate runs this window (the latencies ring's fill)
        # inference n -> (candidate's, served prediction) at n % memory, valid where seen == n
        self._seen = np.full(memory, -1, np.int64)
        self._cand = np.zeros(memory, np.int32)
        self._served = np.zeros(memory, np.int32)
        # labels that came before the candidate ran on their inference (an application may
        # know the truth at once): applied when it runs; the oldest go beyond EARLY_LABELS
        self._early: dict[int, int] = {}
        self.busy_s = 0.0    # the thread's time on candidate runs (and their accounting)
        self.paused_s = 0.0  # the pauses that time asked for (cpu_share)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shadow-runner", daemon=True)

    def start(self) -> ShadowRunner:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- the serving path ---------------------------------------------------------------------
    def offer(self, batch: np.ndarray, served: np.ndarray, n: int) -> None:
        """Rows n, n+1, ... of `batch` were just served with `served` (class ids, or the
        logits they come from); the rows whose number is a multiple of the step go to the
        candidate. Copies only those rows; never blocks."""
        step = self.step
        first = -n % step
        if first >= len(batch):
            return
        rows = batch[first::step].copy()  # the caller may reuse its array
        try:
            self._queue.put_nowait((rows, served[first::step].copy(), n + first))
        except queue.Full:
            with self._lock:
                self._window.dropped += len(rows)
                self._total.dropped += len(rows)

    # -- feedback and windows -----------------------------------------------------------------
    def feedback(self, n: int, label: int) -> bool:
        """The true label of inference n (Device.feedback_listeners calls this); counted for
        both models when the candidate ran on that inference. False when it did not."""
        i = n % len(self._seen)
        with self._lock:
            if self._seen[i] != n:
                if n % self.step == 0:  # sampled: its run may be queued still
                    self._early[n] = label
                    if len(self._early) > EARLY_LABELS:
                        del self._early[next(iter(self._early))]
                return False
            self._count_label(int(self._cand[i]), int(self._served[i]), label)
        return True

    def _count_label(self, candidate: int, served: int, label: int) -> None:
        """(under the lock) one label for both models."""
        hit, served_hit = int(candidate == label), int(served == label)
        for c in (self._window, self._total):
            c.feedback += 1
            c.correct += hit
            c.served_correct += served_hit

    def take_window(self) -> dict[str, Any]:
        """The window's "shadow" section; the window's counters start again."""
        with self._lock:
            counts, lat = self._window, self._latencies[:self._runs].copy()
            self._window, self._runs = _Counts(), 0
        p50, p95, p99 = (np.percentile(lat * 1000, (50, 95, 99)).tolist() if len(lat)
                         else (None, None, None))
        return {"candidate": dict(self.candidate), **counts.summary(),
                "latency_ms": {"p50": p50, "p95": p95, "p99": p99}}

    def totals(self) -> dict[str, Any]:
        with self._lock:
            summary = self._total.summary()
        return {"candidate": dict(self.candidate), **summary,
                "busy_s": round(self.busy_s, 6), "paused_s": round(self.paused_s, 6)}

    # -- the thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        get, stop, clock = self._queue.get, self._stop, time.perf_counter
        while not stop.is_set():
            item = get()
            if item is None:
                break
            t0 = clock()
            self._run(*item)
            elapsed = clock() - t0
            pause = pause_after(elapsed, self.cpu_share)
            self.busy_s += elapsed
            self.paused_s += pause
            if pause > 0 and stop.wait(pause):
                break

    def _run(self, x: np.ndarray, served: np.ndarray, n: int) -> None:
        t0 = time.perf_counter()
        try:
            logits = self.model.run(x)
        except Exception as exc:  # the candidate's own failure: counted, serving goes on
            log.warning("shadow candidate failed on %d input(s): %s", len(x), exc)
            with self._lock:
                self._window.errors += len(x)
                self._total.errors += len(x)
            return
        seconds = time.perf_counter() - t0
        probs = preprocess.softmax(logits)
        ids, conf = probs.argmax(-1), probs.max(-1)
        if served.ndim == 2:  # logits from Device.predict
            served = served.argmax(-1)
        agree, confidence = int(np.sum(ids == served)), float(conf.sum())
        numbers = n + self.step * np.arange(len(x))
        at = numbers % len(self._seen)
        with self._lock:
            self._seen[at] = numbers
            self._cand[at], self._served[at] = ids, served
            if self._early:
                for k, m in enumerate(numbers.tolist()):
                    if (label := self._early.pop(m, None)) is not None:
                        self._count_label(int(ids[k]), int(served[k]), label)
            self._latencies[self._runs % len(self._latencies)] = seconds
            self._runs += 1
            for c in (self._window, self._total):
                c.count += len(x)
                c.agree += agree
                c.confidence += confidence

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """End the thread (a run in progress finishes); returns the totals."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # the thread sees the stop flag after its current item
            pass
        self._thread.join(timeout)
        return self.totals()
