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
from dataclasses import dataclass
from typing import Any

from runtime import protocol
from runtime.mqtt import BrokerConfig
from runtime.protocol import MessageRejected
from toolchain.fleet.acks import AckBatch
from toolchain.fleet.rules import Rule, Transition
from toolchain.fleet.store import BatchResult, Incoming, RuleCache, Store, StoreError
from toolchain.fleet.subscriber import Message, Subscriber

log = logging.getLogger("edgepack.listener")

COMMAND_TIMEOUT_S = 6 * 3600


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

    def __post_init__(self) -> None:
        if not self.listener_id:
            self.listener_id = f"{socket.gethostname()}-{os.getpid()}"
        if self.batch_max < 1 or self.batch_ms < 0 or self.idle_ms < 0:
            raise ValueError("a batch needs batch_max >= 1 and batch_ms, idle_ms >= 0")


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
        self._acks = AckBatch()
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
        self.stats["received"] += len(batch)
        self._acks = acks if acks is not None else AckBatch()
        incoming: list[tuple[Message, Incoming]] = []
        for m in batch:
            try:
                kind, msg, fields = protocol.validate_fields(m.topic, m.payload,
                                                             self.opts.prefix)
                if kind == "status":
                    self.store.set_status(msg)
                    continue
                incoming.append((m, Incoming(msg, m.payload.decode("utf-8"), fields)))
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever this message sets off, it is its own
                self._dead_letter(m.topic, m.payload, exc)
        if incoming:
            try:
                result = self.store.ingest_batch([i for _, i in incoming], time.time(),
                                                 self.cache)
            except StoreError:
                raise
            except Exception:  # noqa: BLE001 - a bug one message found: find it, keep the rest
                log.exception("a batch of %d failed; storing its messages one by one",
                              len(incoming))
                for m, item in incoming:
                    self._one(m, item)
            else:
                self._done(incoming, result)
        return [m.packet_id for m in batch if m.packet_id]

    def _one(self, m: Message, item: Incoming) -> None:
        try:
            result = self.store.ingest_batch([item], time.time(), self.cache)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._dead_letter(m.topic, m.payload, exc)
            return
        self._done([(m, item)], result)

    def _done(self, incoming: list[tuple[Message, Incoming]], result: BatchResult) -> None:
        for index, exc in result.rejected:
            m = incoming[index][0]
            self._dead_letter(m.topic, m.payload, exc)
        self.stats["stored"] += len(result.stored)
        self.stats["duplicates"] += len(result.duplicates)
        for device, seq in result.stored + result.duplicates:
            self._acks.add(device, seq)
        for t in result.transitions:
            try:
                self._act(t)
            except Exception:  # noqa: BLE001 - after the commit: it is stored
                log.exception("acting on trigger %s failed", t.trigger_id)

    def _dead_letter(self, topic: str, payload: bytes, exc: Exception) -> None:
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
        seq = _SEQ.search(payload, 0, 4096)
        if device is not None and seq is not None and protocol.DEVICE_ID.match(device):
            self._acks.add(device, int(seq.group(1)))

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
            wait = 0.2 if not batch else min(idle_s, max(0.0, first_at + batch_s
                                                         - time.monotonic()))
            got = self.conn.poll(wait, limit=self.opts.batch_max)
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
        connects = self.conn.connects
        acks = AckBatch()
        try:
            ids = self.process(batch, acks)
        except StoreError as exc:
            # Not acknowledged: drop the connection, and the broker hands the batch back to
            # this listener's resumed session after the reconnect (with backoff).
            self.stats["store_errors"] += 1
            log.error("could not store a batch of %d (%s); reconnecting so the broker "
                      "redelivers it", len(batch), exc)
            self.conn.drop(f"the store failed: {exc}")
            return
        self.stats["batches"] += 1
        if self.conn.connects == connects:  # acks belong to the connection they came on
            self.conn.ack(ids)
        if self.opts.device_acks:  # stored: the devices may release these from their spools
            # QoS 0: a lost ack costs a resend from the device's spool, which is acked again,
            # and QoS 1 would double the broker's work (an ack per device and batch)
            for topic, payload in acks.messages(self.opts.prefix, self.opts.listener_id):
                self.conn.publish(topic, payload, qos=0)
        self.conn.flush()

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
