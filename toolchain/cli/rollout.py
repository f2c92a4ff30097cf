"""`toolchain rollout`: phased rollout of a new bundle, judged stage by stage
(toolchain.fleet.rollout). The state lives in the store, so every subcommand works from any
machine that reaches it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from runtime.cli_common import broker_config, broker_options, stop_on_signals
from runtime.protocol import DEFAULT_PREFIX
from toolchain.cli.common import fail
from toolchain.errors import ToolchainError, UsageError

STORE_OPTION = click.option("--store", "store_url", default="sqlite:///fleet.db",
                            show_default=True, help="the fleet store the listeners write")


def _store(store_url: str):
    from toolchain.cli.fleet import _open_existing

    return _open_existing(store_url)


def _stages(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: give percentages separated by commas, e.g. "
                                 "5,25,100") from None


def _echo(line: str) -> None:
    click.echo(line, err=True)


def _drive(store, cfg, rollout_id: str, poll: float) -> None:
    """Drive the rollout in this process until it ends; exit 0 completed, 3 rolled back,
    1 aborted or stopped (a signal) before the end."""
    from toolchain.fleet.rollout import Driver

    stop = stop_on_signals()
    try:
        final = Driver(store, cfg, rollout_id, poll_s=poll, echo=_echo).run(stop)
    except ToolchainError as exc:
        fail(exc)
    finally:
        store.close()
    state = final.get("state")
    if state == "completed":
        return
    if state == "rolled_back":
        click.echo(f"rolled back: {final.get('message')}", err=True)
        sys.exit(3)
    if state == "aborted":
        click.echo(f"rollout {rollout_id} aborted: {final.get('message')}", err=True)
    else:  # stopped (a signal) before the end: the rollout waits in the store
        click.echo(f"rollout {rollout_id} is {state}, its driver stopped: `toolchain rollout "
                   f"resume {rollout_id}` carries it on", err=True)
    sys.exit(1)


@click.group()
def rollout() -> None:
    """Roll a new bundle out in stages, judged against the devices that stay behind."""


@rollout.command()
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@STORE_OPTION
@broker_options(required=True)
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="topic prefix")
@click.option("--stages", default="5,25,100", show_default=True, metavar="P1,P2,...,100",
              help="the share of the scope's devices on the new bundle after each stage")
@click.option("--soak", default="10m", show_default=True, metavar="DURATION",
              help="how long a stage runs before it is judged (30s, 10m, 1h)")
@click.option("--shadow-first", is_flag=True,
              help="run the candidate in shadow on the first stage's devices first")
@click.option("--min-devices", type=click.IntRange(min=1), default=1, show_default=True,
              help="devices per arm before a verdict, and finished reloads before the "
                   "failure share is judged")
@click.option("--min-windows", type=click.IntRange(min=1), default=8, show_default=True,
              help="windows per arm and metric before a verdict (fewer: hold)")
@click.option("--max-failures", type=click.FloatRange(0, 100), default=10.0,
              show_default=True, help="percent of failed reloads that rolls a stage back")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.05, show_default=True,
              help="the stage's significance level, shared among its metrics (Bonferroni)")
@click.option("--sample", type=click.FloatRange(0, 1, min_open=True), default=0.25,
              show_default=True, help="shadow: share of inferences the candidate also runs")
@click.option("--cpu-share", type=click.FloatRange(0, 1, min_open=True), default=0.25,
              show_default=True, help="shadow: the candidate's CPU budget on the device")
@click.option("--reload-timeout", default="2m", show_default=True, metavar="DURATION",
              help="a device that has not answered a reload by then gets it again "
                   "(three times, then it counts as failed)")
@click.option("--bundle-url", default=None, metavar="URL",
              help="where devices fetch the bundle (http(s)://, file:// or a path they "
                   "see); default: BUNDLE's absolute path")
@click.option("--from-version", default=None,
              help="the version to replace (default: the one most of the model's devices run)")
@click.option("--poll", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="seconds between the driver's looks at the store")
@click.option("--detach", is_flag=True,
              help="only create the rollout; drive it with `toolchain rollout resume ID`")
def start(bundle: Path, store_url: str, prefix: str, stages: str, soak: str,
          shadow_first: bool, min_devices: int, min_windows: int, max_failures: float,
          alpha: float, sample: float, cpu_share: float, reload_timeout: str,
          bundle_url: str | None, from_version: str | None, poll: float, detach: bool,
          **broker: Any) -> None:
    """Start rolling BUNDLE out to the devices running its model's current version, and
    drive it until it completes or rolls back (exit 0 completed, 3 rolled back)."""
    from toolchain.cli.fleet import parse_duration
    from toolchain.fleet.rollout import RolloutConfig, plan, read_candidate

    try:
        cfg = broker_config(broker)
        config = RolloutConfig(stages=_stages(stages), soak_s=parse_duration(soak, "--soak"),
                               shadow_first=shadow_first, min_devices=min_devices,
                               min_windows=min_windows, max_failure_pct=max_failures,
                               alpha=alpha, sample=sample, cpu_share=cpu_share,
                               reload_timeout_s=parse_duration(reload_timeout,
                                                                "--reload-timeout"), prefix=prefix)
        config.check()
        candidate = read_candidate(bundle)
    except click.UsageError as exc:
        fail(UsageError(exc.message))
    except (ToolchainError, ValueError) as exc:
        fail(exc if isinstance(exc, ToolchainError) else UsageError(str(exc)))
    store = _store(store_url)
    try:
        row = plan(store, candidate, config, from_version=from_version,
                   bundle_url=bundle_url or str(bundle.resolve()))
    except ToolchainError as exc:
        store.close()
        fail(exc)
    click.echo(f"[rollout] {row['id']}: {row['model']} {row['from_version']} -> "
               f"{row['to_version']}, stages {stages}"
               + (" after a shadow run" if shadow_first else "")
               + f", soak {soak}", err=True)
    click.echo(row["id"])
    if detach:
        store.close()
        return
    _drive(store, cfg, row["id"], poll)


@rollout.command()
@click.argument("rollout_id")
@STORE_OPTION
@broker_options(required=True)
@click.option("--poll", type=click.FloatRange(min=0.05), default=1.0, show_default=True)
def resume(rollout_id: str, store_url: str, poll: float, **broker: Any) -> None:
    """Carry a rollout on (after `pause`, or a driver that stopped): drive it in this
    process until it ends. When its driver is alive (elsewhere), only mark it running: that
    driver carries on."""
    from toolchain.fleet import rollout_store as rs
    from toolchain.fleet.rollout import holder_gone

    try:
        cfg = broker_config(broker)
    except click.UsageError as exc:
        fail(UsageError(exc.message))
    store = _store(store_url)
    row = rs.get(store, rollout_id)
    if row is None:
        store.close()
        fail(UsageError(f"no rollout {rollout_id!r} in {store_url}"))
    if row["state"] in rs.TERMINAL:
        store.close()
        fail(UsageError(f"rollout {rollout_id} has ended ({row['state']})"))
    rs.request(store, rollout_id, None, state="running")
    alive = row["owner"] and (row["lease_until"] or 0) > time.time() and \
        not holder_gone(row["owner"])
    if alive:
        store.close()  # its driver is alive: it sees the state and carries on
        click.echo(f"rollout {rollout_id}: running; its driver {row['owner']} carries it on",
                   err=True)
        return
    _drive(store, cfg, rollout_id, poll)


def _mark(rollout_id: str, store_url: str, what: str | None, state: str | None,
          done: str) -> None:
    from toolchain.fleet import rollout_store as rs

    store = _store(store_url)
    try:
        row = rs.get(store, rollout_id)
        if row is None:
            fail(UsageError(f"no rollout {rollout_id!r} in {store_url}"))
        if not rs.request(store, rollout_id, what, state=state):
            fail(UsageError(f"rollout {rollout_id} has ended ({row['state']})"))
    finally:
        store.close()
    click.echo(f"rollout {rollout_id}: {done}"
               + ("" if row["owner"] else "; no driver is running: `toolchain rollout resume "
                                         f"{rollout_id} --broker ...` carries it out"))


@rollout.command()
@click.argument("rollout_id")
@STORE_OPTION
def pause(rollout_id: str, store_url: str) -> None:
    """Stop sending and judging (the devices stay as they are) until `resume`."""
    _mark(rollout_id, store_url, None, "paused", "paused")


@rollout.command()
@click.argument("rollout_id")
@STORE_OPTION
def abort(rollout_id: str, store_url: str) -> None:
    """Roll every canary back to the old bundle and end the rollout."""
    _mark(rollout_id, store_url, "abort", None, "abort requested")


@rollout.command()
@click.argument("rollout_id")
@STORE_OPTION
def promote(rollout_id: str, store_url: str) -> None:
    """Pass the current stage without waiting for the soak or the judge."""
    _mark(rollout_id, store_url, "promote", None, "promotion requested")


@rollout.command()
@click.argument("rollout_id", required=False)
@STORE_OPTION
@click.option("--json", "as_json", is_flag=True, help="print the state as JSON")
def status(rollout_id: str | None, store_url: str, as_json: bool) -> None:
    """Every rollout (or one, with its devices and verdicts and their statistics)."""
    from toolchain.fleet import rollout_store as rs
    from toolchain.fleet.report import rollout_lines

    store = _store(store_url)
    try:
        rows = rs.all_rollouts(store) if rollout_id is None else \
            [r for r in [rs.get(store, rollout_id)] if r is not None]
        if rollout_id is not None and not rows:
            fail(UsageError(f"no rollout {rollout_id!r} in {store_url}"))
        full = [{**r, "devices": rs.rollout_devices(store, r["id"]),
                 "verdicts": rs.verdicts(store, r["id"])} for r in rows]
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(full, indent=2))
        return
    if not full:
        click.echo("no rollouts")
        return
    for r in full:
        click.echo("\n".join(rollout_lines(r, verbose=rollout_id is not None)))
