"""Where the fleet's telemetry lands: SQLite by default, PostgreSQL at scale, one schema for
both. Writes are idempotent on (device_id, seq): a QoS 1 redelivery, a device resending
what it never saw acknowledged, or two listeners racing all store a message once. All of
the fleet's SQL lives here: the rules decide over the rows this module fetches, and the
report formats the rows it returns.

    store = open_store("sqlite:///fleet.db")        # or postgresql://user@host/db
"""

from __future__ import annotations

import functools
import json
import math
import operator
import shlex
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from runtime.protocol import MAX_INT, MessageRejected, storable_text
from toolchain.errors import UsageError
from toolchain.fleet.rollout_store import SCHEMA as ROLLOUT_SCHEMA
from toolchain.fleet.rollup import (
    DEVICE_FIELDS,
    FLEET_FIELDS,
    INT_FIELDS,
    LATEST_COLUMNS,
    ROLLUP_FIELDS,
    Deltas,
    add_window,
    clamp_counters,
    deltas_of,
    empty_rollup,
    hour_of,
    window_time,
)
from toolchain.fleet.rules import (
    METRIC_MIN_COUNT,
    METRICS,
    SWEEP_METRICS,
    Rule,
    Transition,
    decide,
    scope_of,
)

# Each device's running summary, kept at ingest (update_device_summaries) so that the report
# never scans windows: totals, the seq range (gaps = max_seq - messages: sequence numbers in
# 1..max_seq never received), the latest window (highest seq) and what retention deleted.
DEVICE_SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("messages", "BIGINT NOT NULL DEFAULT 0"), ("min_seq", "BIGINT"), ("max_seq", "BIGINT"),
    ("windows", "BIGINT NOT NULL DEFAULT 0"), ("inferences", "BIGINT NOT NULL DEFAULT 0"),
    ("errors", "BIGINT NOT NULL DEFAULT 0"), ("spool_dropped", "BIGINT NOT NULL DEFAULT 0"),
    ("latest_seq", "BIGINT"),
    *((f"latest_{c}", "DOUBLE PRECISION") for c in LATEST_COLUMNS),
    # the highest seq retention deleted: a seq at or below it is a duplicate (retained_below)
    ("retained_seq", "BIGINT NOT NULL DEFAULT 0"),
)


# windows columns of later releases (feedback, shadow runs): in the first release's CREATE
# TABLE too, and added to older stores by init_schema (ADDED_COLUMNS)
ADDED_WINDOW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("confidence_mean", "DOUBLE PRECISION"),
    ("feedback_count", "BIGINT"), ("feedback_correct", "BIGINT"),
    ("accuracy", "DOUBLE PRECISION"),
    ("shadow_sha256", "TEXT"), ("shadow_version", "TEXT"), ("shadow_count", "BIGINT"),
    ("shadow_agreement", "DOUBLE PRECISION"), ("shadow_p50_ms", "DOUBLE PRECISION"),
    ("shadow_p95_ms", "DOUBLE PRECISION"), ("shadow_confidence_mean", "DOUBLE PRECISION"),
    ("shadow_errors", "BIGINT"), ("shadow_feedback_count", "BIGINT"),
    ("shadow_accuracy", "DOUBLE PRECISION"), ("shadow_served_accuracy", "DOUBLE PRECISION"),
)


def _rollup_table(name: str, keys: tuple[str, ...], fields: tuple[str, ...]) -> str:
    cols = [*keys, *(f"{f} {'BIGINT' if f in INT_FIELDS else 'DOUBLE PRECISION'}"
                     + (" NOT NULL DEFAULT 0" if ROLLUP_FIELDS[f] == "add" else "")
                     for f in fields)]
    pk = ", ".join(k.split()[0] for k in keys)
    return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)}, PRIMARY KEY ({pk}))"


