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
harmless. Topics and message validation are runtime.protocol's; SQL is the store's.
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
from toolchain.fleet.rules import Rule, Transition
from toolchain.fleet.store import Store

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
        self.stats = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0,
                      "store_errors": 0,
                      "triggers_fired": 0, "triggers_cleared": 0, "started_at": time.time()}
        self._commands: list[threading.Thread] = []
        self.conn = Connection(opts.broker, f"edgepack-listener-{opts.listener_id}",
                               on_connect=self._connected, on_message=self._message,
                               manual_ack=True, max_inflight=100)

    def topics(self) -> list[str]:
        return protocol.listener_topics(self.opts.prefix, self.opts.group)

    def _connected(self, session_present: bool) -> None:
        self.conn.subscribe(self.topics())
        if self.on_subscribed:
            self.on_subscribed(session_present)

    def _message(self, message: Any) -> None:
        self.stats["received"] += 1
        try:
            self.handle(message.topic, bytes(message.payload))
        except MessageRejected as exc:
            self.stats["rejected"] += 1
            log.warning("rejected: %s", exc)
        except Exception as exc:
            # Not acknowledged. Brokers redeliver unacknowledged messages on a new connection
            # (to this listener's resumed session), so drop this one; the network thread
            # reconnects with backoff and the message comes back.
            self.stats["store_errors"] += 1
            log.error("could not store a message from %s (%s: %s); reconnecting so the broker "
                      "redelivers it", message.topic, type(exc).__name__, exc)
            self.conn.client.disconnect()
            return
        if message.qos > 0:
            self.conn.ack(message.mid, message.qos)

    def handle(self, topic: str, payload: bytes) -> None:
        kind, msg = protocol.validate(topic, payload, self.opts.prefix)
        if kind == "status":
            self.store.set_status(msg)
            return
        stored, transitions = self.store.ingest(msg, time.time(), self.rules)
        self.stats["stored" if stored else "duplicates"] += 1
        for t in transitions:
            self._act(t)

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
                self.store.save_listener_stats(self.opts.listener_id, self.stats)
                if progress:
                    progress(dict(self.stats, connected=self.conn.connected.is_set(),
                                  last_error=self.conn.last_error))
        self.conn.stop()
        for thread in self._commands:
            thread.join()
        self.store.save_listener_stats(self.opts.listener_id, self.stats)
        return dict(self.stats)
