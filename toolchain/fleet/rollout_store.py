"""A rollout's state in the fleet store, so that any machine can show, pause, resume,
abort or promote it, and a restarted driver carries on where the last one was. The SQL of
rollouts lives here; toolchain.fleet.rollout decides what to do with it.

Tables: `rollouts` (one row per rollout: its bundle, configuration, state, stage and phase,
and the lease of the driver working on it), `rollout_devices` (every device of the scope
with its stable bucket, role and the last command sent to it), `rollout_verdicts` (each
stage's verdicts with their statistics, as JSON).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from toolchain.fleet.rules import MIN_FEEDBACK

if TYPE_CHECKING:  # the store's schema takes these tables in: no import back at run time
    from toolchain.fleet.store import Store

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rollouts (
        id TEXT PRIMARY KEY, model TEXT NOT NULL, from_version TEXT NOT NULL,
        to_version TEXT NOT NULL, sha256 TEXT NOT NULL, bundle TEXT NOT NULL,
        config TEXT NOT NULL, state TEXT NOT NULL, stage INTEGER NOT NULL,
        phase TEXT NOT NULL, phase_at DOUBLE PRECISION NOT NULL,
        soak_from DOUBLE PRECISION, request TEXT, owner TEXT,
        lease_until DOUBLE PRECISION, created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL, message TEXT)""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, bucket INTEGER NOT NULL,
        role TEXT NOT NULL, state TEXT NOT NULL, command TEXT, command_id TEXT,
        sent_at DOUBLE PRECISION, seq_at_send BIGINT, attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT, PRIMARY KEY (rollout_id, device_id))""",
    """CREATE TABLE IF NOT EXISTS rollout_verdicts (
        rollout_id TEXT NOT NULL, stage INTEGER NOT NULL,
        decided_at DOUBLE PRECISION NOT NULL, decision TEXT NOT NULL,
        reason TEXT NOT NULL, detail TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rollout_verdicts_rollout ON rollout_verdicts "
    "(rollout_id, decided_at)",
    # one unfinished rollout per model, however many `rollout start` race for it
    "CREATE UNIQUE INDEX IF NOT EXISTS rollouts_one_active ON rollouts (model) "
    "WHERE state NOT IN ('completed', 'rolled_back', 'aborted')",
)
ROLLOUT_COLUMNS = ("id", "model", "from_version", "to_version", "sha256", "bundle", "config",
                   "state", "stage", "phase", "phase_at", "soak_from", "request", "owner",
                   "lease_until", "created_at", "updated_at", "message")
DEVICE_COLUMNS = ("rollout_id", "device_id", "bucket", "role", "state", "command",
                  "command_id", "sent_at", "seq_at_send", "attempts", "error")
# what the judge reads of a window
JUDGED_COLUMNS = ("device_id", "seq", "bundle_sha256", "model_version", "start_wall",
                  "end_wall", "count", "p95_ms", "error_rate", "confidence_mean",
                  "drift_score", "accuracy", "feedback_count", "budget_p95_ms",
                  "shadow_sha256", "shadow_count", "shadow_agreement", "shadow_p95_ms",
                  "shadow_confidence_mean", "shadow_accuracy", "shadow_served_accuracy",
                  "shadow_feedback_count")
TERMINAL = ("completed", "rolled_back", "aborted")


def _rows(cur: Any, columns: Sequence[str]) -> list[dict[str, Any]]:
    return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "config": json.loads(row["config"])}


def create(store: Store, row: dict[str, Any]) -> None:
    cols = ", ".join(ROLLOUT_COLUMNS)
    marks = ", ".join("?" for _ in ROLLOUT_COLUMNS)
    values = [json.dumps(row[c]) if c == "config" else row.get(c) for c in ROLLOUT_COLUMNS]
    with store._transaction() as cur:
        cur.execute(f"INSERT INTO rollouts ({cols}) VALUES ({marks})", values)


def get(store: Store, rollout_id: str) -> dict[str, Any] | None:
    with store._transaction(write=False) as cur:
        cur.execute(f"SELECT {', '.join(ROLLOUT_COLUMNS)} FROM rollouts WHERE id = ?",
                    (rollout_id,))
        rows = _rows(cur, ROLLOUT_COLUMNS)
    return _decoded(rows[0]) if rows else None


def all_rollouts(store: Store) -> list[dict[str, Any]]:
    with store._transaction(write=False) as cur:
        cur.execute(f"SELECT {', '.join(ROLLOUT_COLUMNS)} FROM rollouts "
                    "ORDER BY created_at DESC")
        return [_decoded(r) for r in _rows(cur, ROLLOUT_COLUMNS)]


def active_for(store: Store, model: str) -> list[dict[str, Any]]:
    """Rollouts of `model` not finished yet: one at a time per model."""
    marks = ", ".join("?" for _ in TERMINAL)
    with store._transaction(write=False) as cur:
        cur.execute(f"SELECT {', '.join(ROLLOUT_COLUMNS)} FROM rollouts WHERE model = ? "
                    f"AND state NOT IN ({marks})", (model, *TERMINAL))
        return [_decoded(r) for r in _rows(cur, ROLLOUT_COLUMNS)]


def update(store: Store, rollout_id: str, **values: Any) -> None:
    values["updated_at"] = time.time()
    sets = ", ".join(f"{k} = ?" for k in values)
    with store._transaction() as cur:
        cur.execute(f"UPDATE rollouts SET {sets} WHERE id = ?", (*values.values(), rollout_id))


def request(store: Store, rollout_id: str, what: str | None, state: str | None = None) -> bool:
    """Set a rollout's pending request (abort, promote) and/or state (paused, running),
    unless it has finished; True if it was set."""
    marks = ", ".join("?" for _ in TERMINAL)
    sets, params = ["updated_at = ?"], [time.time()]
    if what is not None:
        sets.append("request = ?")
        params.append(what)
    if state is not None:
        sets.append("state = ?")
        params.append(state)
    with store._transaction() as cur:
        cur.execute(f"UPDATE rollouts SET {', '.join(sets)} WHERE id = ? AND state NOT IN "
                    f"({marks})", (*params, rollout_id, *TERMINAL))
        return cur.rowcount == 1


def take_lease(store: Store, rollout_id: str, owner: str, until: float,
               holder_gone: bool = False) -> str | None:
    """Become the rollout's driver until `until`: None if taken, else the live holder.
    A lease of another owner is taken only when it has run out or `holder_gone` (the
    holder is a process of this machine that no longer exists). One conditional UPDATE:
    two drivers racing for a lease that ran out cannot both get it."""
    now = time.time()
    with store._transaction() as cur:
        if holder_gone:
            cur.execute("UPDATE rollouts SET owner = ?, lease_until = ? WHERE id = ?",
                        (owner, until, rollout_id))
        else:
            cur.execute("UPDATE rollouts SET owner = ?, lease_until = ? WHERE id = ? AND "
                        "(owner IS NULL OR owner = ? OR lease_until IS NULL OR "
                        "lease_until <= ?)", (owner, until, rollout_id, owner, now))
        if cur.rowcount == 1:
            return None
        cur.execute("SELECT owner FROM rollouts WHERE id = ?", (rollout_id,))
        row = cur.fetchone()
    return "nobody: no such rollout" if row is None else str(row[0])


def clear_request(store: Store, rollout_id: str, what: str | None) -> None:
    """Forget the request `what` once carried out; a request made since stays."""
    if what is None:
        return
    with store._transaction() as cur:
        cur.execute("UPDATE rollouts SET request = NULL WHERE id = ? AND request = ?",
                    (rollout_id, what))


def release_lease(store: Store, rollout_id: str, owner: str) -> None:
    with store._transaction() as cur:
        cur.execute("UPDATE rollouts SET owner = NULL, lease_until = NULL WHERE id = ? AND "
                    "owner = ?", (rollout_id, owner))


# -- devices ------------------------------------------------------------------------------
def device_seq(store: Store, device_id: str) -> int:
    """The highest seq stored of a device (0 if none)."""
    with store._transaction(write=False) as cur:
        cur.execute("SELECT max_seq FROM devices WHERE device_id = ?", (device_id,))
        row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def scope_devices(store: Store, model: str) -> list[dict[str, Any]]:
    """Every device of `model` with the version and bundle it runs now, and its state
    (online, offline, or None before its first status)."""
    cols = ("device_id", "model_version", "bundle_sha256", "max_seq", "state", "last_seen")
    with store._transaction(write=False) as cur:
        cur.execute(f"SELECT {', '.join(cols)} FROM devices WHERE model = ?", (model,))
        return _rows(cur, cols)


def rollout_devices(store: Store, rollout_id: str) -> list[dict[str, Any]]:
    with store._transaction(write=False) as cur:
        cur.execute(f"SELECT {', '.join(DEVICE_COLUMNS)} FROM rollout_devices WHERE "
                    "rollout_id = ? ORDER BY bucket", (rollout_id,))
        return _rows(cur, DEVICE_COLUMNS)


def add_devices(store: Store, rollout_id: str, devices: Sequence[tuple[str, int]]) -> None:
    """New members of the scope, as controls; a device already a member keeps its role."""
    if not devices:
        return
    with store._transaction() as cur:
        for device_id, bucket in devices:
            cur.execute("INSERT INTO rollout_devices (rollout_id, device_id, bucket, role, "
                        "state) VALUES (?, ?, ?, 'control', 'idle') ON CONFLICT DO NOTHING",
                        (rollout_id, device_id, bucket))


def set_device(store: Store, rollout_id: str, device_id: str, **values: Any) -> None:
    sets = ", ".join(f"{k} = ?" for k in values)
    with store._transaction() as cur:
        cur.execute(f"UPDATE rollout_devices SET {sets} WHERE rollout_id = ? AND device_id = ?",
                    (*values.values(), rollout_id, device_id))


def results_since(store: Store, device_id: str, after_seq: int) -> list[str]:
    """The payloads of a device's command results stored after `after_seq`."""
    with store._transaction(write=False) as cur:
        cur.execute("SELECT payload FROM messages WHERE device_id = ? AND seq > ? AND "
                    "kind = 'result' ORDER BY seq", (device_id, after_seq))
        return [r[0] for r in cur.fetchall()]


