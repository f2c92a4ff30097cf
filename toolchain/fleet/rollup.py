"""Running summaries of the fleet's telemetry, as pure functions over rows: what a batch of
newly stored messages and windows adds to each device's summary and to the per-hour
rollups. The store turns these deltas into batched SQL; keeping the arithmetic here lets
ingest, the one-time backfill of old stores and retention share it exactly.

A rollup row holds sums and counts, never means, so that rows merge by addition whatever
order batches arrive in (mean p95 = p95_sum / p95_n)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from runtime.protocol import MAX_INT

HOUR_S = 3600.0
# a single window's contribution to a float sum is clamped to this, so that hostile values
# (1e308 ms) cannot overflow a sum: PostgreSQL raises on float overflow, which would look
# like the store failing and make the listener redeliver the message forever
SUM_CAP = 1e12

# rollup columns and how two rows merge: "add" (sums and counts), "max", "min"
ROLLUP_FIELDS: dict[str, str] = {
    "windows": "add", "inferences": "add", "errors": "add", "spool_dropped": "add",
    "p50_sum": "add", "p50_n": "add", "p95_sum": "add", "p95_n": "add",
    "drift_sum": "add", "drift_n": "add",
    "p95_max": "max", "p99_max": "max", "drift_max": "max",
    "first_seq": "min", "last_seq": "max",
}
INT_FIELDS = frozenset({"windows", "inferences", "errors", "spool_dropped", "p50_n", "p95_n",
                        "drift_n", "first_seq", "last_seq"})
# the fleet-wide rollup (kept at ingest) has no per-device sequence numbers
FLEET_FIELDS = tuple(f for f in ROLLUP_FIELDS if f not in ("first_seq", "last_seq"))
DEVICE_FIELDS = tuple(ROLLUP_FIELDS)
# a device's latest window (highest seq), copied into its devices row
LATEST_COLUMNS = ("end_wall", "p50_ms", "p95_ms", "p99_ms", "budget_p95_ms", "error_rate",
                  "drift_score", "input_psi", "class_psi", "confidence_psi", "input_ks_p")


def hour_of(t: float) -> float:
    """The start of the hour `t` (epoch seconds) falls in."""
    return math.floor(t / HOUR_S) * HOUR_S


def sat_add(a: int, b: int) -> int:
    """a + b for counters that must stay 64-bit: saturates at MAX_INT."""
    return min(a + b, MAX_INT)


def clamp_counters(acc: dict[str, Any]) -> dict[str, Any]:
    """Sums made in Python (unbounded ints) back into 64 bits, once, before SQL binds them."""
    for f in INT_FIELDS:
        if f in acc and acc[f] is not None and acc[f] > MAX_INT:
            acc[f] = MAX_INT
    return acc


def window_time(w: dict[str, Any], received_at: float | None) -> float:
    """The time a window describes: its end on the device's clock, else its start, else
    when the listener received it."""
    for t in (w.get("end_wall"), w.get("start_wall"), received_at):
        if t is not None:
            return float(t)
    return 0.0


def empty_rollup(fields: tuple[str, ...]) -> dict[str, Any]:
    return {f: (0 if ROLLUP_FIELDS[f] == "add" else None) for f in fields}


def add_window(acc: dict[str, Any], w: dict[str, Any]) -> None:
    """Fold one window row (as `store.window_row` makes it) into a rollup row. Straight-line
    on purpose: ingest runs it for every window. Counters are summed unbounded here and
    clamped by `clamp_counters` before they are written."""
    acc["windows"] += 1
    v = w.get("count")
    if v and v > 0:
        acc["inferences"] += v
    v = w.get("errors")
    if v and v > 0:
        acc["errors"] += v
    v = w.get("spool_dropped")
    if v and v > 0:
        acc["spool_dropped"] += v
    v = w.get("p50_ms")
    if v is not None:
        acc["p50_sum"] += -SUM_CAP if v < -SUM_CAP else SUM_CAP if v > SUM_CAP else v
        acc["p50_n"] += 1
    v = w.get("p95_ms")
    if v is not None:
        acc["p95_sum"] += -SUM_CAP if v < -SUM_CAP else SUM_CAP if v > SUM_CAP else v
        acc["p95_n"] += 1
        if acc["p95_max"] is None or v > acc["p95_max"]:
            acc["p95_max"] = v
    v = w.get("p99_ms")
    if v is not None and (acc["p99_max"] is None or v > acc["p99_max"]):
        acc["p99_max"] = v
    v = w.get("drift_score")
    if v is not None:
        acc["drift_sum"] += -SUM_CAP if v < -SUM_CAP else SUM_CAP if v > SUM_CAP else v
        acc["drift_n"] += 1
        if acc["drift_max"] is None or v > acc["drift_max"]:
            acc["drift_max"] = v
    if "first_seq" in acc:
        seq = w["seq"]
        if acc["first_seq"] is None or seq < acc["first_seq"]:
            acc["first_seq"] = seq
        if acc["last_seq"] is None or seq > acc["last_seq"]:
            acc["last_seq"] = seq


@dataclass
class Deltas:
    """What a set of newly stored messages and windows adds to the summaries.

    messages: device -> [count, min seq, max seq]; counters: device -> [windows, inferences,
    errors, spool_dropped]; latest: device -> its highest-seq window; fleet: (model, version,
    hour start) -> rollup row."""

    messages: dict[str, list[int]] = field(default_factory=dict)
    counters: dict[str, list[int]] = field(default_factory=dict)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    fleet: dict[tuple[str, str, float], dict[str, Any]] = field(default_factory=dict)

    def add_message(self, device_id: str, seq: int) -> None:
        m = self.messages.get(device_id)
        if m is None:
            self.messages[device_id] = [1, seq, seq]
        else:
            m[0] += 1
            if seq < m[1]:
                m[1] = seq
            elif seq > m[2]:
                m[2] = seq

    def add_window(self, w: dict[str, Any], received_at: float | None) -> None:
        d = w["device_id"]
        c = self.counters.get(d)
        if c is None:
            c = self.counters[d] = [0, 0, 0, 0]
        c[0] += 1
        for i, col in ((1, "count"), (2, "errors"), (3, "spool_dropped")):
            v = w.get(col)
            if v and v > 0:
                c[i] += v
        latest = self.latest.get(d)
        if latest is None or w["seq"] > latest["seq"]:
            self.latest[d] = w
        t = w.get("end_wall")
        if t is None:
            t = window_time(w, received_at)
        key = (w.get("model") or "", w.get("model_version") or "",
               math.floor(t / HOUR_S) * HOUR_S)
        acc = self.fleet.get(key)
        if acc is None:
            acc = self.fleet[key] = empty_rollup(FLEET_FIELDS)
        add_window(acc, w)

    def __bool__(self) -> bool:
        return bool(self.messages or self.counters)


def deltas_of(messages: list[tuple], windows: list[dict[str, Any]],
              received_at: float | None = None) -> Deltas:
    """Deltas of newly stored messages (messages-table tuples: device_id, seq, kind, sha256,
    model, version, wall_time, received_at, payload) and windows (window rows).
    `received_at`: when every one of them was received (ingest's batch), else each window's
    is looked up among the messages (a window without end or start time is counted then)."""
    out = Deltas()
    add = out.add_message
    for m in messages:
        add(m[0], m[1])
    if received_at is not None:
        for w in windows:
            out.add_window(w, received_at)
        return out
    received = {(m[0], m[1]): m[7] for m in messages if len(m) > 7}
    for w in windows:
        out.add_window(w, received.get((w["device_id"], w["seq"])))
    return out
