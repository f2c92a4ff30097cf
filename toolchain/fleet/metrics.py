"""Prometheus metrics for the listener (`toolchain listen --metrics HOST:PORT`), so that
operators see the fleet's intake on the dashboards they already have. Uses the
`prometheus_client` package (edgepack[fleet]); the figures are read from the listener's
counters and, for the fleet gauges, from the store at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from toolchain.errors import UsageError

log = logging.getLogger("edgepack.metrics")

COUNTERS = {  # listener stats key -> (metric name, help)
    "received": ("edgepack_listener_messages_received", "messages taken from the broker"),
    "stored": ("edgepack_listener_messages_stored", "messages newly stored"),
    "duplicates": ("edgepack_listener_messages_duplicate", "redeliveries already stored"),
    "rejected": ("edgepack_listener_dead_letters", "messages put in the dead letters"),
    "store_errors": ("edgepack_listener_store_errors", "batches the store refused"),
    "connects": ("edgepack_listener_connects", "connections made to the broker"),
    "batches": ("edgepack_listener_batches", "transactions committed"),
    "triggers_fired": ("edgepack_listener_triggers_fired", "triggers fired here"),
    "triggers_cleared": ("edgepack_listener_triggers_cleared", "triggers cleared here"),
    "captures": ("edgepack_listener_captures", "capture messages written to the data dir"),
    "capture_samples": ("edgepack_listener_capture_samples", "captured samples written"),
    "capture_bytes": ("edgepack_listener_capture_bytes", "captured .npz bytes written"),
    "captures_over_cap": ("edgepack_listener_captures_over_cap",
                          "capture messages refused by the data dir's cap (--data-max-mb)"),
}


def parse_address(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--metrics {addr!r}: use HOST:PORT, e.g. 127.0.0.1:9464 (port 0: "
                         f"a free one)")
    return host, int(port)


class _Collector:
    def __init__(self, listener: Any) -> None:
        self.listener = listener

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        lid = self.listener.opts.listener_id
        stats = dict(self.listener.stats)
        for key, (name, text) in COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=["listener"])
            family.add_metric([lid], float(stats.get(key, 0)))
            yield family
        up = GaugeMetricFamily("edgepack_listener_connected", "1 while connected to the broker",
                               labels=["listener"])
        up.add_metric([lid], 1.0 if self.listener.conn.connected else 0.0)
        yield up
        started = GaugeMetricFamily("edgepack_listener_start_time_seconds",
                                    "when this listener started (unix time)",
                                    labels=["listener"])
        started.add_metric([lid], float(stats["started_at"]))
        yield started
        try:
            fleet = self.listener.store.fleet_gauges()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even if the store cannot
            log.warning("metrics: the store did not answer: %s", exc)
            return
        states = GaugeMetricFamily("edgepack_fleet_devices", "devices by last reported state",
                                   labels=["state"])
        for state, n in sorted(fleet["devices"].items()):
            states.add_metric([state], float(n))
        yield states
        active = GaugeMetricFamily("edgepack_fleet_triggers_active", "triggers now active")
        active.add_metric([], float(fleet["active_triggers"]))
        yield active


def serve(addr: str, listener: Any) -> tuple[Any, int]:
    """Start the HTTP endpoint on a daemon thread; returns (server, port)."""
    host, port = parse_address(addr)
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        raise UsageError("--metrics needs prometheus_client: pip install 'edgepack[fleet]'") \
            from exc
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Collector(listener))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(f"--metrics {addr}: cannot listen there: {exc}") from exc
    return server, server.server_port
