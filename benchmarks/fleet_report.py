"""How long `toolchain fleet` takes on a large store, measured on this machine.

Builds a synthetic store of N devices x H hours (a window every --period seconds per device,
ending now) straight through the store's SQL: bulk inserts into messages and windows, device
by device in key order (the secondary indices dropped during the load and rebuilt by the
store's own schema afterwards),
and the device summaries and fleet rollup through `Store.update_device_summaries`, as ingest
keeps them. The listener is not the subject here. A few devices misbehave: sequence gaps,
p95 over budget, drift, offline, a breaching rule. Then times `toolchain fleet` as a user
runs it (a fresh process: text, --json, --html; best and worst of --runs), and optionally
`toolchain fleet retain` and the report after it.

Message payloads are a short placeholder (the report never reads them; a real window message
is about 1.6 KB), so the store is smaller than a real one of the same shape.

    .venv/bin/python benchmarks/fleet_report.py [--devices 10000] [--hours 24] [--period 60]
        [--store sqlite:///PATH | --store postgresql://postgres@127.0.0.1:5432/test]
        [--retain 12h] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toolchain.fleet.store import SCHEMA, WINDOW_COLUMNS, _Cursor, open_store  # noqa: E402

PAYLOAD = '{"kind":"window","synthetic":true}'
SECONDARY = [s.split()[5] for s in SCHEMA if s.startswith("CREATE INDEX")]


def build(url: str, devices: int, hours: float, period: float, seed: int = 7) -> dict:
    """The synthetic store; returns what it holds and how long the load took."""
    rng = random.Random(seed)
    store = open_store(url)
    if url.startswith("sqlite"):  # for the load only: a large page cache, no fsync
        store.conn.execute("PRAGMA cache_size = -1000000")
        store.conn.execute("PRAGMA synchronous = OFF")
    with store._transaction() as cur:
        for name in SECONDARY:  # a bulk load is faster without them; init_schema rebuilds
            cur.execute(f"DROP INDEX IF EXISTS {name}")
    now = time.time()
    steps = int(hours * 3600 // period)
    ids = [f"dev-{i:05d}" for i in range(devices)]
    slow = set(rng.sample(ids, max(1, devices // 200)))  # p95 over budget from mid-day
    drifting = set(rng.sample(ids, max(1, devices // 200)))
    gappy = set(rng.sample(ids, max(1, devices // 500)))  # lose one window in 50
    offline = set(rng.sample(ids, max(1, devices // 100)))
    version = {d: "2" if i % 10 == 0 else "1" for i, d in enumerate(ids)}
    t0 = time.perf_counter()
    with store._transaction() as cur:
        cur.executemany(
            "INSERT INTO devices (device_id, state, last_seen, bundle_sha256, model,"
            " model_version, profile, backend) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(d, "offline" if d in offline else "online", now, "ab" * 32, "kws",
              version[d], "smart-speaker", "litert") for d in ids])
        cur.executemany("INSERT INTO rule_state (rule, scope, device_id, breaching, value,"
                        " updated_at) VALUES ('slow', ?, ?, 1, 30.0, ?)",
                        [(f"kws@{version[d]}", d, now) for d in sorted(slow)])
    windows = messages = 0
    cols = ", ".join(WINDOW_COLUMNS)
    marks = ", ".join("?" * len(WINDOW_COLUMNS))
    per_chunk = max(1, 100_000 // steps)  # devices per transaction
    # device by device, each in seq order: rows arrive in primary-key order, so the load
    # appends to the B-trees instead of touching a page per row (a bulk load's privilege)
    for first in range(0, devices, per_chunk):
        msgs, wins = [], []
        for d in ids[first:first + per_chunk]:
            for step in range(steps):
                if d in gappy and rng.random() < 0.02:
                    continue  # never arrived
                end = now - (steps - 1 - step) * period
                late = step > steps // 2
                p50 = rng.lognormvariate(-1.5, 0.2)
                p95 = p50 * (8.0 if d in slow and late else 1.8)
                drift = rng.random() * 0.05 + (0.4 if d in drifting and late else 0.0)
                wins.append({
                    "device_id": d, "seq": step + 1, "model": "kws",
                    "model_version": version[d], "bundle_sha256": "ab" * 32,
                    "profile": "smart-speaker", "start_wall": end - period, "end_wall": end,
                    "count": 1000, "errors": 0, "error_rate": 0.0, "p50_ms": p50,
                    "p95_ms": p95, "p99_ms": p95 * 1.3, "throughput": 1000 / period,
                    "budget_p95_ms": 1.0, "drift_score": drift, "input_psi": drift,
                    "class_psi": drift / 2, "confidence_psi": 0.01, "input_ks_p": 0.5,
                    "confidence_ks_p": 0.5, "spool_dropped": 0})
                msgs.append((d, step + 1, "window", "ab" * 32, "kws", version[d], end,
                             end + 1.0, PAYLOAD))
        with store._transaction() as cur:
            cur.executemany("INSERT INTO messages (device_id, seq, kind, bundle_sha256, model,"
                            " model_version, wall_time, received_at, payload) VALUES"
                            " (?, ?, ?, ?, ?, ?, ?, ?, ?)", msgs)
            cur.executemany(f"INSERT INTO windows ({cols}) VALUES ({marks})",
                            [[w[c] for c in WINDOW_COLUMNS] for w in wins])
            store.update_device_summaries(cur, msgs, wins)
        windows += len(wins)
        messages += len(msgs)
        if (first // per_chunk) % max(1, devices // per_chunk // 10) == 0:
            print(f"  ... {min(first + per_chunk, devices)}/{devices} devices, {windows} windows, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    store.init_schema()  # the indices, rebuilt
    index_s = time.perf_counter() - t1
    if url.startswith("postgresql"):
        with store._transaction() as cur:
            cur.execute("ANALYZE")
    store.close()
    return {"windows": windows, "messages": messages, "load_s": load_s, "index_s": index_s}


def summary_cost(url: str, devices: int, batch: int = 500, rounds: int = 20) -> str:
    """What update_device_summaries adds to a batch transaction on this store: batches of
    `batch` window messages from random devices, the same inserts with and without it,
    rounds interleaved; median CPU microseconds per message (of this process: SQLite runs
    in it, PostgreSQL does not). Each batch is rolled back, so the commit is not in it."""
    import statistics

    rng = random.Random(11)
    store = open_store(url)
    with store._transaction() as cur:
        cur.execute("SELECT MAX(seq) FROM messages")
        seq = int(cur.fetchone()[0] or 0) + 1_000_000  # above every stored seq
    cols = ", ".join(WINDOW_COLUMNS)
    marks = ", ".join("?" * len(WINDOW_COLUMNS))
    cost: dict[bool, list[float]] = {False: [], True: []}
    for r in range(2 * rounds):
        with_summaries = r % 2 == 1
        msgs, wins = [], []
        now = time.time()
        for _ in range(batch):
            d = f"dev-{rng.randrange(devices):05d}"
            seq += 1
            wins.append({c: None for c in WINDOW_COLUMNS} | {
                "device_id": d, "seq": seq, "model": "kws", "model_version": "1",
                "end_wall": now, "count": 1000, "errors": 0, "p50_ms": 0.2, "p95_ms": 0.4,
                "p99_ms": 0.5, "drift_score": 0.01, "spool_dropped": 0})
            msgs.append((d, seq, "window", "ab" * 32, "kws", "1", now, now, PAYLOAD))
        cur = _Cursor(store.conn.cursor(), store._sql)
        t = time.process_time()  # CPU: this machine is shared, wall time is noise
        cur.executemany("INSERT INTO messages (device_id, seq, kind, bundle_sha256, model,"
                        " model_version, wall_time, received_at, payload) VALUES"
                        " (?, ?, ?, ?, ?, ?, ?, ?, ?)", msgs)
        cur.executemany(f"INSERT INTO windows ({cols}) VALUES ({marks})",
                        [[w[c] for c in WINDOW_COLUMNS] for w in wins])
        if with_summaries:
            store.update_device_summaries(cur, msgs, wins)
        cost[with_summaries].append((time.process_time() - t) / batch * 1e6)
        store.conn.rollback()  # measured, not kept: the store stays as built
    store.close()
    base, full = statistics.median(cost[False]), statistics.median(cost[True])
    return (f"{base:.0f} us CPU/message inserting, {full:.0f} with update_device_summaries "
            f"(+{full - base:.0f} us; batches of {batch}, medians of {rounds}; this process's "
            "CPU only, PostgreSQL's own is not in it)")


def plans(url: str) -> list[tuple[str, str]]:
    """How the database runs the store's large-store reads, on this store (no hints)."""
    from toolchain.fleet import store as st

    store = open_store(url)
    pg = store.placeholder != "?"
    now, out = time.time(), []
    cases = [("retention chunk", st.RETENTION_SELECT, ("dev-00042", 0, 500)),
             ("fleet trend", st.FLEET_TREND, (now - 24 * 3600, now)),
             ("device hourly", st.DEVICE_HOURLY, ("dev-00042", now - 24 * 3600, 5000)),
             ("device windows", st.DEVICE_WINDOWS, ("dev-00042", now - 24 * 3600, 5000)),
             ("gap ranges", st.GAP_RANGES, (0, "dev-00042", 0, 10))]
    with store._transaction() as cur:
        for name, sql, params in cases:
            cur.execute(("EXPLAIN " if pg else "EXPLAIN QUERY PLAN ") + sql, params)
            lines = [str(r[-1]).strip() for r in cur.fetchall()]
            out.append((f"plan: {name}", " | ".join(
                ln for ln in lines if any(k in ln for k in ("Scan", "SCAN", "SEARCH")))))
    store.close()
    return out


