"""The listener's store and rules, on SQLite and on PostgreSQL (one schema for both): writes
are idempotent, a rule fires once per episode and clears. PostgreSQL runs where a server
answers at $EDGEPACK_TEST_POSTGRES (default: the local one on 127.0.0.1:5432)."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from runtime.protocol import SCHEMA_VERSION
from toolchain.errors import UsageError
from toolchain.fleet.rules import DEFAULT_RULES, Rule, evaluate, load_rules, streak_breaches
from toolchain.fleet.store import open_store

PG_URL = os.environ.get("EDGEPACK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/fleet.db")
        yield s
        s.close()
        return
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL at {PG_URL}: {exc}")
    name = f"edgepack_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE DATABASE {name}")
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    s = open_store(url)
    yield s
    s.close()
    admin.execute(f"DROP DATABASE {name}")
    admin.close()


def window(device: str, seq: int, score: float, version: str = "1", p95: float = 1.0) -> dict:
    return {"schema": SCHEMA_VERSION, "kind": "window", "device_id": device, "seq": seq,
            "bundle": {"sha256": "ab" * 32, "model": "demo", "version": version,
                       "profile": "smart-speaker", "backend": "litert"},
            "time": {"wall": 1000.0 + seq, "mono": float(seq), "boot": "b"},
            "body": {"count": 100, "errors": 0, "error_rate": 0.0,
                     "latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95 * 1.2},
                     "budgets": {"p95_latency_ms": 25.0},
                     "window": {"start_wall": 999.0 + seq, "end_wall": 1000.0 + seq},
                     "drift": {"available": True, "score": score, "input_psi": score,
                               "class_psi": 0.01}}}


def ingest(store, msg, rules):
    return store.ingest(msg, msg["time"]["wall"], rules)


def test_duplicates_are_stored_once(store):
    assert ingest(store, window("d1", 1, 0.0), DEFAULT_RULES)[0] is True
    assert ingest(store, window("d1", 1, 0.0), DEFAULT_RULES)[0] is False
    assert ingest(store, window("d2", 1, 0.0), DEFAULT_RULES)[0] is True
    assert store.counts() == {"messages": 2, "windows": 2}


def test_rule_needs_k_windows_on_m_devices_fires_once_and_clears(store):
    rule = Rule("drift", "drift_score", above=0.25, consecutive=2, min_devices=2)
    rules = (rule,)
    fired = []
    for seq, (d, score) in enumerate([("a", 0.9), ("a", 0.9), ("b", 0.9)], start=1):
        fired += ingest(store, window(d, seq, score), rules)[1]
    assert fired == []  # a breaches twice, b only once: one device is not enough
    fired = ingest(store, window("b", 10, 0.9), rules)[1]
    assert [t.kind for t in fired] == ["fired"] and fired[0].devices == ["a", "b"]
    assert ingest(store, window("a", 11, 0.9), rules)[1] == []  # active: not again
    # another model version is another scope
    assert ingest(store, window("c", 1, 0.9, version="2"), rules)[1] == []
    cleared = ingest(store, window("a", 12, 0.1), rules)[1]
    assert [t.kind for t in cleared] == ["cleared"]
    assert ingest(store, window("a", 13, 0.9), rules)[1] == []  # one window is not K
    again = ingest(store, window("a", 14, 0.9), rules)[1]
    assert [t.kind for t in again] == ["fired"]
    rows = store.triggers()
    assert len(rows) == 2 and sum(r["cleared_at"] is None for r in rows) == 1
    assert rows[0]["devices"] == ["a", "b"] and rows[0]["detail"]["scope"] == "demo@1"


def test_windows_without_the_metric_neither_extend_nor_break_a_streak(store):
    rules = (Rule("drift", "drift_score", above=0.25, consecutive=2),)
    no_drift = window("a", 2, 0.0)
    del no_drift["body"]["drift"]  # too few inferences for drift
    assert ingest(store, window("a", 1, 0.9), rules)[1] == []
    assert ingest(store, no_drift, rules)[1] == []
    fired = ingest(store, window("a", 3, 0.9), rules)[1]
    assert [t.kind for t in fired] == ["fired"]
    assert ingest(store, window("a", 3, 0.9), rules) == (False, [])  # a duplicate: no rules
    store.record_command_result(fired[0].trigger_id, 7, "retrained")
    (row,) = store.triggers()
    assert row["command_rc"] == 7


def test_latency_rule_uses_the_bundle_budget(store):
    rules = (Rule("slow", "p95_ms", above="budget", consecutive=1),)
    assert ingest(store, window("d", 1, 0.0, p95=20.0), rules)[1] == []
    fired = ingest(store, window("d", 2, 0.0, p95=30.0), rules)[1]
    assert fired and fired[0].detail["threshold"] == 25.0


def test_rules_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "r.toml"
    for text, message in [
        ("", r"no \[\[rule\]\]"),
        ('[[rule]]\nname = "x"\nmetric = "p95_ms"\n', "exactly one of above"),
        ('[[rule]]\nname = "x"\nmetric = "drift_score"\nabove = "budget"\n', "latency"),
        ('[[rule]]\nname = "x"\nmetric = "drift_score"\nabove = 1\nconsecutive = 0\n',
         "consecutive"),
        ('[[rule]]\nname = "x"\nmetric = "drift_score"\nabove = 1\nspeed = 2\n', "unknown key"),
        ("[[rule]\n", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(UsageError, match=message):
            load_rules(path)
    path.write_text('[[rule]]\nname = "x"\nmetric = "input_ks_p"\nbelow = 0.001\n'
                    'command = "toolchain build --target smart-speaker"\n')
    (rule,) = load_rules(path)
    assert rule.command == ("toolchain", "build", "--target", "smart-speaker")
    assert rule.breaches({"input_ks_p": 1e-5}) and not rule.breaches({"input_ks_p": 0.5})


# -- the rules as pure functions over rows: no database ---------------------------------------
DRIFT = Rule("drift", "drift_score", above=0.25, consecutive=3, min_devices=2)


def _row(device: str, score: float | None) -> dict:
    return {"device_id": device, "model": "demo", "model_version": "1", "drift_score": score,
            "budget_p95_ms": None}


def test_a_streak_needs_k_windows_with_the_metric():
    hot, cold, gap = _row("a", 0.9), _row("a", 0.1), _row("a", None)
    assert streak_breaches(DRIFT, [hot, hot, hot])
    assert not streak_breaches(DRIFT, [hot, hot])  # fewer than K
    assert not streak_breaches(DRIFT, [hot, cold, hot])  # broken
    assert streak_breaches(DRIFT, [hot, gap, hot, gap, gap, hot])  # gaps do not count
    assert not streak_breaches(DRIFT, [hot, gap, hot, cold, hot])  # K = the newest three


def test_evaluate_fires_on_m_devices_once_and_clears():
    hot = [_row("b", 0.9)] * 3
    alone = evaluate(DRIFT, hot[0], hot, [], active=False)
    assert (alone.breaching, alone.devices, alone.action) == (True, ["b"], None)
    fire = evaluate(DRIFT, hot[0], hot, ["a"], active=False)
    assert (fire.breaching, fire.devices, fire.action) == (True, ["a", "b"], "fire")
    assert fire.detail["scope"] == "demo@1" and fire.detail["threshold"] == 0.25
    assert fire.detail["latest_value"] == 0.9 and fire.detail["devices"] == ["a", "b"]
    assert evaluate(DRIFT, hot[0], hot, ["a", "b"], active=True).action is None  # once
    # b's earlier breach does not count once its newest window is cool
    cool = [_row("b", 0.1), *hot]
    clear = evaluate(DRIFT, cool[0], cool, ["a", "b"], active=True)
    assert (clear.breaching, clear.devices, clear.action) == (False, ["a"], "clear")
    assert evaluate(DRIFT, cool[0], cool, ["a", "b"], active=False).action is None


# -- device summaries, migration, retention, the report --------------------------------------
def at(msg: dict, end_wall: float) -> dict:
    """`msg` with its window ending at `end_wall`."""
    msg["body"]["window"] = {"start_wall": end_wall - 60, "end_wall": end_wall}
    return msg


def event(device: str, seq: int) -> dict:
    return {"schema": SCHEMA_VERSION, "kind": "event", "device_id": device, "seq": seq,
            "bundle": {"sha256": "ab" * 32, "model": "demo", "version": "1"},
            "time": {"wall": 1000.0 + seq, "mono": float(seq), "boot": "b"},
            "body": {"event": "model_loaded"}}


SUMMARY = ("messages", "min_seq", "max_seq", "windows", "inferences", "errors",
           "spool_dropped", "latest_seq", "latest_p95_ms", "latest_drift_score",
           "latest_end_wall", "retained_seq")


def summaries(store) -> dict:
    return {d["device_id"]: {k: d[k] for k in SUMMARY} for d in store.devices()}


def test_summaries_take_out_of_order_and_duplicate_messages(store):
    for seq in (3, 1, 6, 2):
        ingest(store, window("a", seq, 0.1 * seq, p95=float(seq)), ())
    ingest(store, event("a", 4), ())
    assert ingest(store, window("a", 3, 0.9, p95=99.0), ())[0] is False  # a duplicate
    assert ingest(store, window("a", 2, 0.9, p95=99.0), ())[0] is False
    s = summaries(store)["a"]
    assert s == {"messages": 5, "min_seq": 1, "max_seq": 6, "windows": 4, "inferences": 400,
                 "errors": 0, "spool_dropped": 0, "latest_seq": 6, "latest_p95_ms": 6.0,
                 "latest_drift_score": pytest.approx(0.6), "latest_end_wall": 1006.0,
                 "retained_seq": 0}
    # a batch: several messages of one device, out of order, in one call
    from toolchain.fleet.store import message_rows

    batch = [message_rows(m, 5000.0) for m in (window("b", 9, 0.2, p95=9.0), event("b", 2),
                                                window("b", 1, 0.1, p95=1.0),
                                                window("b", 5, 0.3, p95=5.0))]
    with store._transaction() as cur:
        for message, _device, _row in batch:
            cur.execute("INSERT INTO messages (device_id, seq, kind, bundle_sha256, model,"
                        " model_version, wall_time, received_at, payload) VALUES"
                        " (?, ?, ?, ?, ?, ?, ?, ?, ?)", message)
        store._touch_device(cur, batch[0][1])
        store.update_device_summaries(cur, [b[0] for b in batch],
                                      [b[2] for b in batch if b[2] is not None])
    b = summaries(store)["b"]
    assert (b["messages"], b["min_seq"], b["max_seq"], b["windows"], b["latest_seq"],
            b["latest_p95_ms"]) == (4, 1, 9, 3, 9, 9.0)
    (v,) = store.versions()
    assert (v["devices"], v["windows"], v["inferences"]) == (2, 7, 700)
    assert v["mean_p95_ms"] == pytest.approx((1 + 2 + 3 + 6 + 9 + 1 + 5) / 7)


def test_summaries_saturate_instead_of_overflowing(store):
    from runtime.protocol import MAX_INT

    for seq in (1, 2):
        msg = window("a", seq, 0.1, p95=1e300)
        msg["body"]["count"] = MAX_INT
        ingest(store, msg, ())
    s = summaries(store)["a"]
    assert s["inferences"] == MAX_INT and s["latest_p95_ms"] == 1e300
    (v,) = store.versions()
    assert v["inferences"] == MAX_INT and v["mean_p95_ms"] == pytest.approx(1e12)


def test_an_old_store_gets_its_summaries_backfilled(store, monkeypatch):
    from toolchain.fleet import store as store_module
    from toolchain.fleet.store import DEVICE_SUMMARY_COLUMNS, open_store

    monkeypatch.setattr(store_module, "BACKFILL_CHUNK", 2)  # read and write in turns

    for device, seqs in (("a", (1, 2, 5)), ("b", (2, 1))):
        for seq in seqs:
            ingest(store, at(window(device, seq, 0.1 * seq, p95=float(seq)), 7200.0 * seq), ())
    ingest(store, event("a", 3), ())
    before, versions, trend = summaries(store), store.versions(), store.fleet_trend(0, 1e9)
    # what a store written before the summaries looks like: no columns, no rollup table
    with store._transaction() as cur:
        for name, _ in DEVICE_SUMMARY_COLUMNS:
            cur.execute(f"ALTER TABLE devices DROP COLUMN {name}")
        cur.execute("DROP TABLE fleet_hourly")
    store.close()
    again = open_store(store.url)
    try:
        assert summaries(again) == before
        assert again.versions() == versions and again.fleet_trend(0, 1e9) == trend
        # the hours of the windows' end times (seq 1, 2, 5 at 2 h each)
        assert [h["hour_start"] for h in trend] == [7200.0, 14400.0, 36000.0]
    finally:
        again.close()


@pytest.mark.parametrize("page", [500, 2])  # 2: a device read in several pages per chunk
def test_retention_rolls_windows_up_per_device_and_hour_in_chunks(store, page, monkeypatch):
    from toolchain.fleet import store as store_module

    monkeypatch.setattr(store_module, "RETENTION_PAGE", page)
    rules = (Rule("drift", "drift_score", above=0.25, consecutive=1),)
    t0 = 36_000.0  # an hour's start
    for seq in range(1, 8):  # a: 7 windows over two hours, received as they end
        msg = at(window("a", seq, 0.1 * seq, p95=float(seq)), t0 + 1200 * (seq - 1))
        store.ingest(msg, t0 + 1200 * (seq - 1) + 5, rules)
    store.ingest(event("a", 8), t0 + 100)
    store.ingest(at(window("b", 1, 0.0), t0 + 9000), t0 + 9005)
    before, versions = summaries(store), store.versions()
    done = store.apply_retention(keep_raw_s=3600, now=t0 + 3 * 3600, chunk=3)
    # received before t0 + 2 h: a's seqs 1-6, not a7 (t0 + 7205) nor b1; a's event 8 came
    # early (t0 + 100) but a device's messages go in seq order: it waits for a7
    assert (done["messages"], done["windows"], done["chunks"]) == (6, 6, 2)
    assert sorted(store.message_seqs("a")) == [7, 8] and store.message_seqs("b") == [1]
    rows = {r["hour_start"]: r for r in store._rows(
        "SELECT * FROM windows_hourly WHERE device_id = 'a' ORDER BY hour_start")}
    assert sorted(rows) == [t0, t0 + 3600]
    first = rows[t0]  # seqs 1, 2, 3 (ends at +0, +1200, +2400)
    assert (first["windows"], first["inferences"], first["first_seq"], first["last_seq"]) == (
        3, 300, 1, 3)
    assert first["p95_sum"] / first["p95_n"] == pytest.approx(2.0)
    assert first["p95_max"] == 3.0 and first["drift_max"] == pytest.approx(0.3)
    assert rows[t0 + 3600]["windows"] == 3 and rows[t0 + 3600]["p99_max"] == pytest.approx(7.2)
    # summaries and versions keep counting what was deleted; the seqs stay taken
    after = summaries(store)
    assert after["a"] == {**before["a"], "retained_seq": 6} and after["b"] == before["b"]
    assert store.versions() == versions
    assert store.retained_below(["a", "b", "nobody"]) == {"a": 6, "b": 0}
    series = store.device_series("a", 0)
    assert [p["hourly"] for p in series] == [True, True, False]
    assert again_nothing(store, t0)
    # once a7 is due too, it goes with the event behind it
    done = store.apply_retention(keep_raw_s=3600, now=t0 + 7205 + 3601)
    assert (done["messages"], done["windows"]) == (2, 1) and store.message_seqs("a") == []
    assert store.retained_below(["a"]) == {"a": 8} and store.message_seqs("b") == [1]


def again_nothing(store, t0: float) -> bool:
    done = store.apply_retention(keep_raw_s=3600, now=t0 + 3 * 3600)
    return (done["messages"], done["chunks"]) == (0, 0)


def test_report_of_a_large_fleet_lists_who_needs_attention(store):
    from toolchain.fleet.report import SHOWN, render_html, render_text, summarize

    rules = (Rule("slow", "p95_ms", above="budget", consecutive=1),)
    n = SHOWN + 10
    for i in range(n):
        dev = f"dev-{i:03d}"
        for seq in (1, 2):
            p95 = 30.0 if (i == 7 and seq == 2) else 1.0 + i / 100
            score = 0.5 if i == 20 else 0.005 * i
            ingest(store, at(window(dev, seq, score, p95=p95), 50_000.0 + 60 * seq), rules)
    ingest(store, at(window("dev-011", 5, 0.0), 50_300.0), rules)  # seqs 3 and 4 missing
    store.set_status({"device_id": "dev-003", "kind": "status", "seq": 0,
                      "bundle": {"model": "demo", "version": "1"},
                      "time": {"wall": 50_500.0}, "body": {"state": "offline"}})
    s = summarize(store)
    assert len(s["devices"]) == n and s["totals"]["windows"] == 2 * n + 1
    by_id = {d["device_id"]: d for d in s["devices"]}
    assert by_id["dev-011"]["sequence_gaps"] == 2 and by_id["dev-011"]["gap_ranges"] == [[3, 4]]
    assert by_id["dev-007"]["breaching"] == ["slow"] and by_id["dev-007"]["over_budget"]
    assert s["listed"] == ["dev-007", "dev-020", "dev-011", "dev-003"]  # most urgent first
    assert s["worst"]["p95_ms"][0] == {"device_id": "dev-007", "value": 30.0}
    assert [w["device_id"] for w in s["worst"]["drift_score"][:2]] == [
        "dev-020", f"dev-{n - 1:03d}"]
    assert [h["windows"] for h in s["trend"]["per_hour"]] == [2 * n + 1]
    text = render_text(s)
    assert "dev-007" in text and "breaching slow" in text and "dev-012" not in text
    assert "demo@1: 30 device(s), 61 windows" in text
    everyone = render_text(summarize(store, shown=None))
    assert all(f"dev-{i:03d}" in everyone for i in range(n))
    page = render_html(s)
    assert page.count("<svg") == 4 and "dev-007" in page and "dev-012" not in page.split(
        "<h2>Devices")[1]
    assert len(s["series"]["dev-007"]) == 2


def test_retain_command_line(tmp_path):
    from click.testing import CliRunner

    from toolchain.cli import cli
    from toolchain.cli.fleet import parse_duration

    assert [parse_duration(t) for t in ("90m", "36h", "7d", "1.5h", "2w", "45s")] == [
        5400, 129600, 604800, 5400, 1209600, 45]
    url = f"sqlite:///{tmp_path}/fleet.db"
    s = open_store(url)
    ingest(s, window("a", 1, 0.0), ())
    s.close()
    runner = CliRunner()
    for bad in ("7x", "0d", "-1h", "h", "", "nanh", "infd", "1e300d", "7 d", "7"):
        result = runner.invoke(cli, ["fleet", "retain", "--store", url, "--keep-raw", bad])
        assert result.exit_code == 2 and "--keep-raw" in result.output, (bad, result.output)
    missing = runner.invoke(cli, ["fleet", "retain", "--store", f"sqlite:///{tmp_path}/no.db",
                                  "--keep-raw", "1d"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    kept = runner.invoke(cli, ["fleet", "retain", "--store", url, "--keep-raw", "1d"])
    assert kept.exit_code == 0 and "deleted 1 messages (1 windows)" in kept.output
    report = runner.invoke(cli, ["fleet", "--store", url, "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)["totals"]["windows"] == 1  # still counted
    assert runner.invoke(cli, ["fleet", "--store", url, "--devices", "x"]).exit_code == 2


def test_the_large_store_reads_use_their_indices(store):
    """EXPLAIN (QUERY PLAN) of each read that must stay cheap names the index meant for it.
    PostgreSQL is told to avoid sequential scans: these tables are tiny here, and a planner
    rightly scans a tiny table; what matters is that the index can serve the query."""
    from toolchain.fleet import store as st

    pg = store.placeholder != "?"
    cases = [(st.RETENTION_SELECT, ("a", 0, 10), "messages_pkey" if pg
              else "sqlite_autoindex_messages_1"),
             (st.FLEET_TREND, (0.0, 1e9), "fleet_hourly_hour"),
             (st.DEVICE_HOURLY, ("a", 0.0, 10), "windows_hourly_device"),
             (st.DEVICE_WINDOWS, ("a", 0.0, 10), "windows_pkey" if pg
              else "sqlite_autoindex_windows_1"),
             (st.GAP_RANGES, (0, "a", 0, 10),
              "messages_pkey" if pg else "sqlite_autoindex_messages_1")]
    with store._transaction() as cur:
        if pg:
            cur.execute("SET LOCAL enable_seqscan = off")
        for sql, params, index in cases:
            cur.execute(("EXPLAIN " if pg else "EXPLAIN QUERY PLAN ") + sql, params)
            plan = " | ".join(str(r[-1]) for r in cur.fetchall())
            assert index in plan, (sql, plan)


def test_a_silent_device_fires_the_silence_rule_and_its_next_window_clears_it(store):
    """silence = window periods since the device's last message; the sweep fires and clears
    like the window rules, on SQLite and PostgreSQL."""
    from toolchain.fleet.store import Incoming, RuleCache

    rules = (Rule("silent", "silence", above=3.0, consecutive=1, min_devices=1),
             Rule("gone", "offline_s", above=100.0, consecutive=1, min_devices=1))
    w1 = window("d1", 1, 0.0)
    w1["body"]["window"]["period_s"] = 10.0
    store.ingest_batch([Incoming(w1), Incoming(window("d2", 1, 0.0))], 1000.0, RuleCache(rules))
    assert store.sweep(rules, now=1020.0) == []  # 2 periods of d1: fine; d2 has no period: 60 s
    fired = store.sweep(rules, now=1045.0)
    assert [(t.kind, t.rule.name, t.devices) for t in fired] == [("fired", "silent", ["d1"])]
    assert store.sweep(rules, now=1050.0) == []  # active: fires once
    store.ingest_batch([Incoming(window("d1", 2, 0.0))], 1055.0, RuleCache(rules))
    cleared = store.sweep(rules, now=1056.0)
    assert [(t.kind, t.rule.name) for t in cleared] == [("cleared", "silent")]
    # offline: the status (or the broker's last will) says so; seconds since then
    status = {**window("d2", 2, 0.0), "kind": "status", "body": {"state": "offline",
                                                                   "reason": "connection lost"}}
    store.set_status(status)
    gone = store.sweep(rules, now=time.time() + 200)
    assert ("fired", "gone", ["d2"]) in [(t.kind, t.rule.name, t.devices) for t in gone]


def test_sweep_metrics_take_no_streak(tmp_path):
    bad = tmp_path / "rules.toml"
    bad.write_text('[[rule]]\nname = "s"\nmetric = "silence"\nabove = 3\nconsecutive = 2\n')
    with pytest.raises(UsageError, match="leave out consecutive"):
        load_rules(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text('[[rule]]\nname = "s"\nmetric = "silence"\nabove = 3\n')
    assert load_rules(ok)[0].consecutive == 1


def test_an_old_store_drops_the_indices_ingest_no_longer_pays_for(store):
    from toolchain.fleet.store import RETIRED_INDEXES

    with store._transaction() as cur:
        cur.execute("CREATE INDEX windows_device_end ON windows (device_id, end_wall)")
        cur.execute("CREATE INDEX messages_device_received ON messages (device_id, received_at)")
    store.init_schema()
    pg = store.placeholder != "?"
    names = {r["name"] for r in store._rows(
        "SELECT indexname AS name FROM pg_indexes" if pg
        else "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert not names & set(RETIRED_INDEXES) and "fleet_hourly_hour" in names


# -- feedback and shadow runs: window columns, rule metrics, abandoned scopes ---------------
def closing_the_loop(msg: dict, labels: int = 10, correct: int = 7) -> dict:
    """`msg` with the window sections of feedback, a shadow run and the mean confidence."""
    msg["body"]["output"] = {"confidence_mean": 0.83}
    msg["body"]["feedback"] = {"count": labels, "correct": correct,
                               "accuracy": correct / labels}
    msg["body"]["shadow"] = {
        "candidate": {"sha256": "cd" * 32, "model": "demo", "version": "2"}, "count": 40,
        "dropped": 1, "errors": 0, "agreement": 0.9,
        "latency_ms": {"p50": 1.5, "p95": 3.0, "p99": 4.0}, "confidence_mean": 0.91,
        "feedback": {"count": 8, "accuracy": 0.875, "served_accuracy": 0.625}}
    return msg


LOOP_COLUMNS = {"confidence_mean": 0.83, "feedback_count": 10, "feedback_correct": 7,
                "accuracy": 0.7, "shadow_sha256": "cd" * 32, "shadow_version": "2",
                "shadow_count": 40, "shadow_agreement": 0.9, "shadow_p50_ms": 1.5,
                "shadow_p95_ms": 3.0, "shadow_confidence_mean": 0.91, "shadow_errors": 0,
                "shadow_feedback_count": 8, "shadow_accuracy": 0.875,
                "shadow_served_accuracy": 0.625}


def test_feedback_and_shadow_sections_land_in_their_columns_on_both_paths(store):
    """The listener's validated path and the checked path (Store.ingest) write the same
    columns; a window without the sections has no labels and no shadow run."""
    from runtime import protocol
    from toolchain.fleet.listener import Listener, ListenerOptions
    from toolchain.fleet.subscriber import Message

    ingest(store, closing_the_loop(window("slow", 1, 0.0)), ())
    msg = closing_the_loop(window("fast", 1, 0.0))
    lis = Listener(ListenerOptions(protocol_broker(), listener_id="t"), store, ())
    lis.process([Message(protocol.topic("edgepack", "fast", "telemetry"),
                         json.dumps(msg).encode(), 0)])
    lis.process([Message(protocol.topic("edgepack", "fast", "telemetry"),
                         json.dumps(window("fast", 2, 0.0)).encode(), 0)])
    for device in ("slow", "fast"):
        row = store.recent_windows(device, 2)[-1]
        assert {k: row[k] for k in LOOP_COLUMNS} == LOOP_COLUMNS, device
    plain = store.recent_windows("fast", 1)[0]
    assert plain["feedback_count"] == 0 and plain["feedback_correct"] == 0
    assert all(plain[k] is None for k in LOOP_COLUMNS if not k.startswith("feedback_"))


def protocol_broker():
    from runtime.mqtt import BrokerConfig

    return BrokerConfig.from_url("mqtt://127.0.0.1:1")  # never connected to


def test_an_old_store_gets_the_new_window_columns(store):
    from toolchain.fleet.store import ADDED_WINDOW_COLUMNS, open_store

    ingest(store, window("a", 1, 0.1), ())
    with store._transaction() as cur:  # a store of the release before feedback
        for name, _ in ADDED_WINDOW_COLUMNS:
            cur.execute(f"ALTER TABLE windows DROP COLUMN {name}")
    store.close()
    again = open_store(store.url)
    try:
        (old,) = again.recent_windows("a", 1)
        assert {name: old[name] for name, _ in ADDED_WINDOW_COLUMNS} == dict.fromkeys(
            (name for name, _ in ADDED_WINDOW_COLUMNS))
        ingest(again, closing_the_loop(window("a", 2, 0.1)), ())
        new = again.recent_windows("a", 1)[0]
        assert {k: new[k] for k in LOOP_COLUMNS} == LOOP_COLUMNS
    finally:
        again.close()


def test_accuracy_counts_for_a_rule_only_over_five_labels_or_more(store):
    """A window with fewer than 5 labels neither extends nor breaks an accuracy streak."""
    rules = (Rule("accuracy", "accuracy", below=0.5, consecutive=2),)

    def labelled(seq: int, labels: int, correct: int) -> dict:
        return closing_the_loop(window("a", seq, 0.0), labels, correct)

    assert ingest(store, labelled(1, 10, 2), rules)[1] == []
    assert ingest(store, labelled(2, 4, 4), rules)[1] == []  # 4 labels: not counted
    assert ingest(store, window("a", 3, 0.0), rules)[1] == []  # no labels at all
    fired = ingest(store, labelled(4, 20, 5), rules)[1]
    assert [t.kind for t in fired] == ["fired"]
    assert fired[0].detail["latest_value"] == 0.25
    assert ingest(store, labelled(5, 3, 0), rules)[1] == []  # too few to clear it either
    cleared = ingest(store, labelled(6, 10, 9), rules)[1]
    assert [t.kind for t in cleared] == ["cleared"]
    # the other new metrics are plain window metrics
    agree = (Rule("agree", "shadow_agreement", below=0.95, consecutive=1),
             Rule("unsure", "confidence_mean", below=0.9, consecutive=1, min_devices=1))
    fired = ingest(store, closing_the_loop(window("b", 1, 0.0)), agree)[1]
    assert sorted(t.rule.name for t in fired) == ["agree", "unsure"]


def test_the_sweep_clears_the_alarm_of_a_version_no_device_runs_any_more(store):
    """A fleet moved to v2 leaves no v1 alarm standing: the sweep clears the trigger of a
    scope no device's latest message is of, and says why; devices still on a scope keep
    its alarm."""
    from toolchain.fleet.store import Incoming, RuleCache

    rules = (Rule("drift", "drift_score", above=0.25, consecutive=1),)
    fired = []
    for device in ("a", "b"):
        fired += ingest(store, window(device, 1, 0.9), rules)[1]
    assert [t.scope for t in fired] == ["demo@1"]
    store.ingest_batch([Incoming(window("a", 2, 0.0, version="2"))], 1000.0, RuleCache(rules))
    assert store.sweep(rules) == []  # b still runs demo@1
    store.ingest_batch([Incoming(window("b", 2, 0.0, version="2"))], 1000.0, RuleCache(rules))
    (cleared,) = store.sweep(rules)
    assert (cleared.kind, cleared.rule.name, cleared.scope) == ("cleared", "drift", "demo@1")
    assert cleared.detail["reason"] == "no device runs demo@1 any more"
    (row,) = store.triggers()
    assert row["cleared_at"] is not None
    assert row["detail"]["cleared_because"] == "no device runs demo@1 any more"
    assert store.breaching() == {}
    assert store.sweep(rules) == []  # cleared once
    # a device back on v1 starts its streak afresh: the rule fires again on its own window
    fired = ingest(store, window("a", 3, 0.9), rules)[1]
    assert [t.kind for t in fired] == ["fired"]
