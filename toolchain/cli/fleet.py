"""`toolchain listen` and `toolchain fleet`: the cloud end of the telemetry loop."""

from __future__ import annotations

import json
from pathlib import Path

import click

from runtime.cli_common import broker_config, broker_options, stop_on_signals
from runtime.protocol import DEFAULT_PREFIX
from toolchain.cli.common import fail
from toolchain.errors import ToolchainError, UsageError


@click.command()
@broker_options(required=True)
@click.option("--store", "store_url", default="sqlite:///fleet.db", show_default=True,
              help="sqlite:///PATH or postgresql://user[:pass]@host[:port]/db")
@click.option("--rules", "rules_path", type=click.Path(exists=True, dir_okay=False,
                                                       path_type=Path), default=None,
              help="rules TOML (default: drift > 0.25, p95 over budget, errors > 5%)")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="topic prefix")
@click.option("--group", default=None,
              help="MQTT 5 shared-subscription group: listeners in one group split the fleet. "
                   "Without it, this listener takes every message (and, on Mosquitto, keeps "
                   "its subscription across a broker restart, which shared ones do not)")
@click.option("--listener-id", default=None, help="default: HOSTNAME-PID")
@click.option("--stats-every", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="seconds between progress lines")
@click.option("--batch-max", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="messages stored in one transaction at most (group commit)")
@click.option("--batch-ms", type=click.FloatRange(0, 60_000), default=50.0, show_default=True,
              help="milliseconds a message waits at most for its batch to fill; a batch is "
                   "also committed as soon as the broker has nothing more to send")
@click.option("--device-acks/--no-device-acks", default=True, show_default=True,
              help="publish 'stored' acks to the devices, so their spools release only what "
                   "a listener stored (runtime --ack listener)")
@click.option("--metrics", "metrics_addr", default=None, metavar="HOST:PORT",
              help="serve Prometheus metrics on http://HOST:PORT/metrics (needs "
                   "edgepack[fleet]); port 0 picks a free one")
@click.option("--quiet", is_flag=True, help="no progress lines")
def listen(store_url: str, rules_path: Path | None, prefix: str, group: str | None,
           listener_id: str | None, stats_every: float, batch_max: int, batch_ms: float,
           device_acks: bool, metrics_addr: str | None, quiet: bool,
           **broker: object) -> None:
    """Consume the fleet's telemetry into a store, apply the rules and fire triggers.
    Runs until SIGTERM or Ctrl-C."""
    import gc
    import logging

    from runtime.protocol import check_prefix
    from toolchain.fleet.listener import Listener, ListenerOptions
    from toolchain.fleet.rules import load_rules
    from toolchain.fleet.store import StoreError, open_store, redact

    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        check_prefix(prefix)
    except ValueError as exc:
        fail(UsageError(str(exc)))
    try:
        cfg = broker_config(broker)
        rules = load_rules(rules_path)
        store = open_store(store_url)
    except click.UsageError as exc:
        fail(UsageError(exc.message))
    except StoreError as exc:
        fail(ToolchainError(str(exc)))
    except ToolchainError as exc:
        fail(exc)
    stop = stop_on_signals()
    # The listener parses thousands of JSON messages a second into short-lived dicts that
    # reference counting frees; the cyclic collector's frequent passes over them cost more
    # than the parsing (measured: orjson 7.8 -> 30 us a message). Collect far less often.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    listener = Listener(ListenerOptions(cfg, prefix=prefix, group=group,
                                        listener_id=listener_id or "",
                                        stats_every_s=stats_every, batch_max=batch_max,
                                        batch_ms=batch_ms, device_acks=device_acks),
                        store, rules,
                        on_subscribed=lambda present: click.echo(
                            f"[listen] subscribed (session {'resumed' if present else 'new'})",
                            err=True))
    if metrics_addr:
        from toolchain.fleet import metrics

        try:
            server, port = metrics.serve(metrics_addr, listener)
        except ToolchainError as exc:
            store.close()
            fail(exc)
        click.echo(f"[listen] metrics on http://{server.server_address[0]}:{port}/metrics",
                   err=True)
    click.echo(f"listening on {cfg.url} ({', '.join(listener.topics())}) into "
               f"{redact(store_url)}; rules: {', '.join(r.name for r in rules)}", err=True)

    def progress(st: dict) -> None:
        if not quiet:
            click.echo(f"[listen] {st['received']} received, {st['stored']} stored, "
                       f"{st['duplicates']} duplicates, {st['rejected']} dead letters, "
                       f"{st['triggers_fired']} triggers"
                       + ("" if st["connected"] else f"; NOT CONNECTED: {st['last_error']}"),
                       err=True)

    final = listener.run(stop, progress)
    store.close()
    click.echo(f"[listen] stopped: {final['received']} received, {final['stored']} stored, "
               f"{final['duplicates']} duplicates, {final['rejected']} dead letters, "
               f"{final['store_errors']} store errors", err=True)


@click.command()
@click.option("--store", "store_url", default="sqlite:///fleet.db", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="also write an HTML report with plots")
def fleet(store_url: str, as_json: bool, html_path: Path | None) -> None:
    """Devices, model versions, windows received, sequence gaps, latency percentiles, drift
    scores and triggers, from a listener's store."""
    from urllib.parse import urlsplit

    from toolchain.fleet.report import render_html, render_text, summarize
    from toolchain.fleet.store import StoreError, open_store

    if urlsplit(store_url).scheme in ("sqlite", ""):
        path = Path(store_url[len("sqlite:///"):] if store_url.startswith("sqlite:///")
                    else store_url)
        if not path.is_file():
            fail(UsageError(f"store {store_url!r}: {path} does not exist (start "
                             "`toolchain listen --store ...` first)"))
    try:
        store = open_store(store_url)
    except StoreError as exc:
        fail(ToolchainError(str(exc)))
    except ToolchainError as exc:
        fail(exc)
    summary = summarize(store)
    if html_path:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = html_path.with_suffix(html_path.suffix + ".tmp")
        tmp.write_text(render_html(summary, store))
        tmp.replace(html_path)
    store.close()
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else render_text(summary))
    if html_path:
        click.echo(f"html: {html_path}", err=True)
