"""A fleet simulator: N devices publish window messages through a real Mosquitto into one or
more `toolchain listen` processes, and the store says how fast they were stored, how late,
at what CPU cost and in how many bytes, and whether every message arrived exactly once.

    .venv/bin/python benchmarks/fleet_sim.py                    # the default scenarios
    .venv/bin/python benchmarks/fleet_sim.py --scenarios 1k,max --duration 10
    .venv/bin/python benchmarks/fleet_sim.py --devices 500 --max --store postgresql \\
        --listeners 2 --listen-arg="--batch-max 500"
    .venv/bin/python benchmarks/fleet_sim.py --scenarios max --show-logs   # listeners' output

Scenarios (--scenarios, comma-separated; default all):
  1k, 10k  1,000 / 10,000 devices at --rate messages/s in all (default 1,667: a window every
           60 s from 100,000 devices, the time compressed), SQLite, one listener;
  max      --max-devices devices publishing as fast as the listener stores (the broker kept
           --backlog-s seconds ahead of the store), SQLite, one listener;
  pg       the same on PostgreSQL with --pg-listeners listeners (default 1,2,4) in one
           shared-subscription group, each in a fresh database created and dropped here.
--devices N runs one scenario of your own instead (--rate R or --max, --store, --listeners).

Devices are multiplexed: --publishers processes, each one MQTT connection speaking for its
share of the devices (each device with its own topic and seq), since 10,000 Python MQTT
connections do not fit on two cores. Each device's messages are built as the runtime builds
them, around a window body from runtime.window.Window (a pool of --bodies bodies), and sent
at QoS 1 by a minimal MQTT 5 publisher (benchmarks/fleet_sim_mqtt.py; --client paho for the
runtime's own client, which costs the publishers about 9x the CPU).

Measured per scenario: messages stored per second over the steady part (the middle 80% of
the messages by the store's received_at), publish-to-receive latency p50/p99 (received_at,
stamped when the listener receives the message and committed shortly after, minus the
publish time carried in time.wall), CPU of the broker, each listener, the publishers and
(PostgreSQL) the listeners' server processes, as % of one core from /proc/<pid>/stat between
the start of publishing and the last message stored, and bytes on disk per device-day at one
window per --window-s. Each device's seqs are checked: stored exactly once, no gaps.
Each scenario starts from an empty store and a fresh broker: devices appear in the store
as they first report.

The broker is the test suite's launcher (tests/mqtt_broker.py) with settings for this load:
max_queued_messages 1,000,000 and max_queued_bytes unlimited (the backlog a listener's
session may hold), autosave_interval 1800 (the tests' 1 s autosave rewrites the whole queue
to disk every second) and max_inflight_messages --broker-inflight (2,000; the tests' 100
would cap a listener's batch at 100 messages, since it acknowledges after committing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.fleet_sim_devices import proc_cpu_s, window_bodies  # noqa: E402
from benchmarks.fleet_sim_store import SimStore  # noqa: E402
from runtime.protocol import DEFAULT_PREFIX  # noqa: E402
from tests.mqtt_broker import MOSQUITTO, Broker  # noqa: E402  (the test suite's launcher)

BROKER_OPTIONS = {"max_queued_messages": "1000000", "max_queued_bytes": "0",
                  "autosave_interval": "1800"}  # and max_inflight_messages: --broker-inflight
DEVICES_SCRIPT = REPO / "benchmarks" / "fleet_sim_devices.py"
# unacknowledged QoS 1 publishes per publisher: paho's as a device sets it, and more for
# the raw client, which writes batches (Mosquitto acknowledges QoS 1 as it reads them)
INFLIGHT = {"raw": 1000, "paho": 100}
BACKLOG_MIN = 2000  # messages; at least this much backlog (--max) or lag (a rate)
POLL_S = 0.25


class SimError(RuntimeError):
    """A scenario could not run (a process died, the store is unreachable); one line."""


@dataclass
class Scenario:
    name: str
    devices: int
    rate: float | None  # messages/s in all; None: as fast as the listeners store
    store: str  # sqlite | postgresql
    listeners: int

    def describe(self, window_s: float) -> str:
        load = ("--max: as fast as stored" if self.rate is None else
                f"{self.rate:,.0f} msg/s = {self.rate * window_s:,.0f} devices at one window "
                f"per {window_s:g} s (each device here every {self.devices / self.rate:.2f} s)")
        return (f"{self.devices:,} devices, {load}; {self.store}, {self.listeners} "
                f"listener{'s' if self.listeners > 1 else ''}"
                + (" in a shared group" if self.store == "postgresql" or self.listeners > 1
                   else ""))


class Child:
    """A process whose output is read as it comes: the last lines kept, `sent N` and
    `result {json}` lines (from a publisher) parsed."""

    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 stdin: bool = False) -> None:
        self.name = name
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env)
        self.lines: deque[str] = deque(maxlen=100)
        self.sent = 0
        self.result: dict[str, Any] | None = None
        self._threads = [threading.Thread(target=self._pump, args=(s,), daemon=True)
                         for s in (self.p.stdout, self.p.stderr)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            if line.startswith("sent "):
                self.sent = int(line.split()[1])
            elif line.startswith("result "):
                self.result = json.loads(line[len("result "):])
            else:
                self.lines.append(line.rstrip())

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.saw(text):
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise SimError(f"{self.name} never said {text!r}: {self.tail()}")
            time.sleep(0.05)

    def send(self, line: str) -> None:
        try:
            self.p.stdin.write(line + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # it has exited; the monitor notices

    def stop(self, timeout: float = 30) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.join()

    def join(self) -> None:
        for t in self._threads:
            t.join(5)

    def tail(self) -> str:
        return " | ".join(list(self.lines)[-6:])[-1500:]


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def start_listeners(sc: Scenario, args: argparse.Namespace, broker_url: str,
                    store_url: str) -> list[Child]:
    extra = [a for arg in args.listen_arg for a in shlex.split(arg)]
    shared = sc.store == "postgresql" or sc.listeners > 1
    group = ["--group", "sim"] if shared else []
    listeners = [Child(f"listener L{k + 1}",
                       [sys.executable, "-m", "toolchain", "listen", "--broker", broker_url,
                        "--store", store_url, "--listener-id", f"sim-L{k + 1}", "--prefix",
                        args.prefix, "--reconnect-max", "1", *group, *extra], child_env())
                 for k in range(sc.listeners)]
    for child in listeners:
        child.wait_for("[listen] subscribed", 60)
    return listeners


def start_publishers(sc: Scenario, args: argparse.Namespace, broker_url: str,
                     bodies_file: Path, folder: Path) -> list[Child]:
    n = max(1, min(args.publishers, sc.devices))
    devices = [f"sim-{i:05d}" for i in range(sc.devices)]
    pubs = []
    for k in range(n):
        cfg = {"broker": broker_url, "prefix": args.prefix, "client_id": f"sim-publisher-{k}",
               "devices": devices[k::n], "body_index": list(range(k, sc.devices, n)),
               "bodies_file": str(bodies_file), "window_s": args.window_s,
               "rate": None if sc.rate is None else sc.rate / n,
               "duration_s": args.duration, "client": args.client,
               "inflight": INFLIGHT[args.client]}
        cfg_file = folder / f"publisher-{k}.json"
        cfg_file.write_text(json.dumps(cfg))
        pubs.append(Child(f"publisher {k}", [sys.executable, str(DEVICES_SCRIPT),
                                             str(cfg_file)], child_env(), stdin=True))
    for p in pubs:
        p.wait_for("ready", 120)
    return pubs


def monitor(sc: Scenario, args: argparse.Namespace, store: SimStore, listeners: list[Child],
            pubs: list[Child]) -> dict[str, Any]:
    """Until every published message is stored (or --drain-timeout after publishing ended),
    with progress on stderr. With --max it keeps the publishers' allowance --backlog-s
    ahead of the store; at a rate it stops them early once the store lags more than
    --max-lag-s of the offered load behind (the listeners are not keeping up: more would
    only lengthen the drain). Returns when the last message was seen stored (time.time()),
    whether the drain timed out and when publishing was stopped early (s after go, or None)."""
    start = time.monotonic()
    history: deque[tuple[float, int]] = deque()
    next_progress, published_at, last_exact, stopped_at = start + 2, None, 0.0, None
    while True:
        time.sleep(POLL_S)
        now = time.monotonic()
        stored = store.count()
        history.append((now, stored))
        while now - history[0][0] > 5.0:  # the rate over the last 5 s
            history.popleft()
        rate = ((stored - history[0][1]) / (now - history[0][0])
                if now > history[0][0] else 0.0)
        for child in listeners:
            if child.p.poll() is not None:
                raise SimError(f"{child.name} exited ({child.p.returncode}): {child.tail()}")
        for child in pubs:
            if child.result is None and child.p.poll() is not None:
                child.join()  # its last line may still be in the pipe
                if child.result is None:
                    raise SimError(f"{child.name} exited ({child.p.returncode}): "
                                   f"{child.tail()}")
        published = sum(p.result["published"] if p.result else p.sent for p in pubs)
        if sc.rate is None:
            allow = int((stored + max(BACKLOG_MIN, rate * args.backlog_s)) / len(pubs)) + 1
            for p in pubs:
                p.send(f"allow {allow}")
        elif stopped_at is None and published - stored > max(BACKLOG_MIN,
                                                               args.max_lag_s * sc.rate):
            stopped_at = now - start
            print(f"[{sc.name}] the store is {published - stored:,} messages behind: "
                  f"publishing stopped", file=sys.stderr, flush=True)
            for p in pubs:
                p.send("stop")
        if now >= next_progress:
            next_progress += 2
            print(f"[{sc.name}] {now - start:5.1f} s: {published:,} published, {stored:,} "
                  f"stored ({rate:,.0f}/s)", file=sys.stderr, flush=True)
        if all(p.result for p in pubs):
            published_at = published_at or now
            if stored >= published and now - last_exact >= 1.0:
                last_exact = now
                if store.exact_count() >= published:
                    return {"t_done": time.time(), "drain_timed_out": False,
                            "stopped_early_s": stopped_at}
            if now - published_at > args.drain_timeout:
                return {"t_done": time.time(), "drain_timed_out": True,
                        "stopped_early_s": stopped_at}


def run_scenario(sc: Scenario, args: argparse.Namespace, bodies_file: Path,
                 folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True)
    store = SimStore(sc.store, folder, args.pg_url, sc.name)
    broker, listeners, pubs = None, [], []
    try:
        try:
            store.create()
            size0 = store.size_bytes()
        except Exception as exc:  # noqa: BLE001 - sqlite3 or psycopg: say which, in one line
            raise SimError(f"store {store.url}: {type(exc).__name__}: {exc}") from exc
        try:
            broker = Broker(folder / "broker", options={
                **BROKER_OPTIONS, "max_inflight_messages": str(args.broker_inflight)}).start()
            listeners = start_listeners(sc, args, broker.url, store.url)
            pg_pids = store.backend_pids()
            pubs = start_publishers(sc, args, broker.url, bodies_file, folder)
            watched = {"broker": broker.proc.pid, **{f"listener L{k + 1}": c.p.pid
                                                     for k, c in enumerate(listeners)},
                       **{f"postgres {pid}": pid for pid in pg_pids}}
            cpu0 = {name: proc_cpu_s(pid) for name, pid in watched.items()}
            t_go = time.time()
            for p in pubs:
                if sc.rate is None:
                    p.send(f"allow {BACKLOG_MIN // len(pubs)}")
                p.send("go")
            ended = monitor(sc, args, store, listeners, pubs)
            cpu1 = {name: proc_cpu_s(pid) for name, pid in watched.items()}
        finally:
            for child in pubs + listeners:
                child.stop()
            if args.show_logs:
                for child in listeners:
                    print(f"-- {child.name}", *child.lines, sep="\n", file=sys.stderr)
            if broker:
                broker.stop()
        result = analyse(sc, args, store, pubs, listeners, size0)
    finally:
        store.close()
    wall = ended["t_done"] - t_go

    def pct(names: list[str]) -> float | None:
        used = [cpu1[n] - cpu0[n] for n in names if cpu0[n] is not None and cpu1[n] is not None]
        return 100 * sum(used) / wall if used else None

    result.update(
        **ended, seconds=wall,
        publish_s=max(p.result["t_sent"] for p in pubs) - t_go,
        cpu_broker=pct(["broker"]),
        cpu_listeners=[pct([f"listener L{k + 1}"]) for k in range(len(listeners))],
        cpu_postgres=pct([n for n in watched if n.startswith("postgres")]) if pg_pids else None,
        cpu_publishers=100 * sum(p.result["cpu_s"] for p in pubs) / wall,
        publishers=len(pubs))
    return result


def analyse(sc: Scenario, args: argparse.Namespace, store: SimStore, pubs: list[Child],
            listeners: list[Child], size0: int) -> dict[str, Any]:
    """What the store holds against what was published: exactly once, rate, latency, size."""
    sent: dict[str, int] = {}
    for p in pubs:
        sent.update(p.result["last_seq"])
    stored = store.per_device()
    missing = sum(max(0, n - stored.get(d, (0, 0, 0))[0]) for d, n in sent.items())
    unexpected = sum(c for d, (c, _, _) in stored.items() if d not in sent) + sum(
        max(0, stored[d][0] - n) for d, n in sent.items() if d in stored)
    gaps = sum(1 for d, n in sent.items() if n and stored.get(d) != (n, 1, n))
    recv, lat = store.receive_times()
    n = len(recv)
    i0, i1 = int(0.1 * n), max(int(0.9 * n) - 1, 0)
    span = recv[i1] - recv[i0] if n else 0.0
    size = store.size_bytes() - size0
    duplicates = sum(int(m.group(1)) for c in listeners for line in c.lines
                     if line.startswith("[listen] stopped")
                     for m in [re.search(r"(\d+) duplicates", line)] if m)
    per_msg = size / n if n else 0.0
    return {"scenario": sc.name, **asdict(sc), "published": sum(sent.values()),
            "stored": n, "missing": missing, "unexpected": unexpected, "devices_with_gaps": gaps,
            "exactly_once": missing == 0 and unexpected == 0 and gaps == 0,
            "listener_duplicates": duplicates, **store.other_counts(),
            "stored_per_s": (i1 - i0) / span if span > 0 else None,
            "latency_p50_ms": float(np.percentile(lat, 50) * 1000) if n else None,
            "latency_p99_ms": float(np.percentile(lat, 99) * 1000) if n else None,
            "store_bytes": size, "bytes_per_message": per_msg,
            "bytes_per_device_day": per_msg * 86400 / args.window_s}


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def print_scenario(r: dict[str, Any], sc: Scenario, args: argparse.Namespace) -> None:
    per_pub = -(-sc.devices // r["publishers"])
    check = ("yes" if r["exactly_once"] else
             f"{'UNKNOWN, the drain timed out' if r['drain_timed_out'] else 'NO'}: "
             f"{r['missing']:,} missing, {r['unexpected']:,} unexpected, "
             f"{r['devices_with_gaps']:,} devices with gaps")
    rows = [
        ("load", sc.describe(args.window_s)),
        ("publishers", f"{r['publishers']} processes, one MQTT connection each for "
                       f"~{per_pub:,} devices ({args.client} client, QoS 1)"),
        ("published", f"{r['published']:,} in {r['publish_s']:.1f} s "
                      f"({fmt(r['published'] / max(r['publish_s'], 1e-9))}/s)"
                      + ("" if r["stopped_early_s"] is None else
                         f"; STOPPED after {r['stopped_early_s']:.1f} s: the store fell more "
                         f"than {args.max_lag_s:g} s of load behind")),
        ("stored", f"{r['stored']:,} (windows rows {r['windows']:,}, dead letters "
                   f"{r['dead_letters']}, triggers {r['triggers']}; listener redeliveries "
                   f"{r['listener_duplicates']})"
                   + ("; DRAIN TIMED OUT" if r["drain_timed_out"] else "")),
        ("exactly once", check),
        ("stored/s (steady)", f"{fmt(r['stored_per_s'])}   (middle 80% of received_at; "
                              f"last stored {r['seconds']:.1f} s after publishing began)"),
        ("publish->receive", f"p50 {fmt(r['latency_p50_ms'], ',.1f')} ms, p99 "
                             f"{fmt(r['latency_p99_ms'], ',.1f')} ms"
                             + ("  (with --max this includes the broker backlog)"
                                if sc.rate is None else "")),
        ("CPU, % of one core", f"broker {fmt(r['cpu_broker'], '.0f')}, listeners "
                               + " + ".join(fmt(c, ".0f") for c in r["cpu_listeners"])
                               + f", publishers {fmt(r['cpu_publishers'], '.0f')}"
                               + (f", postgres backends {fmt(r['cpu_postgres'], '.0f')}"
                                  if r["cpu_postgres"] is not None else "")),
        ("store size", f"{r['store_bytes'] / 2**20:,.1f} MiB, "
                       f"{fmt(r['bytes_per_message'])} B/message, "
                       f"{r['bytes_per_device_day'] / 2**20:,.2f} MiB per device-day "
                       f"(one window per {args.window_s:g} s)"),
    ]
    print(f"\n== {sc.name}")
    for key, value in rows:
        print(f"  {key:<20} {value}")


def print_header(args: argparse.Namespace) -> None:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    version = subprocess.run([MOSQUITTO, "-h"],
                             capture_output=True, text=True).stdout.splitlines()[:1]
    print(f"fleet_sim: {os.cpu_count()} cores ({cpu}), shared by broker, listeners, "
          f"publishers and PostgreSQL; {' '.join(version) or 'mosquitto'} with "
          f"max_inflight_messages {args.broker_inflight}, max_queued_messages "
          f"{BROKER_OPTIONS['max_queued_messages']}, autosave_interval "
          f"{BROKER_OPTIONS['autosave_interval']}; {args.publishers} publisher processes "
          f"({args.client} client); {args.duration:g} s of publishing per scenario"
          + (f"; listen {' '.join(args.listen_arg)}" if args.listen_arg else ""))


def conclude(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{'scenario':<10} {'devices':>8} {'offered/s':>10} {'stored/s':>9} "
          f"{'p50 ms':>8} {'p99 ms':>9} {'broker%':>8} {'listen%':>8} {'pub%':>6} "
          f"{'pg%':>5} {'once':>5}")
    for r in results:
        print(f"{r['scenario']:<10} {r['devices']:>8,} {fmt(r['rate']) if r['rate'] else 'max':>10}"
              f" {fmt(r['stored_per_s']):>9} {fmt(r['latency_p50_ms'], ',.1f'):>8} "
              f"{fmt(r['latency_p99_ms'], ',.1f'):>9} {fmt(r['cpu_broker'], '.0f'):>8} "
              f"{fmt(sum(c or 0 for c in r['cpu_listeners']), '.0f'):>8} "
              f"{fmt(r['cpu_publishers'], '.0f'):>6} {fmt(r['cpu_postgres'], '.0f'):>5} "
              f"{'yes' if r['exactly_once'] else '?' if r['drain_timed_out'] else 'NO':>5}")
    per_device_s = args.window_s
    print(f"\nDevices carried at one window per {per_device_s:g} s (measured rate x "
          f"{per_device_s:g}; every process on this machine's {os.cpu_count()} cores):")
    for r in results:
        if r["rate"] is None and r["stored_per_s"]:
            who = ("one listener on SQLite" if r["store"] == "sqlite" else
                   f"{r['listeners']} listener(s) on one PostgreSQL")
            print(f"  {who:<32} {r['stored_per_s']:>9,.0f} msg/s -> "
                  f"{r['stored_per_s'] * per_device_s:>11,.0f} devices")
        elif r["rate"] and r["stored_per_s"]:
            kept = (r["stored_per_s"] >= 0.95 * r["rate"] and not r["drain_timed_out"]
                    and r["stopped_early_s"] is None)
            print(f"  {r['scenario']:<32} offered {r['rate']:,.0f} msg/s "
                  f"({r['rate'] * per_device_s:,.0f} devices): "
                  + ("kept up" if kept else f"fell behind ({r['stored_per_s']:,.0f}/s stored)"))


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    if args.devices:
        return [Scenario("custom", args.devices, None if args.max else args.rate, args.store,
                         args.listeners)]
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    out = []
    for name in chosen:
        if name in ("1k", "10k"):
            out.append(Scenario(name, 1000 if name == "1k" else 10_000, args.rate, "sqlite", 1))
        elif name == "max":
            out.append(Scenario("max", args.max_devices, None, "sqlite", 1))
        elif name == "pg":
            out += [Scenario(f"pg-{k}", args.max_devices, None, "postgresql", k)
                    for k in args.pg_listeners]
        else:
            sys.exit(f"fleet_sim: unknown scenario {name!r} (1k, 10k, max, pg)")
    return out


def postgres_reachable(url: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=5):
            return None
    except Exception as exc:  # noqa: BLE001 - any reason: the PostgreSQL scenarios are skipped
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="1k,10k,max,pg", help="1k, 10k, max, pg")
    ap.add_argument("--rate", type=float, default=1667.0, help="messages/s in all (paced)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of publishing")
    ap.add_argument("--max-devices", type=int, default=10_000, help="devices in max and pg")
    ap.add_argument("--pg-listeners", default="1,2,4",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="a server to CREATE and DROP a database of its own on")
    ap.add_argument("--devices", type=int, default=None, help="run one scenario of your own")
    ap.add_argument("--max", action="store_true", help="with --devices: as fast as stored")
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--listeners", type=int, default=1)
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes")
    ap.add_argument("--client", choices=("raw", "paho"), default="raw",
                    help="publishers' MQTT client: a minimal QoS 1 publisher (~8 us a message) "
                         "or the runtime's paho Connection, as a device (~70 us)")
    ap.add_argument("--bodies", type=int, default=1000,
                    help="distinct window bodies; devices beyond take them in turn")
    ap.add_argument("--window-s", type=float, default=60.0,
                    help="a device's window period, for devices carried and bytes per day")
    ap.add_argument("--backlog-s", type=float, default=2.0,
                    help="--max: keep this many seconds of the stored rate queued ahead")
    ap.add_argument("--max-lag-s", type=float, default=3.0,
                    help="at a rate: stop publishing once the store is this many seconds of "
                         "the offered load behind")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="seconds to wait for the store after publishing ended")
    ap.add_argument("--broker-inflight", type=int, default=2000,
                    help="Mosquitto's max_inflight_messages: the unacknowledged messages a "
                         "listener may hold. A listener acknowledges after its commit, so "
                         "a batch (group commit) can never be larger than this")
    ap.add_argument("--prefix", default=DEFAULT_PREFIX)
    ap.add_argument("--show-logs", action="store_true",
                    help="print each listener's last output lines after each scenario")
    ap.add_argument("--listen-arg", action="append", default=[], metavar="ARGS",
                    help="extra `toolchain listen` options, e.g. --listen-arg='--batch-max 500'")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.rate <= 0 or args.publishers < 1 or args.listeners < 1:
        ap.error("--duration, --rate, --publishers and --listeners must be positive")
    if args.devices is not None and args.devices < 1:
        ap.error("--devices must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = scenarios(args)
    if any(s.store == "postgresql" for s in plan):
        why = postgres_reachable(args.pg_url)
        if why:
            print(f"fleet_sim: PostgreSQL at {args.pg_url} unreachable ({why}); skipping its "
                  f"scenarios", file=sys.stderr)
            plan = [s for s in plan if s.store != "postgresql"]
    results = []
    print_header(args)
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
        n_bodies = max(1, min(args.bodies, max(s.devices for s in plan)))
        print(f"[sim] building {n_bodies} window bodies", file=sys.stderr, flush=True)
        bodies_file = Path(tmp) / "bodies.json"
        bodies_file.write_text(json.dumps(window_bodies(n_bodies)))
        for i, sc in enumerate(plan):
            print(f"[sim] {sc.name}: {sc.describe(args.window_s)}", file=sys.stderr, flush=True)
            try:
                r = run_scenario(sc, args, bodies_file, Path(tmp) / f"{i}-{sc.name}")
            except SimError as exc:
                print(f"fleet_sim: {sc.name} failed: {exc}", file=sys.stderr)
                return 1
            results.append(r)
            print_scenario(r, sc, args)
            sys.stdout.flush()
    conclude(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["exactly_once"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