SCHEMA = [
    """CREATE TABLE IF NOT EXISTS messages (
        device_id TEXT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL,
        bundle_sha256 TEXT, model TEXT, model_version TEXT,
        wall_time DOUBLE PRECISION, received_at DOUBLE PRECISION NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (device_id, seq))""",
    """CREATE TABLE IF NOT EXISTS windows (
        device_id TEXT NOT NULL, seq BIGINT NOT NULL,
        model TEXT, model_version TEXT, bundle_sha256 TEXT, profile TEXT,
        start_wall DOUBLE PRECISION, end_wall DOUBLE PRECISION,
        count BIGINT, errors BIGINT, error_rate DOUBLE PRECISION,
        p50_ms DOUBLE PRECISION, p95_ms DOUBLE PRECISION, p99_ms DOUBLE PRECISION,
        throughput DOUBLE PRECISION, budget_p95_ms DOUBLE PRECISION,
        drift_score DOUBLE PRECISION, input_psi DOUBLE PRECISION, class_psi DOUBLE PRECISION,
        confidence_psi DOUBLE PRECISION, input_ks_p DOUBLE PRECISION,
        confidence_ks_p DOUBLE PRECISION, spool_dropped BIGINT, """
    + "".join(f"{name} {kind}, " for name, kind in ADDED_WINDOW_COLUMNS)
    + "PRIMARY KEY (device_id, seq))",
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY, state TEXT, state_reason TEXT,
        state_at DOUBLE PRECISION, last_seen DOUBLE PRECISION,
        bundle_sha256 TEXT, model TEXT, model_version TEXT, profile TEXT, backend TEXT,
        period_s DOUBLE PRECISION, """
    + ", ".join(f"{name} {kind}" for name, kind in DEVICE_SUMMARY_COLUMNS) + ")",
    """CREATE TABLE IF NOT EXISTS rule_state (
        rule TEXT NOT NULL, scope TEXT NOT NULL, device_id TEXT NOT NULL,
        breaching INTEGER NOT NULL, value DOUBLE PRECISION, updated_at DOUBLE PRECISION,
        PRIMARY KEY (rule, scope, device_id))""",
    # active_key is rule|scope while the trigger is active and NULL once it clears, so a
    # UNIQUE constraint lets exactly one listener fire it.
    """CREATE TABLE IF NOT EXISTS triggers (
        id TEXT PRIMARY KEY, rule TEXT NOT NULL, scope TEXT NOT NULL,
        active_key TEXT UNIQUE, fired_at DOUBLE PRECISION NOT NULL,
        cleared_at DOUBLE PRECISION, devices TEXT, detail TEXT,
        command TEXT, command_rc INTEGER, command_output TEXT)""",
    """CREATE TABLE IF NOT EXISTS listener_stats (
        listener_id TEXT PRIMARY KEY, received BIGINT, stored BIGINT, duplicates BIGINT,
        rejected BIGINT, started_at DOUBLE PRECISION, updated_at DOUBLE PRECISION)""",
    # messages that could not be stored for what they contain, acknowledged so that the
    # broker does not hand them back forever; the newest DEAD_LETTERS_KEPT are kept
    """CREATE TABLE IF NOT EXISTS dead_letters (
        received_at DOUBLE PRECISION NOT NULL, topic TEXT NOT NULL, device_id TEXT,
        reason TEXT NOT NULL, payload_bytes BIGINT NOT NULL, payload_prefix TEXT NOT NULL)""",
    # per model version and hour, kept at ingest: the report's fleet trend and versions()
    # without reading raw windows; never deleted by retention
    _rollup_table("fleet_hourly", ("model TEXT NOT NULL", "model_version TEXT NOT NULL",
                                   "hour_start DOUBLE PRECISION NOT NULL"), FLEET_FIELDS),
    # per device and hour, written by retention from the raw windows it deletes
    _rollup_table("windows_hourly", ("device_id TEXT NOT NULL", "model TEXT NOT NULL",
                                     "model_version TEXT NOT NULL",
                                     "hour_start DOUBLE PRECISION NOT NULL"), DEVICE_FIELDS),
    # Each index below costs every ingest a B-tree insert, on a page of its own for each
    # device in the batch: only those a query needs. The raw windows and messages have
    # their primary keys only (device_id, seq): retention and a device's series walk a
    # device's rows in seq order (see RETIRED_INDEXES), and the fleet-wide reads use the
    # rollups.
    # fleet_trend and latest_hour
    "CREATE INDEX IF NOT EXISTS fleet_hourly_hour ON fleet_hourly (hour_start)",
    # device_series: one device's hourly rollups in a time range
    "CREATE INDEX IF NOT EXISTS windows_hourly_device ON windows_hourly (device_id, hour_start)",
    "CREATE INDEX IF NOT EXISTS dead_letters_received ON dead_letters (received_at)",
    *ROLLOUT_SCHEMA,  # rollouts, their devices and verdicts (toolchain.fleet.rollout_store)
]
# indices of earlier releases that ingest no longer pays for: init_schema drops them
RETIRED_INDEXES = ("windows_version", "windows_device_end", "messages_device_received")
# columns added after the first release, with their types: init_schema adds them to old
# stores (and backfills the device summaries from the rows already stored)
ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    # first: the devices backfill below reads every windows column
    "windows": ADDED_WINDOW_COLUMNS,
    "listener_stats": (("store_errors", "BIGINT"), ("connects", "BIGINT")),
    "devices": (*DEVICE_SUMMARY_COLUMNS, ("period_s", "DOUBLE PRECISION")),
}
DEAD_LETTERS_KEPT = 10_000
DEAD_LETTER_PREFIX_BYTES = 1024
DEAD_LETTER_TEXT = 1000

WINDOW_COLUMNS = ("device_id", "seq", "model", "model_version", "bundle_sha256", "profile",
                  "start_wall", "end_wall", "count", "errors", "error_rate", "p50_ms", "p95_ms",
                  "p99_ms", "throughput", "budget_p95_ms", "drift_score", "input_psi",
                  "class_psi", "confidence_psi", "input_ks_p", "confidence_ks_p",
                  "spool_dropped", *(name for name, _ in ADDED_WINDOW_COLUMNS))


class Incoming(NamedTuple):  # one per message: a tuple is cheaper than a dataclass
    """A spooled message. From the listener: validated by runtime.protocol.validate_fields,
    with its payload text as received and the checked values by path; otherwise (text and
    fields None) it is serialized and every value is checked here."""
    msg: dict[str, Any]
    text: str | None = None
    fields: dict[str, Any] | None = None


@dataclass
class BatchResult:
    stored: list[tuple[str, int]]  # (device_id, seq) newly stored
    duplicates: list[tuple[str, int]]  # already in the store
    transitions: list[Transition]
    rejected: list[tuple[int, MessageRejected]]  # (index in the batch, why)


class RuleCache:
    """What the rules need from a device's recent windows, kept in memory between batches
    so that a rule does not query the store for every window. A device's entries are
    trusted only while this listener has seen every message of it since they were loaded
    (seqs without a hole): with a shared subscription another listener stores some of a
    device's windows, and then the store is asked instead, once per batch."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(r for r in rules if r.metric not in SWEEP_METRICS)  # per window
        for rule in self.rules:
            if rule.metric not in METRICS:  # it goes into the SQL text of the store's loader
                raise ValueError(f"rule {rule.name}: unknown metric {rule.metric!r}")
        self._through: dict[str, int] = {}  # device -> the highest seq stored here
        # (rule, device, scope) -> [the seq last evaluated, how many windows with the
        # metric breached in a row up to it]
        self._recent: dict[tuple[str, str, str], list[int]] = {}
        self._stale: set[str] = set()  # devices whose history had a hole in this batch
        self._loaded: set[tuple[str, str, str]] = set()  # reloaded in this batch
        self.loads = 0  # store queries made on a miss (a figure for the benchmarks)

    def saw(self, messages: Sequence[tuple[Any, ...]]) -> None:
        """The messages rows newly stored in this batch (any kind): a device whose seqs do
        not continue the run this listener saw is reloaded from the store."""
        self._stale.clear()
        self._loaded.clear()
        through = self._through
        late: dict[str, list[int]] = {}
        for m in messages:  # the common case: each device's next seq, once or in order
            device, seq = m[0], m[1]
            last = through.get(device)
            if last is not None and seq == last + 1 and device not in late:
                through[device] = seq
            else:
                late.setdefault(device, []).append(seq)
        for device, got in late.items():  # a first sight, a hole, or seqs out of order
            got.sort()
            last = through.get(device)
            if last is None or got != list(range(last + 1, last + 1 + len(got))):
                self._stale.add(device)
            through[device] = max(got[-1], -1 if last is None else last)

    def streak(self, rule: Rule, row: dict[str, Any],
               load: Callable[[Rule, dict[str, Any]], list[dict[str, Any]]],
               scope: str | None = None) -> bool:
        """Whether the device now breaches `rule`: its last rule.consecutive windows in the
        row's scope that carry the metric all breach (rules.streak_breaches). Kept as the
        number of those windows that breach in a row, newest first (capped at
        rule.consecutive); `load` reads them from the store (newest first, `row` among
        them) when this listener's memory is not to be trusted. Windows of a device are
        asked for in seq order within a batch."""
        device, seq = row["device_id"], row["seq"]
        key = (rule.name, device, scope or scope_of(row))
        entry = self._recent.get(key)
        if (entry is None or seq <= entry[0]  # unseen, or a late seq: from the store
                or (device in self._stale and key not in self._loaded)):
            self.loads += 1
            run = 0
            for r in load(rule, row):  # at most rule.consecutive rows, newest first
                if not rule.breaches(r):
                    break
                run += 1
            self._recent[key] = entry = [seq, min(run, rule.consecutive)]
            self._loaded.add(key)
        else:
            entry[0] = seq
            if rule.value(row) is not None:  # a window without it leaves the run be
                entry[1] = min(entry[1] + 1, rule.consecutive) if rule.breaches(row) else 0
        return entry[1] >= rule.consecutive

    def forget(self) -> None:
        """After a batch that failed: nothing it evaluated was kept."""
        self._through.clear()
        self._recent.clear()


DEFAULT_PERIOD_S = 60.0  # a device that never said its window period: the runtime's default


class _Decisions:
    """One batch's (or sweep's) rule decisions, in its transaction: which devices breach and
    which triggers are active is read once, since other listeners sharing the store change
    them; rule_state rows are written only where a device's breaching changed; with several
    listeners the UNIQUE active_key decides which one fires."""

    def __init__(self, cur: Any, now: float) -> None:
        self.cur, self.now = cur, now
        cur.execute("SELECT rule, scope, device_id FROM rule_state WHERE breaching = 1")
        self.breaching: dict[tuple[str, str], set[str]] = {}
        for rule_name, scope, device in cur.fetchall():
            self.breaching.setdefault((rule_name, scope), set()).add(device)
        cur.execute("SELECT active_key, id FROM triggers WHERE active_key IS NOT NULL")
        self.active = dict(cur.fetchall())
        self.changed: list[tuple[Any, ...]] = []
        self.transitions: list[Transition] = []

    def __call__(self, rule: Rule, row: dict[str, Any], now_breaching: bool,
                 scope: str | None = None) -> None:
        cur, now, active = self.cur, self.now, self.active
        scope, device = scope or scope_of(row), row["device_id"]
        before = self.breaching.get((rule.name, scope))
        if before is None:
            before = self.breaching[(rule.name, scope)] = set()
        key = f"{rule.name}|{scope}"
        if (now_breaching == (device in before)
                and (len(before) >= rule.min_devices) == (key in active)):
            return  # nothing changes: what rules.decide() would say, without asking it
        outcome = decide(rule, row, now_breaching, before, key in active)
        if outcome.breaching != (device in before):
            self.changed.append((rule.name, scope, device, int(outcome.breaching),
                                 rule.value(row), now))
            (before.add if outcome.breaching else before.discard)(device)
        if outcome.action == "fire":
            tid = uuid.uuid4().hex
            cur.execute(
                "INSERT INTO triggers (id, rule, scope, active_key, fired_at, devices, detail,"
                " command) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (active_key) DO NOTHING",
                (tid, rule.name, scope, key, now, json.dumps(outcome.devices),
                 json.dumps(outcome.detail),
                 shlex.join(rule.command) if rule.command else None))
            active[key] = tid  # fired here or by another listener: active either way
            if cur.rowcount == 1:
                self.transitions.append(Transition("fired", tid, rule, scope, outcome.devices,
                                                   outcome.detail))
        elif outcome.action == "clear" and key in active:
            tid = active.pop(key)
            cur.execute("UPDATE triggers SET cleared_at = ?, active_key = NULL"
                        " WHERE id = ? AND active_key = ?", (now, tid, key))
            if cur.rowcount == 1:
                self.transitions.append(Transition("cleared", tid, rule, scope,
                                                   outcome.devices, outcome.detail))

    def finish(self) -> list[Transition]:
        if self.changed:
            self.cur.executemany(
                "INSERT INTO rule_state (rule, scope, device_id, breaching, value, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rule, scope, device_id) DO UPDATE SET"
                " breaching = excluded.breaching, value = excluded.value,"
                " updated_at = excluded.updated_at", self.changed)
        return self.transitions


INSERT_WINDOW = (f"INSERT INTO windows ({', '.join(WINDOW_COLUMNS)}) VALUES"
                 f" ({', '.join('?' * len(WINDOW_COLUMNS))}) ON CONFLICT DO NOTHING")
_window_values = operator.itemgetter(*WINDOW_COLUMNS)  # a window row's values, in order
_latest_values = operator.itemgetter(*LATEST_COLUMNS)
INSERT_MESSAGE = (
    "INSERT INTO messages (device_id, seq, kind, bundle_sha256, model, model_version,"
    " wall_time, received_at, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id, seq) DO NOTHING")


BACKFILL_CHUNK = 20_000
RETENTION_PAGE = 500  # messages read at a time from one device
RETENTION_CHUNK = 5_000  # messages per retention transaction: a few tens of ms of writing
_MAX = str(MAX_INT)


def _merge(table: str, field: str, kind: str, integer: bool) -> str:
    """SQL for `field = <the stored value merged with excluded's>` in an upsert."""
    old, new = f"{table}.{field}", f"excluded.{field}"
    if kind == "add" and integer:  # saturating at 2**63 - 1: both sides are >= 0
        return f"{field} = CASE WHEN {old} > {_MAX} - {new} THEN {_MAX} ELSE {old} + {new} END"
    if kind == "add":
        return f"{field} = {old} + {new}"
    op = ">" if kind == "max" else "<"
    return (f"{field} = CASE WHEN {old} IS NULL OR {new} {op} {old} THEN {new} "
            f"ELSE {old} END")


def _upsert(table: str, keys: tuple[str, ...], fields: dict[str, str]) -> str:
    """An upsert that merges `fields` (name -> add/max/min) into the row at `keys`."""
    cols = (*keys, *fields)
    return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
            + ", ".join(_merge(table, f, kind, f in INT_FIELDS or table == "devices")
                        for f, kind in fields.items()))


