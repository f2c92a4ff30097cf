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


def _count(v: Any) -> int:
    """A window's counter as a non-negative 64-bit contribution."""
    return max(0, min(int(v or 0), MAX_INT))


def _capped(v: float) -> float:
    return max(-SUM_CAP, min(v, SUM_CAP))


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
    """Fold one window row (as `store.window_row` makes it) into a rollup row."""
    acc["windows"] = sat_add(acc["windows"], 1)
    for name, col in (("inferences", "count"), ("errors", "errors"),
                      ("spool_dropped", "spool_dropped")):
        if name in acc:
            acc[name] = sat_add(acc[name], _count(w.get(col)))
    for prefix, col in (("p50", "p50_ms"), ("p95", "p95_ms"), ("drift", "drift_score")):
        if w.get(col) is not None:
            acc[f"{prefix}_sum"] += _capped(w[col])
            acc[f"{prefix}_n"] += 1
    for name, col in (("p95_max", "p95_ms"), ("p99_max", "p99_ms"), ("drift_max", "drift_score"),
                      ("last_seq", "seq")):
        if name in acc and w.get(col) is not None and (acc[name] is None or w[col] > acc[name]):
            acc[name] = w[col]
    if "first_seq" in acc and (acc["first_seq"] is None or w["seq"] < acc["first_seq"]):
        acc["first_seq"] = w["seq"]


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
            m[0] = sat_add(m[0], 1)
            m[1], m[2] = min(m[1], seq), max(m[2], seq)

    def add_window(self, w: dict[str, Any], received_at: float | None) -> None:
        d = w["device_id"]
        c = self.counters.setdefault(d, [0, 0, 0, 0])
        c[0] = sat_add(c[0], 1)
        for i, col in enumerate(("count", "errors", "spool_dropped"), start=1):
            c[i] = sat_add(c[i], _count(w.get(col)))
        if d not in self.latest or w["seq"] > self.latest[d]["seq"]:
            self.latest[d] = w
        key = (w.get("model") or "", w.get("model_version") or "",
               hour_of(window_time(w, received_at)))
        acc = self.fleet.get(key)
        if acc is None:
            acc = self.fleet[key] = empty_rollup(FLEET_FIELDS)
        add_window(acc, w)

    def __bool__(self) -> bool:
        return bool(self.messages or self.counters)


def deltas_of(messages: list[tuple], windows: list[dict[str, Any]]) -> Deltas:
    """Deltas of newly stored messages (messages-table tuples: device_id, seq, kind, sha256,
    model, version, wall_time, received_at, payload) and windows (window rows)."""
    out = Deltas()
    received: dict[tuple[str, int], float] = {}
    for m in messages:
        out.add_message(m[0], m[1])
        if len(m) > 7:
            received[(m[0], m[1])] = m[7]
    for w in windows:
        out.add_window(w, received.get((w["device_id"], w["seq"])))
    return out