def windows_since(store: Store, device_ids: Sequence[str], since: float) -> list[dict[str, Any]]:
    """The windows of `device_ids` that began at or after `since` and saw inferences; an
    accuracy from fewer than MIN_FEEDBACK labels reads None."""
    out: list[dict[str, Any]] = []
    with store._transaction(write=False) as cur:
        for device_id in device_ids:
            cur.execute(f"SELECT {', '.join(JUDGED_COLUMNS)} FROM windows WHERE device_id = ? "
                        "AND start_wall >= ? AND count > 0", (device_id, since))
            out += _rows(cur, JUDGED_COLUMNS)
    for w in out:  # an accuracy from a handful of labels is noise, as the rules see it
        if (w["feedback_count"] or 0) < MIN_FEEDBACK:
            w["accuracy"] = None
        if (w["shadow_feedback_count"] or 0) < MIN_FEEDBACK:
            w["shadow_accuracy"] = w["shadow_served_accuracy"] = None
    return out


# -- verdicts -----------------------------------------------------------------------------
def add_verdict(store: Store, rollout_id: str, stage: int, decision: str, reason: str,
                detail: dict[str, Any]) -> None:
    with store._transaction() as cur:
        cur.execute("INSERT INTO rollout_verdicts (rollout_id, stage, decided_at, decision, "
                    "reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
                    (rollout_id, stage, time.time(), decision, reason, json.dumps(detail)))


def verdicts(store: Store, rollout_id: str) -> list[dict[str, Any]]:
    cols = ("stage", "decided_at", "decision", "reason", "detail")
    with store._transaction(write=False) as cur:
        cur.execute(f"SELECT {', '.join(cols)} FROM rollout_verdicts WHERE rollout_id = ? "
                    "ORDER BY decided_at", (rollout_id,))
        rows = _rows(cur, cols)
    return [{**r, "detail": json.loads(r["detail"])} for r in rows]