_SUMMARY_MERGE = {"messages": "add", "min_seq": "min", "max_seq": "max", "windows": "add",
                  "inferences": "add", "errors": "add", "spool_dropped": "add"}
_LATEST = ("latest_seq", *(f"latest_{c}" for c in LATEST_COLUMNS))
_NEWER = ("excluded.latest_seq IS NOT NULL AND (devices.latest_seq IS NULL OR"
          " excluded.latest_seq > devices.latest_seq)")
# what a batch adds to a device's summary: counters add, the seq range widens, and the latest
# window's columns are replaced only by a window with a higher seq (SET reads the old row
# throughout)
_SUMMARY_SET = (
    [_merge("devices", f, kind, True) for f, kind in _SUMMARY_MERGE.items()]
    + [f"{c} = CASE WHEN {_NEWER} THEN excluded.{c} ELSE devices.{c} END" for c in _LATEST])
# who the device is and when it was last heard from, as DEVICE_UPSERT writes it
_IDENTITY = ("last_seen", "bundle_sha256", "model", "model_version", "profile", "backend",
             "period_s")
_IDENTITY_SET = [*(f"{c} = excluded.{c}" for c in _IDENTITY[:-1]),
                 "period_s = COALESCE(excluded.period_s, devices.period_s)"]


def _device_upsert(columns: tuple[str, ...], sets: list[str]) -> str:
    return (f"INSERT INTO devices (device_id, {', '.join(columns)}) VALUES"
            f" ({', '.join('?' * (1 + len(columns)))}) ON CONFLICT (device_id) DO UPDATE SET "
            + ", ".join(sets))


# a device's identity and when it was last heard from; period_s (its window period) only
# changes with a window that says it
DEVICE_UPSERT = _device_upsert(_IDENTITY, _IDENTITY_SET)
_SUMMARY_COLUMNS = (*_SUMMARY_MERGE, *_LATEST)
# one statement per device and batch: the summary alone (backfill), or (ingest) with the
# identity from the device's last message in the batch
_DEVICE_SUMMARY_UPSERT = _device_upsert(_SUMMARY_COLUMNS, _SUMMARY_SET)
_DEVICE_INGEST_UPSERT = _device_upsert((*_IDENTITY, *_SUMMARY_COLUMNS),
                                       _IDENTITY_SET + _SUMMARY_SET)
_FLEET_UPSERT = _upsert("fleet_hourly", ("model", "model_version", "hour_start"),
                        {f: ROLLUP_FIELDS[f] for f in FLEET_FIELDS})
_DEVICE_HOURLY_UPSERT = _upsert("windows_hourly", ("device_id", "model", "model_version",
                                                   "hour_start"),
                                {f: ROLLUP_FIELDS[f] for f in DEVICE_FIELDS})


# Reads that must stay cheap on a large store, each served by an index (a test EXPLAINs
# them on both databases)
RETENTION_WINDOW_COLUMNS = ("model", "model_version", "start_wall", "end_wall", "count",
                            "errors", "spool_dropped", "p50_ms", "p95_ms", "p99_ms",
                            "drift_score")
RETENTION_SELECT = (  # the primary key (device_id, seq): a device's oldest seqs
    f"SELECT m.device_id, m.seq, m.received_at, w.seq,"
    f" {', '.join(f'w.{c}' for c in RETENTION_WINDOW_COLUMNS)} FROM messages m LEFT JOIN"
    " windows w ON w.device_id = m.device_id AND w.seq = m.seq WHERE m.device_id = ? AND"
    " m.seq > ? ORDER BY m.seq LIMIT ?")
FLEET_TREND = (  # fleet_hourly_hour
    "SELECT hour_start, SUM(windows) AS windows, SUM(inferences) AS inferences,"
    " SUM(errors) AS errors, SUM(p50_sum) AS p50_sum, SUM(p50_n) AS p50_n,"
    " SUM(p95_sum) AS p95_sum, SUM(p95_n) AS p95_n, MAX(p95_max) AS p95_max,"
    " MAX(p99_max) AS p99_max, SUM(drift_sum) AS drift_sum, SUM(drift_n) AS drift_n,"
    " MAX(drift_max) AS drift_max FROM fleet_hourly WHERE hour_start >= ? AND"
    " hour_start <= ? GROUP BY hour_start ORDER BY hour_start")
DEVICE_HOURLY = (  # windows_hourly_device
    "SELECT hour_start + 1800 AS t, p95_sum, p95_n, drift_sum, drift_n FROM windows_hourly"
    " WHERE device_id = ? AND hour_start >= ? ORDER BY hour_start LIMIT ?")
DEVICE_WINDOWS = (  # the primary key (device_id, seq): retention bounds a device's rows
    "SELECT end_wall AS t, p95_ms, drift_score FROM windows WHERE device_id = ? AND"
    " end_wall >= ? ORDER BY seq LIMIT ?")
GAP_RANGES = (  # the primary key (device_id, seq)
    "SELECT prev + 1 AS lo, seq - 1 AS hi FROM (SELECT seq, LAG(seq, 1, CAST(? AS BIGINT))"
    " OVER (ORDER BY seq) AS prev FROM messages WHERE device_id = ? AND seq > ?) AS s"
    " WHERE seq > prev + 1 ORDER BY seq LIMIT ?")


class StoreError(RuntimeError):
    """The store cannot be opened or written: the database's fault, never the message's."""


