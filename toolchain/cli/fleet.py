"""`toolchain listen` and `toolchain fleet`: the cloud end of the telemetry loop."""

from __future__ import annotations

import json
import time
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


def _open_existing(store_url: str):
    """The store at `store_url`; a SQLite file must exist already (exit 2 otherwise)."""
    from urllib.parse import urlsplit

    from toolchain.fleet.store import StoreError, open_store

    if urlsplit(store_url).scheme in ("sqlite", ""):
        path = Path(store_url[len("sqlite:///"):] if store_url.startswith("sqlite:///")
                    else store_url)
        if not path.is_file():
            fail(UsageError(f"store {store_url!r}: {path} does not exist (start "
                             "`toolchain listen --store ...` first)"))
    try:
        return open_store(store_url)
    except StoreError as exc:
        fail(ToolchainError(str(exc)))
    except ToolchainError as exc:
        fail(exc)


def _devices_shown(text: str) -> int | None:
    if text == "all":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise click.BadParameter(f"{text!r}: a positive number of devices, or all")


@click.group(invoke_without_command=True)
@click.option("--store", "store_url", default="sqlite:///fleet.db", show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="print the summary as compact JSON (every device, whatever --devices says)")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="also write an HTML report with plots")
@click.option("--devices", "devices_shown", default="20", show_default=True, metavar="N|all",
              help="devices in the table: a fleet larger than N shows the N needing attention "
                   "most; all lists every one")
@click.pass_context
def fleet(ctx: click.Context, store_url: str, as_json: bool, html_path: Path | None,
          devices_shown: str) -> None:
    """Devices, model versions, windows received, sequence gaps, latency percentiles, drift
    scores and triggers, from a listener's store. `toolchain fleet retain` keeps it small."""
    if ctx.invoked_subcommand is not None:
        return
    from toolchain.fleet.report import render_html, render_text, summarize

    try:
        shown = _devices_shown(devices_shown)
    except click.BadParameter as exc:
        fail(UsageError(f"--devices {exc.message}"))
    store = _open_existing(store_url)
    summary = summarize(store, shown)
    store.close()
    if html_path:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = html_path.with_suffix(html_path.suffix + ".tmp")
        tmp.write_text(render_html(summary))
        tmp.replace(html_path)
    # compact: json's C encoder does not indent, and at 10,000 devices indenting takes
    # three times as long as the rest of the report (pipe it through jq to read it)
    click.echo(json.dumps(summary, default=str, separators=(",", ":")) if as_json
               else render_text(summary))
    if html_path:
        click.echo(f"html: {html_path}", err=True)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, flag: str = "--keep-raw") -> float:
    """`90m`, `36h`, `7d`, `2w`, `45s` (a number and a unit) -> seconds; UsageError (naming
    `flag`) else."""
    t = text.strip().lower()
    number, unit = t[:-1], t[-1:]
    try:
        value = float(number) if unit in _UNITS and number.strip() == number else -1.0
    except ValueError:
        value = -1.0
    if not (value > 0 and value * _UNITS.get(unit, 0) < 1e12):  # also refuses nan and inf
        raise UsageError(f"{flag} {text[:40]!r}: give a positive duration with a unit, "
                         "such as 90m, 36h or 7d (units s, m, h, d, w)")
    return value * _UNITS[unit]


@fleet.command()
@click.option("--store", "store_url", default="sqlite:///fleet.db", show_default=True)
@click.option("--keep-raw", "keep_raw", required=True, metavar="DURATION",
              help="keep raw windows and messages received within this long (90m, 36h, 7d)")
@click.option("--chunk", type=click.IntRange(min=100, max=1_000_000), default=5000,
              show_default=True, help="messages deleted per transaction")
def retain(store_url: str, keep_raw: str, chunk: int) -> None:
    """Fold windows received more than --keep-raw ago into per-device hourly rollups and
    delete them and their messages, a chunk per transaction (a running listener is not held
    up). Device summaries, the fleet's hourly rollup and the report keep counting them;
    a deleted seq resent later is a duplicate. Run it from cron."""
    from toolchain.fleet.store import StoreError

    try:
        keep_s = parse_duration(keep_raw)
    except UsageError as exc:
        fail(exc)
    store = _open_existing(store_url)
    try:
        done = store.apply_retention(keep_s, chunk=chunk)
    except StoreError as exc:
        fail(ToolchainError(str(exc)))
    finally:
        store.close()
    before = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(done["cutoff"]))
    click.echo(f"retained: deleted {done['messages']} messages ({done['windows']} windows) "
               f"received before {before} in {done['chunks']} chunk(s); "
               f"{done['rollup_upserts']} hourly rollup rows written; the longest "
               f"transaction took {done['longest_chunk_s']:.2f} s")
