"""The listener's store and rules, on SQLite and on PostgreSQL (one schema for both): writes
are idempotent, a rule fires once per episode and clears. PostgreSQL runs where a server
answers at $EDGEPACK_TEST_POSTGRES (default: the local one on 127.0.0.1:5432)."""

from __future__ import annotations

import os
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
