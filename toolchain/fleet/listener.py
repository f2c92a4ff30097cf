"""The cloud listener: consumes the fleet's telemetry from the broker, stores it once per
(device, seq), applies the rules and fires triggers.

Group commit: messages accumulate for up to `batch_max` messages or `batch_ms` milliseconds
(or until the broker has nothing more to send), are stored in one transaction with batched
statements, and only then acknowledged to the broker, all PUBACKs in one write. A listener
that dies mid-batch gets the whole batch redelivered, and the store's (device, seq) key makes
the redelivery harmless. The rules keep their per-device streaks in memory between batches
(store.RuleCache), so a window costs no query unless this listener missed part of its
device's history.

Several listener processes share one fleet through an MQTT 5 shared subscription
(`$share/<group>/...`): the broker hands each message to one of them. Without a group a
listener subscribes plainly and takes every message. Mosquitto 2.0.11 restores plain
subscriptions of persistent sessions after a restart but not shared ones (seen here); the
devices' delivery acknowledgements close that hole (see runtime.telemetry).

A message that cannot be stored for what it contains (validation refuses it, or building its
rows fails) goes to the store's dead letters and is acknowledged: only the store failing
(StoreError) leaves a batch unacknowledged, so one bad message never stops the fleet. Topics
and message validation are runtime.protocol's; SQL is the store's; the MQTT connection is
toolchain.fleet.subscriber's (written for this throughput; the devices use paho).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime import protocol
from runtime.mqtt import BrokerConfig
from runtime.protocol import MessageRejected
from toolchain.fleet.acks import AckBatch
from toolchain.fleet.capture_store import (
    CaptureRejected,
    CaptureStore,
    CaptureWriteError,
)
from toolchain.fleet.rules import Rule, Transition
from toolchain.fleet.store import BatchResult, Incoming, RuleCache, Store, StoreError
from toolchain.fleet.subscriber import Message, Subscriber

log = logging.getLogger("edgepack.listener")

COMMAND_TIMEOUT_S = 6 * 3600
CAPTURE_WRITE_TRIES = 3  # deliveries of one capture the data dir may fail before it is given up


@dataclass
class ListenerOptions:
    broker: BrokerConfig
    prefix: str = protocol.DEFAULT_PREFIX
    group: str | None = None  # a shared-subscription group, or None for a plain subscription
    listener_id: str = ""
    stats_every_s: float = 10.0
    batch_max: int = 1000  # messages in one transaction at most
    batch_ms: float = 50.0  # how long the first message of a batch waits at most
    idle_ms: float = 2.0  # a batch is committed as soon as the broker pauses this long
    device_acks: bool = True  # publish "stored" acks to the devices (runtime.telemetry)
    sweep_every_s: float = 5.0  # how often the silence/offline rules look at every device
    data_dir: Path | None = None  # captured inputs go here; None: capture messages refused
    data_max_bytes: int = 1024 * 2**20  # the cap on the .npz bytes in data_dir

    def __post_init__(self) -> None:
        if not self.listener_id:
            self.listener_id = f"{socket.gethostname()}-{os.getpid()}"
        if self.batch_max < 1 or self.batch_ms < 0 or self.idle_ms < 0:
            raise ValueError("a batch needs batch_max >= 1 and batch_ms, idle_ms >= 0")


@dataclass
class _Staged:
    """A batch between validation and its commit."""

    batch: list[Message]
    received_at: float
    incoming: list[tuple[Message, Incoming]] = field(default_factory=list)
    statuses: list[tuple[Message, dict[str, Any]]] = field(default_factory=list)
    rejected: list[tuple[Message, Exception]] = field(default_factory=list)
    prepared: Any = None  # Store.prepare_batch's rows, None if that failed
    failed: StoreError | None = None  # the data dir refused a capture: redelivered whole
    acks: AckBatch = field(default_factory=AckBatch)  # dead letters, one-by-one stores


class Listener:
    def __init__(self, opts: ListenerOptions, store: Store, rules: tuple[Rule, ...],
                 on_transition: Callable[[Transition], None] | None = None,
                 on_subscribed: Callable[[bool], None] | None = None) -> None:
        self.opts = opts
        self.on_subscribed = on_subscribed
        self.store = store
        self.rules = rules
        self.cache = RuleCache(rules)
        self.on_transition = on_transition
        # rejected: messages that went to the dead letters
        self.stats = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0,
                      "store_errors": 0, "connects": 0, "batches": 0,
                      "triggers_fired": 0, "triggers_cleared": 0, "started_at": time.time()}
        self._commands: list[threading.Thread] = []
        # the batch whose commit runs on the committer thread: (future, staged, result,
        # packet ids, the connection count it was received on)
        self._pending: tuple[Future[None], _Staged, BatchResult | None, list[int], int] | None
        self._pending = None
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="edgepack-commit")
        self._capture_tries: dict[tuple[str, int], int] = {}  # (device, seq) -> failed writes
        self.captures = (CaptureStore(opts.data_dir, opts.data_max_bytes)
                         if opts.data_dir is not None else None)
        if self.captures is not None:
            self.stats.update(self.captures.stats)
        self.conn = Subscriber(opts.broker, f"edgepack-listener-{opts.listener_id}",
                               self.topics(), on_connect=self._connected)

    def topics(self) -> list[str]:
        return protocol.listener_topics(self.opts.prefix, self.opts.group)

    def _connected(self, session_present: bool) -> None:
        self.stats["connects"] += 1
        if self.on_subscribed:
            self.on_subscribed(session_present)

    def handle(self, topic: str, payload: bytes) -> tuple[str, int] | None:
        """Store one message, or put it in the dead letters (a batch of one). Raises
        StoreError only: the caller acknowledges the message unless it does. Returns
        (device, seq) when the store now holds the spooled record (stored, or a duplicate),
        for the device's delivery ack."""
        acks = AckBatch()
        self.process([Message(topic, payload, 0)], acks)
        held = acks.items()
        return held[0] if held else None

    def process(self, batch: list[Message], acks: AckBatch | None = None) -> list[int]:
        """Store a batch; returns the packet ids to acknowledge to the broker (all of the
        batch) and adds to `acks` the (device, seq) the store now holds, for the devices.
        Raises StoreError, and then nothing of the batch is stored or to be acknowledged."""
        staged = self._stage(batch)
        if staged.failed is not None:
            raise staged.failed
        self._apply_side_rows(staged)
        result = self._ingest(staged, commit=True)
        self._done(staged, result, acks if acks is not None else AckBatch())
        return [m.packet_id for m in batch if m.packet_id]

    def _stage(self, batch: list[Message]) -> _Staged:
        """Validate a batch and build its rows: no store involved, so that it runs while
        the previous batch commits."""
        self.stats["received"] += len(batch)
        staged = _Staged(batch, time.time())
        for m in batch:
            try:
                kind, msg, fields = protocol.validate_fields(m.topic, m.payload,
                                                             self.opts.prefix)
                if kind == "status":
                    staged.statuses.append((m, msg))
                    continue
                if kind == "capture":  # rare and large: its own path, the windows' untouched
                    staged.incoming.append((m, self._capture(m, msg, fields)))
                    continue
                staged.incoming.append((m, Incoming(msg, m.payload.decode("utf-8"), fields)))
            except CaptureWriteError as exc:
                # the data dir failed: the whole batch comes back, a few times; then the
                # capture alone is given up (a full or read-only disk must not hold up the
                # fleet's windows, results and alarms behind it)
                key = (msg["device_id"], msg["seq"])
                tries = self._capture_tries.pop(key, 0) + 1
                if tries < CAPTURE_WRITE_TRIES:
                    if len(self._capture_tries) > 10_000:
                        self._capture_tries.clear()
                    self._capture_tries[key] = tries
                    staged.failed = exc
                else:
                    staged.rejected.append((m, CaptureRejected(
                        f"{exc} (given up after {tries} tries)", *key)))
            except Exception as exc:  # noqa: BLE001 - whatever this message sets off, it is its own
                staged.rejected.append((m, exc))
        if staged.incoming:
            try:
                staged.prepared = self.store.prepare_batch([i for _, i in staged.incoming],
                                                           staged.received_at)
            except Exception:  # noqa: BLE001 - a bug one message found: _ingest finds which
                log.exception("preparing a batch of %d failed", len(staged.incoming))
        return staged

    def _capture(self, m: Message, msg: dict[str, Any], fields: dict[str, Any]) -> Incoming:
        """A capture message's samples into the data dir; its messages row holds a
        descriptor of the file instead of the payload."""
        if self.captures is None:
            raise CaptureRejected(f"{m.topic}: capture seq {msg['seq']}: this listener keeps "
                                  "no captured data (start it with --data-dir)",
                                  msg["device_id"], msg["seq"])
        try:
            envelope, text = self.captures.take(m.topic, m.payload, msg, fields)
        finally:
            self.stats.update(self.captures.stats)
        return Incoming(envelope, text, fields)

    def _apply_side_rows(self, staged: _Staged) -> None:
        """Status messages and refused ones: each its own small transaction (rare)."""
        for m, msg in staged.statuses:
            try:
                self.store.set_status(msg)
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001
                self._dead_letter(m.topic, m.payload, exc, staged.acks)
        for m, exc in staged.rejected:
            self._dead_letter(m.topic, m.payload, exc, staged.acks)
        staged.statuses, staged.rejected = [], []

    def _ingest(self, staged: _Staged, commit: bool) -> BatchResult | None:
        """The batch into the store; with `commit=False` its transaction is left open for
        store.commit_open(). None when the batch had nothing to store in one transaction
        (then what it had is stored already, one message at a time)."""
        if not staged.incoming:
            return None
        if staged.prepared is not None:
            try:
                return self.store.ingest_prepared(staged.prepared, staged.received_at,
                                                  self.cache, commit=commit)
            except StoreError:
                raise
            except Exception:  # noqa: BLE001 - a bug one message found: find it, keep the rest
                log.exception("a batch of %d failed; storing its messages one by one",
                              len(staged.incoming))
        for m, item in staged.incoming:
            self._one(m, item, staged.received_at, staged.acks)
        staged.incoming = []
        return None

    def _one(self, m: Message, item: Incoming, received_at: float, acks: AckBatch) -> None:
        try:
            result = self.store.ingest_batch([item], received_at, self.cache)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._dead_letter(m.topic, m.payload, exc, acks)
            return
        self._count(result, [(m, item)], acks)

    def _done(self, staged: _Staged, result: BatchResult | None, acks: AckBatch) -> None:
        """After the batch's commit: dead letters, counts, device acks and triggers."""
        acks.merge(staged.acks)
        if result is not None:
            self._count(result, staged.incoming, acks)

    def _count(self, result: BatchResult, incoming: list[tuple[Message, Incoming]],
               acks: AckBatch) -> None:
        for index, exc in result.rejected:
            m = incoming[index][0]
            self._dead_letter(m.topic, m.payload, exc, acks)
        self.stats["stored"] += len(result.stored)
        self.stats["duplicates"] += len(result.duplicates)
        for device, seq in result.stored + result.duplicates:
            acks.add(device, seq)
        for t in result.transitions:
            try:
                self._act(t)
            except Exception:  # noqa: BLE001 - after the commit: it is stored
                log.exception("acting on trigger %s failed", t.trigger_id)

    def _dead_letter(self, topic: str, payload: bytes, exc: Exception,
                     acks: AckBatch) -> None:
        reason = str(exc) if isinstance(exc, MessageRejected) else (
            f"{topic}: {type(exc).__name__}: {exc}")
        if isinstance(exc, MessageRejected):
            log.warning("dead letter: %.300s", reason)
        else:  # not a refusal we wrote: a bug this message found, keep its traceback
            log.error("dead letter: %.300s", reason, exc_info=exc)
        device = _claimed_device(topic, self.opts.prefix)
        self.store.dead_letter(topic, device, reason, payload)
        self.stats["rejected"] += 1
        # Acknowledged to the device too when it carries a seq: a record the listener will
        # never take would otherwise come back from the device's spool after every timeout.
        # The device's spool writes seq last: a large message (a capture) has it at the end.
        seq = getattr(exc, "seq", None)
        if seq is None:
            found = (_SEQ.search(payload, 0, 4096)
                     or _SEQ.search(payload, max(0, len(payload) - 4096)))
            seq = None if found is None else int(found.group(1))
        if device is not None and seq is not None and protocol.DEVICE_ID.match(device):
            acks.add(device, seq)

    def _act(self, t: Transition) -> None:
        self.stats[f"triggers_{t.kind}"] += 1
        log.warning("trigger %s: %s on %s (%s)", t.kind, t.rule.name, t.scope,
                    ", ".join(t.devices) or "no devices")
        payload = protocol.trigger_message(t.kind, t.trigger_id, t.rule.name, t.scope,
                                           t.devices, t.detail, self.opts.listener_id)
        self.conn.publish(protocol.trigger_topic(self.opts.prefix), json.dumps(payload).encode())
        if self.on_transition:
            self.on_transition(t)
        if t.kind == "fired" and t.rule.command:
            thread = threading.Thread(target=self._run_command, args=(t, payload), daemon=True)
            thread.start()
            self._commands.append(thread)

    def _run_command(self, t: Transition, payload: dict[str, Any]) -> None:
        env = {**os.environ, "EDGEPACK_TRIGGER": json.dumps(payload),
               "EDGEPACK_TRIGGER_RULE": t.rule.name, "EDGEPACK_TRIGGER_SCOPE": t.scope,
               "EDGEPACK_TRIGGER_ID": t.trigger_id}
        try:
            proc = subprocess.run(list(t.rule.command or ()), capture_output=True, text=True,
                                  env=env, timeout=COMMAND_TIMEOUT_S)
            rc, output = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            rc, output = -1, f"{shlex.join(t.rule.command or ())}: {exc}"
        log.warning("trigger %s command exited %s", t.rule.name, rc)
        self.store.record_command_result(t.trigger_id, rc, output)

    def run(self, stop: threading.Event,
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Consume until `stop` is set; returns the final counts."""
        next_report = time.monotonic() + self.opts.stats_every_s
        next_sweep = time.monotonic() + self.opts.sweep_every_s
        batch: list[Message] = []
        first_at = 0.0
        batch_s, idle_s = self.opts.batch_ms / 1000, self.opts.idle_ms / 1000
        while not stop.is_set():
            if batch:
                wait = min(idle_s, max(0.0, first_at + batch_s - time.monotonic()))
            else:  # a batch being committed is acknowledged as soon as it is in
                wait = 0.2 if self._pending is None else 0.002
            got = self.conn.poll(wait, limit=self.opts.batch_max)
            if self._pending is not None and not batch and (
                    not got or self._pending[0].done()):
                self.settle()
            if got:
                if not batch:
                    first_at = time.monotonic()
                batch += got
            if batch and (not got or len(batch) >= self.opts.batch_max
                          or time.monotonic() - first_at >= batch_s):
                self._commit(batch)
                batch = []
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.opts.sweep_every_s
                self._sweep()
            if time.monotonic() >= next_report:
                next_report += self.opts.stats_every_s
                self._save_stats()
                if progress:
                    progress(dict(self.stats, connected=self.conn.connected,
                                  last_error=self.conn.last_error))
        if batch:
            self._commit(batch)
        self.settle()
        self._committer.shutdown()
        self.conn.disconnect()
        for thread in self._commands:
            thread.join()
        self._save_stats()
        return dict(self.stats)

    def _sweep(self) -> None:
        """The rules on device silence (rules.SWEEP_METRICS), over every device."""
        try:
            transitions = self.store.sweep(self.rules)
        except StoreError as exc:
            log.error("could not sweep the devices for silence: %s", exc)
            return
        for t in transitions:
            try:
                self._act(t)
            except Exception:  # noqa: BLE001 - the trigger is stored
                log.exception("acting on trigger %s failed", t.trigger_id)
        self.conn.flush()

    def _commit(self, batch: list[Message]) -> None:
        """Store a batch and acknowledge it once committed. Pipelined: this batch is
        validated while the previous one commits on the committer thread (the database
        writing a batch out holds no GIL), then the previous one is acknowledged, and this
        one's transaction is handed to the committer in turn."""
        staged = self._stage(batch)
        if not self.settle():
            return  # the previous batch failed to commit: this one comes back with it
        if staged.failed is not None:
            self._store_failed(len(batch), staged.failed)
            return
        connects = self.conn.connects
        try:
            self._apply_side_rows(staged)
            result = self._ingest(staged, commit=False)
        except StoreError as exc:
            self._store_failed(len(batch), exc)
            return
        ids = [m.packet_id for m in batch if m.packet_id]
        if self.store.transaction_open:
            future = self._committer.submit(self.store.commit_open)
        else:
            future = Future()
            future.set_result(None)
        self._pending = (future, staged, result, ids, connects)

    def settle(self) -> bool:
        """Wait for the batch being committed, then acknowledge it: PUBACKs to the broker
        and stored-acks to its devices, its dead letters, counts and triggers. False when
        its commit failed (the connection is dropped so that the broker redelivers)."""
        if self._pending is None:
            return True
        future, staged, result, ids, connects = self._pending
        self._pending = None
        try:
            future.result()
        except StoreError as exc:
            self.cache.forget()  # it decided over windows that are not stored
            self._store_failed(len(staged.batch), exc)
            return False
        acks = AckBatch()
        self._done(staged, result, acks)
        self.stats["batches"] += 1
        if self.conn.connects == connects:  # acks belong to the connection they came on
            self.conn.ack(ids)
        if self.opts.device_acks:  # stored: the devices may release these from their spools
            # QoS 0: a lost ack costs a resend from the device's spool, which is acked again,
            # and QoS 1 would double the broker's work (an ack per device and batch)
            for topic, payload in acks.messages(self.opts.prefix, self.opts.listener_id):
                self.conn.publish(topic, payload, qos=0)
        self.conn.flush()
        return True

    def _store_failed(self, n: int, exc: StoreError) -> None:
        # Not acknowledged: drop the connection, and the broker hands the batch back to
        # this listener's resumed session after the reconnect (with backoff).
        self.stats["store_errors"] += 1
        log.error("could not store a batch of %d (%s); reconnecting so the broker "
                  "redelivers it", n, exc)
        self.conn.drop(f"the store failed: {exc}")

    def _save_stats(self) -> None:
        try:
            self.store.save_listener_stats(self.opts.listener_id, self.stats)
        except StoreError as exc:  # the counts are kept here: the next save catches up
            log.error("could not save the listener's counts: %s", exc)


_SEQ = re.compile(rb'"seq"\s*:\s*(\d{1,18})[,}\s]')


def _claimed_device(topic: str, prefix: str) -> str | None:
    """The device level of a topic under `prefix`, as the sender wrote it (unchecked)."""
    parts, base = topic.split("/"), prefix.split("/")
    if len(parts) == len(base) + 2 and parts[:len(base)] == base:
        return parts[-2]
    return None