def size_of(url: str) -> int:
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    import psycopg

    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])


def timed(args: list[str], runs: int) -> tuple[float, float, int]:
    """Best and worst wall time of `runs` fresh processes, and the output's size."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times, size = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "toolchain", *args], capture_output=True,
                              text=True, env=env)
        times.append(time.perf_counter() - t)
        if proc.returncode != 0:
            sys.exit(f"toolchain {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
        size = len(proc.stdout)
    return min(times), max(times), size


def report_times(url: str, folder: Path, runs: int) -> dict[str, tuple[float, float, int]]:
    out = {}
    for name, extra in (("text", []), ("--json", ["--json"]),
                        ("--html", ["--html", str(folder / "fleet.html")])):
        out[name] = timed(["fleet", "--store", url, *extra], runs)
    out["--html"] = (*out["--html"][:2], (folder / "fleet.html").stat().st_size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--period", type=float, default=60.0, help="seconds between windows")
    ap.add_argument("--store", default=None, help="default: a SQLite file in a temp folder; "
                    "a postgresql:// URL gets a fresh database, dropped afterwards")
    ap.add_argument("--retain", default=None, help="also time `fleet retain --keep-raw X`")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    a = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fleet-report-"))
    url, admin, dbname = a.store or f"sqlite:///{folder}/fleet.db", None, None
    if url.startswith("postgresql"):
        import psycopg

        admin = psycopg.connect(url, autocommit=True)
        dbname = f"edgepack_bench_{uuid.uuid4().hex[:8]}"
        admin.execute(f"CREATE DATABASE {dbname}")
        url = url.rsplit("/", 1)[0] + f"/{dbname}"
    try:
        print(f"building {a.devices} devices x {a.hours:g} h, a window every {a.period:g} s, "
              f"in {url}", file=sys.stderr)
        built = build(url, a.devices, a.hours, a.period)
        size = size_of(url)
        times = report_times(url, folder, a.runs)
        rows = [("store", url.split(":")[0]), ("devices", a.devices),
                ("hours", f"{a.hours:g}"), ("window period", f"{a.period:g} s"),
                ("windows", built["windows"]), ("messages", built["messages"]),
                ("store size", f"{size / 2**20:.0f} MiB"),
                ("bulk load (summaries included)", f"{built['load_s']:.0f} s"),
                ("index build", f"{built['index_s']:.0f} s")]
        rows += [(f"toolchain fleet {k}", f"{lo:.2f}-{hi:.2f} s ({n / 1024:.0f} KiB out)")
                 for k, (lo, hi, n) in times.items()]
        rows += plans(url)
        rows.append(("summaries at ingest", summary_cost(url, a.devices)))
        if a.retain:
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "toolchain", "fleet", "retain",
                                  "--store", url, "--keep-raw", a.retain], capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            retain_s = time.perf_counter() - t
            if out.returncode != 0:
                sys.exit(out.stderr)
            rows += [(f"toolchain fleet retain --keep-raw {a.retain}", f"{retain_s:.0f} s"),
                     ("  its output", out.stdout.strip()),
                     ("store size after", f"{size_of(url) / 2**20:.0f} MiB")]
            rows += [(f"toolchain fleet {k} after", f"{lo:.2f}-{hi:.2f} s")
                     for k, (lo, hi, _n) in report_times(url, folder, a.runs).items()]
        width = max(len(k) for k, _ in rows)
        print(f"\nfleet report benchmark ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')})")
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        print(json.dumps({k: str(v) for k, v in rows}), file=sys.stderr)
    finally:
        if admin is not None and not a.keep:
            admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        if not a.keep:
            for p in folder.glob("*"):
                p.unlink()
            folder.rmdir()
        else:
            print(f"kept: {url}", file=sys.stderr)


if __name__ == "__main__":
    main()
