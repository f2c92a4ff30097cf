"""The cloud listener: consumes the fleet's telemetry from the broker, stores it once per
(device, seq), applies the rules and fires triggers.

Several listener processes share one fleet through an MQTT 5 shared subscription
(`$share/<group>/...`): the broker hands each message to one of them. Without a group a
listener subscribes plainly and takes every message: Mosquitto 2.0.11 restores plain
subscriptions of persistent sessions after a restart but not shared ones (seen here), so a
shared-subscription listener misses what devices publish between a Mosquitto restart and
its own reconnect. Each message is
acknowledged to the broker only after its transaction committed (paho's manual ack), so a
listener that dies mid-message gets it redelivered, and the store's key makes the redelivery
harmless. A message that cannot be stored for what it contains (validation refuses it, or
building its rows fails) goes to the store's dead letters and is acknowledged: only the store
failing (StoreError) leaves a message unacknowledged, so one bad message never stops the
fleet. Topics and message validation are runtime.protocol's; SQL is the store's.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runtime import protocol
from runtime.mqtt import BrokerConfig, Connection
from runtime.protocol import MessageRejected
from toolchain.fleet.acks import AckBatch
from toolchain.fleet.rules import Rule, Transition
from toolchain.fleet.store import Store, StoreError

log = logging.getLogger("edgepack.listener")

COMMAND_TIMEOUT_S = 6 * 3600


@dataclass
class ListenerOptions:
    broker: BrokerConfig
    prefix: str = protocol.DEFAULT_PREFIX
    group: str | None = None  # a shared-subscription group, or None for a plain subscription
    listener_id: str = ""
    stats_every_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.listener_id:
            self.listener_id = f"{socket.gethostname()}-{os.getpid()}"


class Listener:
    def __init__(self, opts: ListenerOptions, store: Store, rules: tuple[Rule, ...],
                 on_transition: Callable[[Transition], None] | None = None,
                 on_subscribed: Callable[[bool], None] | None = None) -> None:
        self.opts = opts
        self.on_subscribed = on_subscribed
        self.store = store
        self.rules = rules
        self.on_transition = on_transition
        # rejected: messages that went to the dead letters
        self.stats = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0,
                      "store_errors": 0, "connects": 0,
                      "triggers_fired": 0, "triggers_cleared": 0, "started_at": time.time()}
        self._commands: list[threading.Thread] = []
        self.conn = Connection(opts.broker, f"edgepack-listener-{opts.listener_id}",
                               on_connect=self._connected, on_message=self._message,
                               manual_ack=True, max_inflight=100)

    def topics(self) -> list[str]:
        return protocol.listener_topics(self.opts.prefix, self.opts.group)

    def _connected(self, session_present: bool) -> None:
        self.stats["connects"] += 1
        self.conn.subscribe(self.topics())
        if self.on_subscribed:
            self.on_subscribed(session_present)

    def _message(self, message: Any) -> None:
        self.stats["received"] += 1
        held = None
        try:
            held = self.handle(_topic_of(message), bytes(message.payload))
        except StoreError as exc:
            # Not acknowledged. Brokers redeliver unacknowledged messages on a new connection
            # (to this listener's resumed session), so drop this one; the network thread
            # reconnects with backoff and the message comes back.
            self.stats["store_errors"] += 1
            log.error("could not store a message from %s (%s); reconnecting so the broker "
                      "redelivers it", _topic_of(message), exc)
            self.conn.client.disconnect()
            return
        except Exception:  # noqa: BLE001 - after the commit (a trigger's publish): it is stored
            log.exception("acting on a message from %s failed", _topic_of(message))
        if message.qos > 0:
            self.conn.ack(message.mid, message.qos)
        if held is not None:  # the device may now release it (until batch commit: one each)
            acks = AckBatch()
            acks.add(*held)
            for topic, payload in acks.messages(self.opts.prefix, self.opts.listener_id):
                self.conn.publish(topic, payload)

    def handle(self, topic: str, payload: bytes) -> tuple[str, int] | None:
        """Store one message, or put it in the dead letters. Raises StoreError only: the
        caller acknowledges the message unless it does. Returns (device, seq) when the store
        now holds the spooled record (stored, or a duplicate), for the device's ack."""
        try:
            kind, msg = protocol.validate(topic, payload, self.opts.prefix)
            if kind == "status":
                self.store.set_status(msg)
                return None
            stored, transitions = self.store.ingest(msg, time.time(), self.rules)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever this message sets off, it is its own
            self._dead_letter(topic, payload, exc)
            return None
        self.stats["stored" if stored else "duplicates"] += 1
        for t in transitions:
            self._act(t)
        return msg["device_id"], msg["seq"]

    def _dead_letter(self, topic: str, payload: bytes, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, MessageRejected) else (
            f"{topic}: {type(exc).__name__}: {exc}")
        if isinstance(exc, MessageRejected):
            log.warning("dead letter: %.300s", reason)
        else:  # not a refusal we wrote: a bug this message found, keep its traceback
            log.error("dead letter: %.300s", reason, exc_info=exc)
        self.store.dead_letter(topic, _claimed_device(topic, self.opts.prefix), reason, payload)
        self.stats["rejected"] += 1

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
        self.conn.start()
        next_report = time.monotonic() + self.opts.stats_every_s
        while not stop.wait(0.2):
            if time.monotonic() >= next_report:
                next_report += self.opts.stats_every_s
                self._save_stats()
                if progress:
                    progress(dict(self.stats, connected=self.conn.connected.is_set(),
                                  last_error=self.conn.last_error))
        self.conn.stop()
        for thread in self._commands:
            thread.join()
        self._save_stats()
        return dict(self.stats)

    def _save_stats(self) -> None:
        try:
            self.store.save_listener_stats(self.opts.listener_id, self.stats)
        except StoreError as exc:  # the counts are kept here: the next save catches up
            log.error("could not save the listener's counts: %s", exc)


def _topic_of(message: Any) -> str:
    """The message's topic; brokers check that topics are UTF-8, but never trust that."""
    try:
        return str(message.topic)
    except UnicodeDecodeError:
        return bytes(message._topic).decode("utf-8", "backslashreplace")


def _claimed_device(topic: str, prefix: str) -> str | None:
    """The device level of a topic under `prefix`, as the sender wrote it (unchecked)."""
    parts, base = topic.split("/"), prefix.split("/")
    if len(parts) == len(base) + 2 and parts[:len(base)] == base:
        return parts[-2]
    return None