class Store:
    """SQL with `?` placeholders; the PostgreSQL store rewrites them to `%s`."""

    url: str
    placeholder = "?"
    driver_errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: Any = None  # the cursor of a transaction left open for commit_open()

    # backend specifics --------------------------------------------------------------------
    def _connect(self) -> Any:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _begin(self, cur: Any, write: bool) -> None:
        """Start a transaction (PostgreSQL's driver starts one with the first statement)."""

    @contextmanager
    def _transaction(self, write: bool = True, commit: bool = True) -> Iterator[Any]:
        """A transaction holding the store; `commit=False` leaves it open, still holding
        the store, for commit_open()."""
        self._lock.acquire()
        try:
            cur = self.conn.cursor()
        except BaseException:
            self._lock.release()
            raise
        try:
            self._begin(cur, write)
            yield _Cursor(cur, self._sql)
        except BaseException as exc:
            self._end(cur, exc)
            raise  # _end raised already; this is for the type checker
        if commit:
            self._end(cur, None)
        else:
            self._open = cur

    def _end(self, cur: Any, error: BaseException | None) -> None:
        """Commit (no `error`) or roll back the transaction on `cur`, close it and release
        the store. A database failure is raised as StoreError."""
        try:
            if error is None:
                try:
                    self.conn.commit()
                    return
                except BaseException as exc:  # noqa: BLE001 - rolled back and raised below
                    error = exc
            try:
                self.conn.rollback()
            except self.driver_errors:
                pass  # a lost connection: the original error says more
            if isinstance(error, self.driver_errors):
                # the listener redelivers on StoreError only, so say it is the store's
                raise StoreError(f"store {redact(self.url)}: {type(error).__name__}: "
                                 f"{error}") from error
            raise error
        finally:
            try:
                cur.close()
            except self.driver_errors:
                pass
            self._lock.release()

    @property
    def transaction_open(self) -> bool:
        """Whether ingest_batch(commit=False) left a transaction for commit_open()."""
        return self._open is not None

    def commit_open(self) -> None:
        """Commit the batch ingest_batch(commit=False) left open and release the store; may
        run on another thread (the database writes the batch out without holding Python's
        GIL). Raises StoreError, and then nothing of that batch is kept."""
        cur, self._open = self._open, None
        if cur is None:
            raise RuntimeError("no transaction is open")
        self._end(cur, None)

    def init_schema(self) -> None:
        with self._transaction() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)
            for index in RETIRED_INDEXES:
                cur.execute(f"DROP INDEX IF EXISTS {index}")
        for table, columns in ADDED_COLUMNS.items():
            with self._transaction() as cur:
                cur.execute(f"SELECT * FROM {table} LIMIT 0")
                have = {d[0] for d in cur.description}
                added = [name for name, _ in columns if name not in have]
                for name, kind in columns:
                    if name in added:
                        cur.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                if table == "devices" and "latest_seq" in added:
                    # a store written before the summaries: compute them from its rows in
                    # the transaction that adds the columns (a crash leaves neither)
                    self._backfill_summaries(cur)

    def _stream(self, sql: str) -> Iterator[list[tuple]]:
        """A large result in chunks of BACKFILL_CHUNK rows, never all of it in memory
        (inside a transaction)."""
        cur = self.conn.cursor()
        try:
            cur.execute(sql)
            while rows := cur.fetchmany(BACKFILL_CHUNK):
                yield rows
        finally:
            cur.close()

    def _backfill_summaries(self, cur: Any) -> None:
        """Device summaries and the fleet rollup from every stored message and window,
        through the same arithmetic as ingest."""
        for rows in self._stream("SELECT device_id, seq FROM messages"):
            self._write_deltas(cur, deltas_of(rows, []))
        cols = ", ".join(f"w.{c}" for c in WINDOW_COLUMNS)
        for rows in self._stream(f"SELECT {cols}, m.received_at FROM windows w LEFT JOIN"
                                 " messages m ON m.device_id = w.device_id AND m.seq = w.seq"):
            deltas = Deltas()
            for r in rows:
                deltas.add_window(dict(zip(WINDOW_COLUMNS, r[:-1], strict=True)), r[-1])
            self._write_deltas(cur, deltas)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._transaction(write=False) as cur:
            cur.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def close(self) -> None:
        self.conn.close()

    # writes ---------------------------------------------------------------------------------
    def ingest(self, msg: dict[str, Any], received_at: float | None = None,
               rules: Sequence[Rule] = ()) -> tuple[bool, list[Transition]]:
        """Store one spooled message (window, event, result) and, for a window, apply the
        rules in the same transaction. Returns (stored, the triggers that fired or cleared);
        stored is False for a duplicate."""
        received_at = received_at or time.time()
        result = self.ingest_batch([Incoming(msg)], received_at, RuleCache(rules))
        if result.rejected:
            raise result.rejected[0][1]
        return bool(result.stored), result.transitions

    def ingest_batch(self, batch: Sequence[Incoming], received_at: float,
                     cache: RuleCache, *, commit: bool = True) -> BatchResult:
        """Store a batch of validated spooled messages in ONE transaction (group commit):
        messages rows one by one (each tells whether it is new), windows and devices with
        batched statements, and the rules over the new windows with their state from
        `cache`. A message whose rows cannot be built (checked before any SQL runs) is left
        out and listed in `rejected`, for the dead letters. Raises
        StoreError when the database fails: nothing of the batch is kept.

        `commit=False`: the transaction is left open (when the batch had rows to store) for
        commit_open(); if that fails, call cache.forget() too."""
        return self.ingest_prepared(self.prepare_batch(batch, received_at), received_at, cache,
                                    commit=commit)

    def prepare_batch(self, batch: Sequence[Incoming],
                      received_at: float) -> tuple[list[tuple[Any, ...]], BatchResult]:
        """ingest_batch's first half, without the store: each message's rows, or why not."""
        prepared, result = [], BatchResult([], [], [], [])
        for i, item in enumerate(batch):
            try:
                prepared.append(message_rows(item.msg, received_at, item.text, item.fields))
            except MessageRejected as exc:
                result.rejected.append((i, exc))
        return prepared, result

    def ingest_prepared(self, prepared: tuple[list[tuple[Any, ...]], BatchResult],
                        received_at: float, cache: RuleCache, *,
                        commit: bool = True) -> BatchResult:
        """ingest_batch's second half: prepare_batch's rows into the store."""
        rows, result = prepared
        if not rows:
            return result
        try:
            self._store_batch(rows, received_at, cache, result, commit)
        except BaseException:
            cache.forget()
            raise
        return result

    def _store_batch(self, prepared: list[tuple[Any, ...]], received_at: float,
                     cache: RuleCache, result: BatchResult, commit: bool = True) -> None:
        with self._transaction(commit=commit) as cur:
            new_messages, new_windows, devices = [], [], {}
            retained = self._retained(cur, {p[0][0] for p in prepared})
            if retained:  # retention deleted these seqs' rows: they count as stored
                gone = [p for p in prepared if p[0][1] <= retained.get(p[0][0], -1)]
                result.duplicates += [(p[0][0], p[0][1]) for p in gone]
                prepared = [p for p in prepared if p[0][1] > retained.get(p[0][0], -1)]
            fresh = self._insert_all_new(cur, [p[0] for p in prepared])
            for message, device, row in prepared:
                key = (message[0], message[1])
                if not fresh:
                    cur.execute(INSERT_MESSAGE, message)
                    if cur.rowcount != 1:
                        result.duplicates.append(key)
                        continue
                result.stored.append(key)
                new_messages.append(message)
                devices[message[0]] = device
                if row is not None:
                    new_windows.append(row)
            if new_windows:
                cur.executemany(INSERT_WINDOW, [_window_values(r) for r in new_windows])
            cache.saw(new_messages)
            if new_windows and cache.rules:
                result.transitions = self._apply_rules(cur, cache, new_windows, received_at)
            if new_messages:  # last: it updates the hour's shared fleet_hourly row
                self._write_deltas(cur, deltas_of(new_messages, new_windows, received_at),
                                  devices)

    def _retained(self, cur: Any, device_ids: set[str]) -> dict[str, int]:
        """retained_below() inside the batch's transaction, for the devices retention has
        touched only (usually none)."""
        out: dict[str, int] = {}
        ids = sorted(device_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            cur.execute("SELECT device_id, retained_seq FROM devices WHERE retained_seq > 0"
                        f" AND device_id IN ({', '.join('?' * len(chunk))})", chunk)
            out.update((d, int(r)) for d, r in cur.fetchall())
        return out

    def _insert_all_new(self, cur: Any, messages: list[tuple[Any, ...]]) -> bool:
        """Insert the batch's messages rows in one batched statement if none of them is
        stored yet (the common case: redeliveries are rare); True if so. Otherwise nothing
        is inserted and the caller inserts them one by one to learn which are new. One
        statement matters most on PostgreSQL, where each one is a round trip."""
        if not messages or len({(m[0], m[1]) for m in messages}) != len(messages):
            return False
        cur.execute("SAVEPOINT batch")
        cur.executemany(INSERT_MESSAGE, messages)
        if cur.rowcount == len(messages):
            cur.execute("RELEASE SAVEPOINT batch")
            return True
        cur.execute("ROLLBACK TO SAVEPOINT batch")
        cur.execute("RELEASE SAVEPOINT batch")
        return False

    def _apply_rules(self, cur: Any, cache: RuleCache, windows: list[dict[str, Any]],
                     now: float) -> list[Transition]:
        """Evaluate the rules over a batch's new windows in the order they came. Streaks
        come from the cache (the store only for a device whose history this listener has
        not seen whole)."""
        decide = _Decisions(cur, now)
        load = functools.partial(self._recent_rows, cur)
        rules, streak = cache.rules, cache.streak
        for row in windows:  # in arrival order: as one window at a time would decide
            scope = scope_of(row)
            for rule in rules:
                decide(rule, row, streak(rule, row, load, scope), scope)
        return decide.finish()

    def sweep(self, rules: Sequence[Rule], now: float | None = None) -> list[Transition]:
        """Apply the rules on SWEEP_METRICS to every device: `silence` (window periods since
        its last message) and `offline_s` (seconds since it went offline). The listener runs
        this every few seconds; a rule fires and clears as the window rules do. First, an
        active trigger whose scope (model@version) no device runs any more is cleared: no
        window of that scope will come to clear it (a fleet moved to v2 leaves no v1 alarm
        standing)."""
        sweeping = [r for r in rules if r.metric in SWEEP_METRICS]
        now = time.time() if now is None else now
        with self._transaction() as cur:
            transitions = self._clear_abandoned(cur, rules, now)
            if not sweeping:
                return transitions
            cur.execute("SELECT device_id, model, model_version, last_seen, period_s, state"
                        " FROM devices WHERE last_seen IS NOT NULL")
            devices = cur.fetchall()
            decide = _Decisions(cur, now)
            for device, model, version, last_seen, period, state in devices:
                idle = max(0.0, now - last_seen)
                row = {"device_id": device, "model": model, "model_version": version,
                       "silence": round(idle / max(period or DEFAULT_PERIOD_S, 0.1), 3),
                       "offline_s": round(idle, 3) if state == "offline" else 0.0}
                for rule in sweeping:
                    decide(rule, row, rule.breaches(row))
            return transitions + decide.finish()

    def _clear_abandoned(self, cur: Any, rules: Sequence[Rule], now: float) -> list[Transition]:
        """Clear the active triggers of scopes no device runs now (by each device's latest
        message), and forget which devices breached there, so that a device coming back to
        that version starts its streak afresh. The detail says why."""
        cur.execute("SELECT id, rule, scope, active_key, detail FROM triggers"
                    " WHERE active_key IS NOT NULL")
        active = cur.fetchall()
        if not active:
            return []
        cur.execute("SELECT DISTINCT model, model_version FROM devices")
        running = {scope_of({"model": m, "model_version": v}) for m, v in cur.fetchall()}
        by_name = {r.name: r for r in rules}
        out = []
        for tid, name, scope, key, detail in active:
            if scope in running:
                continue
            why = f"no device runs {scope} any more"
            try:
                kept = json.loads(detail or "{}")
            except ValueError:
                kept = {}
            kept = {**(kept if isinstance(kept, dict) else {}), "cleared_because": why}
            cur.execute("UPDATE triggers SET cleared_at = ?, active_key = NULL, detail = ?"
                        " WHERE id = ? AND active_key = ?", (now, json.dumps(kept), tid, key))
            if cur.rowcount != 1:
                continue  # another listener cleared it first
            cur.execute("UPDATE rule_state SET breaching = 0, updated_at = ? WHERE rule = ? AND"
                        " scope = ? AND breaching = 1", (now, name, scope))
            # a rule since taken out of the rules file: its trigger still clears
            rule = by_name.get(name) or Rule(name, "")
            out.append(Transition("cleared", tid, rule, scope, [],
                                  {"rule": name, "scope": scope, "reason": why}))
        return out

    def _recent_rows(self, cur: Any, rule: Rule, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The device's latest windows in the row's scope with the rule's metric (and, for a
        metric of METRIC_MIN_COUNT, enough samples for it), up to and including `row`,
        newest first."""
        column, least = METRIC_MIN_COUNT.get(rule.metric, ("seq", 0))
        cur.execute(
            f"SELECT seq, {rule.metric}, budget_p95_ms, {column} FROM windows WHERE"
            f" device_id = ? AND model = ? AND model_version = ? AND seq <= ? AND"
            f" {rule.metric} IS NOT NULL AND {column} >= ? ORDER BY seq DESC LIMIT ?",
            (row["device_id"], row["model"], row["model_version"], row["seq"], least,
             rule.consecutive))
        return [{"seq": r[0], rule.metric: r[1], "budget_p95_ms": r[2], column: r[3]}
                for r in cur.fetchall()]

    def update_device_summaries(self, cur: Any, messages: list[tuple],
                                windows: list[dict[str, Any]]) -> None:
        """Add newly stored rows to the device summaries and the fleet's hourly rollup, in
        the caller's transaction, with one batched statement per table.

        `messages`: messages-table tuples (as `message_rows` makes them) of messages stored
        by this transaction, each once; `windows`: the window rows stored with them. Any
        order and any number per device: counters add, seq bounds widen, and a device's
        latest window is the one with the highest seq. With several listeners on one
        PostgreSQL store, call it last before the commit: every listener updates the
        current hour's fleet_hourly row, so hold its lock briefly (rows are written in key
        order, so two batches never wait on each other in a cycle)."""
        self._write_deltas(cur, deltas_of(messages, windows))

    def _write_deltas(self, cur: Any, deltas: Deltas,
                      identities: dict[str, tuple[Any, ...]] | None = None) -> None:
        """`identities`: device -> its DEVICE_UPSERT row, written in the same statement as
        its summary; ingest has one for every device in `deltas` (the deltas are of the
        messages it stored, and each of them gave its device's row)."""
        if not deltas:
            return
        rows = []
        no_window = (None,) * len(_LATEST)
        no_counters = (0, 0, 0, 0)
        for d in sorted(set(deltas.messages) | set(deltas.counters)):
            n, lo, hi = deltas.messages.get(d, (0, None, None))
            c = deltas.counters.get(d, no_counters)
            w = deltas.latest.get(d)
            latest = no_window if w is None else (w["seq"], *_latest_values(w))
            summary = (min(n, MAX_INT), lo, hi, min(c[0], MAX_INT), min(c[1], MAX_INT),
                       min(c[2], MAX_INT), min(c[3], MAX_INT), *latest)
            rows.append((*identities[d], *summary) if identities is not None
                        else (d, *summary))
        cur.executemany(_DEVICE_SUMMARY_UPSERT if identities is None else _DEVICE_INGEST_UPSERT,
                        rows)
        cur.executemany(_FLEET_UPSERT, [(*key, *(clamp_counters(acc)[f] for f in FLEET_FIELDS))
                                        for key, acc in sorted(deltas.fleet.items())])

    def retained_below(self, device_ids: Sequence[str]) -> dict[str, int]:
        """Per device, the highest seq retention has deleted (0: none). A message at or
        below it must count as a duplicate: its row may be gone, but the seq was stored
        (the batch ingest checks this; a device absent from the store is absent here)."""
        out: dict[str, int] = {}
        ids = list(dict.fromkeys(device_ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            out.update((r["device_id"], int(r["retained_seq"])) for r in self._rows(
                "SELECT device_id, retained_seq FROM devices WHERE device_id IN"
                f" ({', '.join('?' * len(chunk))})", chunk))
        return out

    def apply_retention(self, keep_raw_s: float, now: float | None = None,
                        chunk: int = RETENTION_CHUNK) -> dict[str, Any]:
        """Delete messages received more than `keep_raw_s` ago, and their windows, after
        folding each window into windows_hourly (per device, model version and hour of its
        end time). Each device's messages go in seq order, up to its first one received
        since the cutoff: a late arrival (a seq resent from a spool) holds back the seqs
        above it until it is due too, so that no ingest pays for an index on received_at
        and everything at or below a device's retained_seq is gone. Device by device,
        about `chunk` messages per transaction,
        so that a listener writing to the store never waits long; each transaction's
        rollup, deletes and the devices' retained_seq commit together. The device
        summaries and fleet_hourly are cumulative and keep counting what was deleted.
        Returns counts."""
        if not math.isfinite(keep_raw_s) or keep_raw_s < 0:
            raise ValueError(f"keep_raw_s must be a non-negative number, not {keep_raw_s!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, not {chunk!r}")
        cutoff = (time.time() if now is None else now) - keep_raw_s
        done = {"cutoff": cutoff, "messages": 0, "windows": 0, "rollup_upserts": 0,
                "chunks": 0, "longest_chunk_s": 0.0}
        devices = [r["device_id"] for r in self._rows(
            "SELECT device_id FROM devices ORDER BY device_id")]
        i = 0
        while i < len(devices):
            started = time.perf_counter()
            with self._transaction() as cur:
                rows: list[tuple] = []
                after = -1  # the device's seqs taken so far in this chunk end here
                while i < len(devices) and len(rows) < chunk:
                    # in pages: a device's first message not yet due ends its part, so do
                    # not read much past it
                    want = min(chunk - len(rows), RETENTION_PAGE)
                    cur.execute(RETENTION_SELECT, (devices[i], after, want))
                    got = cur.fetchall()
                    due = next((n for n, r in enumerate(got) if r[2] >= cutoff), len(got))
                    rows += got[:due]
                    if due < want:  # this device has nothing more that is due
                        i, after = i + 1, -1
                    else:
                        after = got[-1][1]
                if not rows:
                    continue
                deleted = self._retire(cur, rows)
            done["messages"] += len(rows)
            done["windows"] += deleted[0]
            done["rollup_upserts"] += deleted[1]
            done["chunks"] += 1
            done["longest_chunk_s"] = max(done["longest_chunk_s"],
                                          time.perf_counter() - started)
        return done

    def _retire(self, cur: Any, rows: list[tuple]) -> tuple[int, int]:
        """Fold the windows among `rows` (RETENTION_SELECT's) into windows_hourly, delete
        them and their messages, and raise the devices' retained_seq. Returns (windows,
        rollup rows written)."""
        hourly: dict[tuple[str, str, str, float], dict[str, Any]] = {}
        top: dict[str, int] = {}
        windows = []
        for device, seq, received_at, wseq, *values in rows:
            top[device] = max(top.get(device, 0), seq)
            if wseq is None:
                continue
            w = dict(zip(RETENTION_WINDOW_COLUMNS, values, strict=True), device_id=device,
                     seq=seq)
            windows.append((device, seq))
            key = (device, w["model"] or "", w["model_version"] or "",
                   hour_of(window_time(w, received_at)))
            acc = hourly.get(key)
            if acc is None:
                acc = hourly[key] = empty_rollup(DEVICE_FIELDS)
            add_window(acc, w)
        cur.executemany(_DEVICE_HOURLY_UPSERT, [
            (*key, *(clamp_counters(acc)[f] for f in DEVICE_FIELDS))
            for key, acc in sorted(hourly.items())])
        cur.executemany("DELETE FROM windows WHERE device_id = ? AND seq = ?", sorted(windows))
        cur.executemany("DELETE FROM messages WHERE device_id = ? AND seq = ?",
                        sorted((r[0], r[1]) for r in rows))
        cur.executemany("UPDATE devices SET retained_seq = ? WHERE device_id = ? AND"
                        " retained_seq < ?", [(seq, d, seq) for d, seq in sorted(top.items())])
        return len(windows), len(hourly)

    def _touch_device(self, cur: Any, device: Sequence[Any]) -> None:
        cur.execute(DEVICE_UPSERT, device)

    def set_status(self, msg: dict[str, Any]) -> None:
        now = time.time()
        try:
            body = msg.get("body") or {}
            device = device_row(msg, now)
            state = bindable((body.get("state"), body.get("reason"),
                              (msg.get("time") or {}).get("wall"), msg["device_id"]))
        except MessageRejected:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise MessageRejected(f"cannot build the status row: {type(exc).__name__}: "
                                  f"{exc}") from exc
        with self._transaction() as cur:
            self._touch_device(cur, device)
            cur.execute("UPDATE devices SET state = ?, state_reason = ?, state_at = ?"
                        " WHERE device_id = ?", state)

    def dead_letter(self, topic: str, device_id: str | None, reason: str, payload: bytes,
                    received_at: float | None = None) -> None:
        """Keep a message that cannot be stored for what it contains, and why; only its
        first DEAD_LETTER_PREFIX_BYTES bytes, every text made safe for a column."""
        prefix = payload[:DEAD_LETTER_PREFIX_BYTES].decode("utf-8", "backslashreplace")
        values = (received_at or time.time(), _safe_text(topic),
                  None if device_id is None else _safe_text(device_id)[:200],
                  _safe_text(reason), len(payload), _safe_text(prefix, 4 * len(prefix)))
        with self._transaction() as cur:
            cur.execute("INSERT INTO dead_letters (received_at, topic, device_id, reason,"
                        " payload_bytes, payload_prefix) VALUES (?, ?, ?, ?, ?, ?)", values)
            cur.execute("DELETE FROM dead_letters WHERE received_at < (SELECT received_at FROM"
                        " dead_letters ORDER BY received_at DESC LIMIT 1 OFFSET ?)",
                        (DEAD_LETTERS_KEPT - 1,))

    def save_listener_stats(self, listener_id: str, stats: dict[str, Any]) -> None:
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO listener_stats (listener_id, received, stored, duplicates, rejected,"
                " store_errors, connects, started_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (listener_id) DO UPDATE SET received = excluded.received,"
                " stored = excluded.stored, duplicates = excluded.duplicates,"
                " rejected = excluded.rejected, store_errors = excluded.store_errors,"
                " connects = excluded.connects, updated_at = excluded.updated_at",
                (listener_id, stats["received"], stats["stored"], stats["duplicates"],
                 stats["rejected"], stats.get("store_errors", 0), stats.get("connects", 0),
                 stats["started_at"], time.time()))

    def record_command_result(self, trigger_id: str, rc: int, output: str) -> None:
        """How the command a fired trigger ran ended."""
        with self._transaction() as cur:
            cur.execute("UPDATE triggers SET command_rc = ?, command_output = ? WHERE id = ?",
                        (rc, output, trigger_id))

    # reads, for the report and the tests --------------------------------------------------
    def devices(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM devices ORDER BY device_id")

    def message_seqs(self, device_id: str) -> list[int]:
        return [r["seq"] for r in self._rows(
            "SELECT seq FROM messages WHERE device_id = ? ORDER BY seq", (device_id,))]

    def recent_windows(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        """The device's latest `limit` windows, newest first."""
        return self._rows("SELECT * FROM windows WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
                          (device_id, limit))

    def versions(self) -> list[dict[str, Any]]:
        """Per model version: the devices on it now (their latest message), and over all
        history, what retention deleted included (fleet_hourly): windows, inferences,
        errors, mean p95 and mean drift score."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for r in self._rows(
                "SELECT model, model_version, SUM(windows) AS windows, SUM(inferences) AS"
                " inferences, SUM(errors) AS errors, SUM(p95_sum) AS p95_sum, SUM(p95_n) AS"
                " p95_n, SUM(drift_sum) AS drift_sum, SUM(drift_n) AS drift_n FROM"
                " fleet_hourly GROUP BY model, model_version"):
            out[(r["model"], r["model_version"])] = {
                "devices": 0, "windows": int(r["windows"]), "inferences": int(r["inferences"]),
                "errors": int(r["errors"]),
                "mean_p95_ms": _ratio(r["p95_sum"], r["p95_n"]),
                "mean_drift_score": _ratio(r["drift_sum"], r["drift_n"])}
        for r in self._rows("SELECT model, model_version, COUNT(*) AS devices FROM devices"
                            " GROUP BY model, model_version"):
            key = (r["model"] or "", r["model_version"] or "")
            entry = out.setdefault(key, {"devices": 0, "windows": 0, "inferences": 0,
                                         "errors": 0, "mean_p95_ms": None,
                                         "mean_drift_score": None})
            entry["devices"] += int(r["devices"])
        return [{"model": m or None, "model_version": v or None, **e}
                for (m, v), e in sorted(out.items())]

    def latest_hour(self) -> float | None:
        """The newest hour the fleet rollup has a window in."""
        v = self._rows("SELECT MAX(hour_start) AS h FROM fleet_hourly")[0]["h"]
        return None if v is None else float(v)

    def fleet_trend(self, since: float, until: float) -> list[dict[str, Any]]:
        """Per hour in [since, until], all versions together: windows, inferences, errors,
        mean p50 and p95, max p95 and p99, mean and max drift score."""
        rows = self._rows(FLEET_TREND, (since, until))
        return [{"hour_start": float(r["hour_start"]), "windows": int(r["windows"]),
                 "inferences": int(r["inferences"]), "errors": int(r["errors"]),
                 "mean_p50_ms": _ratio(r["p50_sum"], r["p50_n"]),
                 "mean_p95_ms": _ratio(r["p95_sum"], r["p95_n"]),
                 "max_p95_ms": r["p95_max"], "max_p99_ms": r["p99_max"],
                 "mean_drift_score": _ratio(r["drift_sum"], r["drift_n"]),
                 "max_drift_score": r["drift_max"]} for r in rows]

    def device_series(self, device_id: str, since: float,
                      limit: int = 5000) -> list[dict[str, Any]]:
        """One device's p95 and drift score over time from `since`: its hourly rollups
        (what retention deleted: hourly means) then its raw windows, at most `limit` points
        each, oldest first."""
        hourly = self._rows(DEVICE_HOURLY, (device_id, since, limit))
        raw = self._rows(DEVICE_WINDOWS, (device_id, since, limit))
        return ([{"t": float(r["t"]), "p95_ms": _ratio(r["p95_sum"], r["p95_n"]),
                  "drift_score": _ratio(r["drift_sum"], r["drift_n"]), "hourly": True}
                 for r in hourly]
                + [{**r, "hourly": False} for r in raw])

    def gap_ranges(self, device_id: str, after_seq: int = 0,
                   limit: int = 10) -> list[list[int]]:
        """Up to `limit` ranges of sequence numbers above `after_seq` never received."""
        rows = self._rows(GAP_RANGES, (after_seq, device_id, after_seq, limit))
        return [[int(r["lo"]), int(r["hi"])] for r in rows]

    def breaching(self) -> dict[str, list[str]]:
        """Per device, the rules whose condition it currently meets."""
        out: dict[str, list[str]] = {}
        for r in self._rows("SELECT device_id, rule FROM rule_state WHERE breaching = 1"
                            " ORDER BY device_id, rule"):
            out.setdefault(r["device_id"], []).append(r["rule"])
        return out

    def triggers(self) -> list[dict[str, Any]]:
        """Every trigger, oldest first, with its devices and detail decoded."""
        rows = self._rows(
            "SELECT id, rule, scope, fired_at, cleared_at, devices, detail, command, command_rc"
            " FROM triggers ORDER BY fired_at")
        for t in rows:
            t["devices"] = json.loads(t["devices"] or "[]")
            t["detail"] = json.loads(t["detail"] or "{}")
        return rows

    def fleet_gauges(self) -> dict[str, Any]:
        """Devices per last reported state and the active triggers, for /metrics."""
        rows = self._rows("SELECT COALESCE(state, 'unknown') AS state, COUNT(*) AS n"
                          " FROM devices GROUP BY COALESCE(state, 'unknown')")
        active = self._rows("SELECT COUNT(*) AS n FROM triggers WHERE active_key IS NOT NULL")
        return {"devices": {r["state"]: int(r["n"]) for r in rows},
                "active_triggers": int(active[0]["n"])}

    def listener_stats(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM listener_stats ORDER BY listener_id")

    def dead_letters(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` dead letters, newest first."""
        return self._rows("SELECT * FROM dead_letters ORDER BY received_at DESC LIMIT ?",
                          (limit,))

    def dead_letter_count(self) -> int:
        return int(self._rows("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"])

    def capture_rows(self, since: float = 0.0) -> list[dict[str, Any]]:
        """The capture messages received at or after `since` (the listener's clock), in
        device then seq order, for `toolchain dataset export` (their samples are files in
        the data dir). An offline read: it scans the messages table."""
        return self._rows("SELECT device_id, seq, model, model_version, received_at FROM"
                          " messages WHERE kind = 'capture' AND received_at >= ?"
                          " ORDER BY device_id, seq", (since,))

    def counts(self) -> dict[str, int]:
        """How many messages and windows are stored."""
        row = self._rows("SELECT (SELECT COUNT(*) FROM messages) AS messages,"
                         " (SELECT COUNT(*) FROM windows) AS windows")[0]
        return {k: int(v) for k, v in row.items()}


class _Cursor:
    """A DB-API cursor that takes `?` placeholders on every backend."""

    def __init__(self, cur: Any, sql: Any) -> None:
        self._cur, self._sqlf = cur, sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cur.execute(self._sqlf(sql), tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:  # both drivers take any sequence of rows: no copy
            self._cur.executemany(self._sqlf(sql), rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cur, name)


class SqliteStore(Store):
    def __init__(self, url: str, path: Path) -> None:
        super().__init__()
        self.url = url
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # WAL: readers (`toolchain fleet`) do not block the listener; busy_timeout lets
            # two listener processes share one file.
            # isolation_level=None: transactions are begun here (_begin), never implicitly.
            # sqlite3's implicit BEGIN comes only before an INSERT/UPDATE/DELETE, so a batch
            # that opened with a SAVEPOINT ran outside a transaction: its RELEASE committed
            # the messages rows on their own, ahead of the windows stored with them.
            self.conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False,
                                        isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            # WAL mode syncs at checkpoints only: checkpoint every ~40 MB instead of every
            # 4 MB, which halved the cost of a stored window here (the listener's batches
            # write a few MB a second)
            self.conn.execute("PRAGMA wal_autocheckpoint=10000")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite store {path}: {exc}") from exc

    def _begin(self, cur: Any, write: bool) -> None:
        # IMMEDIATE takes the write lock first (waiting up to the busy timeout), so that two
        # listeners on one file never meet as readers that both want to write: a deferred
        # transaction would fail to upgrade instead of waiting. Reads take a snapshot.
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")


class PostgresStore(Store):
    placeholder = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        try:
            import psycopg
        except ImportError as exc:
            raise StoreError("a postgresql:// store needs psycopg: pip install "
                             "'edgepack[fleet]'") from exc
        self.driver_errors = (psycopg.Error,)
        try:
            self.conn = psycopg.connect(url, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {redact(url)}: {exc}") from exc

    def _stream(self, sql: str) -> Iterator[list[tuple]]:
        # a server-side cursor: psycopg's plain one would fetch the whole result at once
        with self.conn.cursor(name=f"edgepack_{uuid.uuid4().hex[:8]}") as cur:
            cur.execute(sql)
            while rows := cur.fetchmany(BACKFILL_CHUNK):
                yield rows


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def open_store(url: str, *, init: bool = True) -> Store:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db`, a plain path, or
    `postgresql://user[:pass]@host[:port]/db`."""
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres"):
        store: Store = PostgresStore(url)
    elif parts.scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise UsageError(f"store {url!r}: use sqlite:///relative/path.db or "
                             "sqlite:////absolute/path.db")
        store = SqliteStore(url, Path(path))
    elif not parts.scheme:
        store = SqliteStore(f"sqlite:///{url}", Path(url))
    else:
        raise UsageError(f"store {url!r}: use sqlite:///PATH or postgresql://... "
                         f"(scheme {parts.scheme!r} is not supported)")
    if init:
        store.init_schema()
    return store


def _ratio(total: Any, n: Any) -> float | None:
    return float(total) / float(n) if n else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _int(v: Any) -> int:
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{v!r:.60} is not a whole number")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def message_rows(msg: dict[str, Any], received_at: float, text: str | None = None,
                 fields: dict[str, Any] | None = None) -> tuple[
        tuple[Any, ...], tuple[Any, ...], dict[str, Any] | None]:
    """A spooled message -> its messages row, its devices row and (a window) its windows
    row. `text` and `fields` come from runtime.protocol.validate_fields: the payload as
    received, stored as it is (strict JSON: valid UTF-8, no NUL), and the values it checked,
    so the listener's path neither looks them up nor checks them again. Without them the
    message is serialized and every value checked. Raises MessageRejected for anything a
    column cannot hold, before any SQL runs: a message's content must never look like the
    database failing."""
    if text is not None and fields is not None:
        return _validated_rows(msg, received_at, text, fields)
    try:
        b = msg.get("bundle") or {}
        if text is None:
            text = json.dumps(msg, separators=(",", ":"), allow_nan=False)
        message = bindable((msg["device_id"], msg["seq"], msg["kind"], b.get("sha256"),
                            b.get("model"), b.get("version"),
                            (msg.get("time") or {}).get("wall"), received_at, text))
        row = window_row(msg) if msg["kind"] == "window" else None
        if row is not None:
            bindable(tuple(row.values()))
        return message, device_row(msg, received_at), row
    except MessageRejected:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
            RecursionError) as exc:
        raise MessageRejected(f"cannot build the stored rows: {type(exc).__name__}: "
                              f"{exc}") from exc


def device_row(msg: dict[str, Any], received_at: float) -> tuple[Any, ...]:
    b = msg.get("bundle") or {}
    period = None
    if msg.get("kind") == "window":
        period = _num(((msg.get("body") or {}).get("window") or {}).get("period_s"))
    return bindable((msg["device_id"], received_at, b.get("sha256"), b.get("model"),
                     b.get("version"), b.get("profile"), b.get("backend"), period))


def _validated_rows(msg: dict[str, Any], received_at: float, text: str,
                    f: dict[str, Any]) -> tuple[tuple[Any, ...], tuple[Any, ...],
                                                dict[str, Any] | None]:
    """message_rows for a message validate_fields passed: every value is already checked
    for its column, so they are only placed."""
    device, seq = msg["device_id"], msg["seq"]
    model, version, sha = f.get("bundle.model"), f.get("bundle.version"), f.get("bundle.sha256")
    profile = f.get("bundle.profile")
    message = (device, seq, msg["kind"], sha, model, version, f.get("time.wall"), received_at,
               text)
    devrow = (device, received_at, sha, model, version, profile, f.get("bundle.backend"),
              f.get("window.period_s"))
    if msg["kind"] != "window":
        return message, devrow, None
    row = dict(zip(WINDOW_COLUMNS, (device, seq, model, version, sha, profile,
                                    *map(f.get, _WINDOW_PATHS)), strict=True))
    for column in _ZERO_IF_ABSENT:
        if row[column] is None:
            row[column] = 0
    return message, devrow, row


# windows columns from validate_fields' paths (body fields), in WINDOW_COLUMNS order
_WINDOW_FIELDS = (
    ("start_wall", "window.start_wall", None), ("end_wall", "window.end_wall", None),
    ("count", "count", 0), ("errors", "errors", 0), ("error_rate", "error_rate", None),
    ("p50_ms", "latency_ms.p50", None), ("p95_ms", "latency_ms.p95", None),
    ("p99_ms", "latency_ms.p99", None), ("throughput", "throughput_per_s", None),
    ("budget_p95_ms", "budgets.p95_latency_ms", None), ("drift_score", "drift.score", None),
    ("input_psi", "drift.input_psi", None), ("class_psi", "drift.class_psi", None),
    ("confidence_psi", "drift.confidence_psi", None),
    ("input_ks_p", "drift.input_ks_min_p", None),
    ("confidence_ks_p", "drift.confidence_ks.p_value", None),
    ("spool_dropped", "spool.dropped_since_last", 0),
    ("confidence_mean", "output.confidence_mean", None),
    # a window without the feedback section had no labels in it
    ("feedback_count", "feedback.count", 0), ("feedback_correct", "feedback.correct", 0),
    ("accuracy", "feedback.accuracy", None),
    ("shadow_sha256", "shadow.candidate.sha256", None),
    ("shadow_version", "shadow.candidate.version", None),
    ("shadow_count", "shadow.count", None), ("shadow_agreement", "shadow.agreement", None),
    ("shadow_p50_ms", "shadow.latency_ms.p50", None),
    ("shadow_p95_ms", "shadow.latency_ms.p95", None),
    ("shadow_confidence_mean", "shadow.confidence_mean", None),
    ("shadow_errors", "shadow.errors", None),
    ("shadow_feedback_count", "shadow.feedback.count", None),
    ("shadow_accuracy", "shadow.feedback.accuracy", None),
    ("shadow_served_accuracy", "shadow.feedback.served_accuracy", None),
)
_WINDOW_PATHS = tuple(path for _, path, _ in _WINDOW_FIELDS)
_ZERO_IF_ABSENT = tuple(column for column, _, default in _WINDOW_FIELDS if default == 0)
assert WINDOW_COLUMNS == ("device_id", "seq", "model", "model_version", "bundle_sha256",
                          "profile", *(column for column, _, _ in _WINDOW_FIELDS))


def bindable(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """`values` if SQLite and PostgreSQL both take each one as a parameter, else
    MessageRejected: NULL, text without NUL or lone surrogates, a 64-bit integer, a finite
    double."""
    for v in values:
        ok = (v is None or (isinstance(v, str) and storable_text(v))
              or (isinstance(v, int) and not isinstance(v, bool) and -MAX_INT - 1 <= v <= MAX_INT)
              or (isinstance(v, float) and math.isfinite(v)))
        if not ok:
            raise MessageRejected(f"a column cannot hold {type(v).__name__} {v!r:.60}")
    return values


def _safe_text(text: str, cap: int = DEAD_LETTER_TEXT) -> str:
    """Sender-controlled text for a dead letter: capped, control characters escaped (it ends
    up on a terminal), no NUL or lone surrogates (a column would refuse it)."""
    text = text[:cap].encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def window_row(msg: dict[str, Any]) -> dict[str, Any]:
    """The columns a rule or a report needs, pulled out of a window message."""
    b, body = msg.get("bundle") or {}, msg.get("body") or {}
    lat, d = body.get("latency_ms") or {}, body.get("drift") or {}
    w, budgets = body.get("window") or {}, body.get("budgets") or {}
    ks = d.get("confidence_ks") or {}
    fb, sh = body.get("feedback") or {}, body.get("shadow") or {}
    cand, sh_lat, sh_fb = sh.get("candidate") or {}, sh.get("latency_ms") or {}, sh.get(
        "feedback") or {}
    return {
        "device_id": msg["device_id"], "seq": _int(msg["seq"]),
        "model": b.get("model"), "model_version": b.get("version"),
        "bundle_sha256": b.get("sha256"), "profile": b.get("profile"),
        "start_wall": _num(w.get("start_wall")), "end_wall": _num(w.get("end_wall")),
        "count": _int(body.get("count")), "errors": _int(body.get("errors")),
        "error_rate": _num(body.get("error_rate")),
        "p50_ms": _num(lat.get("p50")), "p95_ms": _num(lat.get("p95")),
        "p99_ms": _num(lat.get("p99")), "throughput": _num(body.get("throughput_per_s")),
        "budget_p95_ms": _num(budgets.get("p95_latency_ms")),
        "drift_score": _num(d.get("score")), "input_psi": _num(d.get("input_psi")),
        "class_psi": _num(d.get("class_psi")), "confidence_psi": _num(d.get("confidence_psi")),
        "input_ks_p": _num(d.get("input_ks_min_p")), "confidence_ks_p": _num(ks.get("p_value")),
        "spool_dropped": _int((body.get("spool") or {}).get("dropped_since_last")),
        "confidence_mean": _num((body.get("output") or {}).get("confidence_mean")),
        "feedback_count": _int(fb.get("count")), "feedback_correct": _int(fb.get("correct")),
        "accuracy": _num(fb.get("accuracy")),
        "shadow_sha256": cand.get("sha256"), "shadow_version": cand.get("version"),
        "shadow_count": _opt_int(sh.get("count")), "shadow_agreement": _num(sh.get("agreement")),
        "shadow_p50_ms": _num(sh_lat.get("p50")), "shadow_p95_ms": _num(sh_lat.get("p95")),
        "shadow_confidence_mean": _num(sh.get("confidence_mean")),
        "shadow_errors": _opt_int(sh.get("errors")),
        "shadow_feedback_count": _opt_int(sh_fb.get("count")),
        "shadow_accuracy": _num(sh_fb.get("accuracy")),
        "shadow_served_accuracy": _num(sh_fb.get("served_accuracy")),
    }
