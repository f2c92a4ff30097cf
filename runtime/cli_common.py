"""Click options and helpers that `edge-runtime` and `toolchain listen` share: the broker's
address, TLS, credentials and reconnect backoff, and stopping cleanly on a signal. Kept
apart from runtime/cli.py so the toolchain's CLI does not import the device's."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

PASSWORD_ENV = "EDGEPACK_MQTT_PASSWORD"


def apply_options(func: Callable, opts: list) -> Callable:
    for opt in reversed(opts):
        func = opt(func)
    return func


def broker_options(required: bool) -> Callable[[Callable], Callable]:
    """The broker address, TLS, credential and reconnect options; read them back with
    `broker_config`."""
    opts = [
        click.option("--broker", required=required, default=None, metavar="URL",
                     help="mqtt://host[:port] or mqtts://host[:port]" + (
                         "" if required else "; without it telemetry is only spooled, to be "
                                             "sent by a later run with a broker")),
        click.option("--mqtt-version", type=click.Choice(["5", "3.1.1"]), default="5",
                     show_default=True),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="CA certificate(s) to verify the broker (mqtts://)"),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="client certificate"),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="client certificate's private key"),
        click.option("--username", default=None),
        click.option("--password-file", type=click.Path(exists=True, dir_okay=False,
                                                        path_type=Path),
                     default=None, help=f"file holding the MQTT password (or ${PASSWORD_ENV})"),
        click.option("--keepalive", type=click.IntRange(min=5), default=30, show_default=True),
        click.option("--reconnect-max", type=click.FloatRange(min=0.1), default=30.0,
                     show_default=True, help="cap of the jittered reconnect backoff, seconds"),
    ]
    return lambda func: apply_options(func, opts)


def broker_config(o: dict[str, Any]) -> Any:
    """The BrokerConfig the `broker_options` values describe, or None without --broker."""
    from runtime.mqtt import BrokerConfig, BrokerConfigError

    if not o["broker"]:
        for flag in ("tls_ca", "tls_cert", "tls_key", "username", "password_file"):
            if o[flag]:
                raise click.UsageError(f"--{flag.replace('_', '-')} needs --broker")
        return None
    password = (o["password_file"].read_text().strip() if o["password_file"]
                else os.environ.get(PASSWORD_ENV))
    try:
        return BrokerConfig.from_url(
            o["broker"], ca_file=o["tls_ca"], cert_file=o["tls_cert"], key_file=o["tls_key"],
            username=o["username"], password=password, protocol=o["mqtt_version"],
            keepalive=o["keepalive"], reconnect_max_s=o["reconnect_max"],
            reconnect_min_s=min(0.5, o["reconnect_max"]))
    except BrokerConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def stop_on_signals() -> threading.Event:
    """SIGTERM/SIGINT set an event, so the work in hand ends cleanly (window flushed, spool
    drained as far as it goes; for `toolchain listen`, the last message stored)."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop
