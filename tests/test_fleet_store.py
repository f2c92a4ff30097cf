"""The listener's store and rules, on SQLite and on PostgreSQL (one schema for both): writes
are idempotent, a rule fires once per episode and clears. PostgreSQL runs where a server
answers at $EDGEPACK_TEST_POSTGRES (default: the local one on 127.0.0.1:5432)."""

from __future__ import annotations

import os
import uuid

import pytest

from toolchain.errors import UsageError
from toolchain.fleet_store import open_store
from toolchain.rules import DEFAULT_RULES, Rule, evaluate, load_rules

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
    return {"schema": 1, "kind": "window", "device_id": device, "seq": seq,
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
    return store.ingest(msg, after_window=lambda cur, row: evaluate(cur, rules, row, 1.0))


def test_duplicates_are_stored_once(store):
    assert ingest(store, window("d1", 1, 0.0), DEFAULT_RULES)[0] is True
    assert ingest(store, window("d1", 1, 0.0), DEFAULT_RULES)[0] is False
    assert ingest(store, window("d2", 1, 0.0), DEFAULT_RULES)[0] is True
    assert store.query("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 2
    assert store.query("SELECT COUNT(*) AS n FROM windows")[0]["n"] == 2


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
    rows = store.query("SELECT rule, scope, cleared_at FROM triggers ORDER BY fired_at, id")
    assert len(rows) == 2 and sum(r["cleared_at"] is None for r in rows) == 1


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
