"""A rollout's state in the store, on SQLite and PostgreSQL: planning refuses what cannot
work, requests from any process reach the driver through the store, the lease lets one
driver at a time work, and the report and `toolchain rollout status` show it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_fleet_store import store, window  # noqa: F401 - the store fixture
from toolchain.cli import cli
from toolchain.errors import UsageError
from toolchain.fleet import rollout_store as rs
from toolchain.fleet.report import render_text, summarize
from toolchain.fleet.rollout import Candidate, RolloutConfig, bucket, holder_gone, plan


def _fleet(store, n: int = 4, version: str = "1") -> list[str]:  # noqa: F811
    ids = [f"dev-{i}" for i in range(n)]
    for d in ids:
        store.ingest(window(d, 1, 0.01, version=version), 1001.0)
    return ids


def _candidate(version: str = "2") -> Candidate:
    return Candidate(Path("/bundles/v2.edgepack"), "demo", version, "cd" * 32, 25.0)


def test_plan_takes_the_majority_version_and_buckets_every_device(store):  # noqa: F811
    ids = _fleet(store)
    store.ingest(window("odd-one", 1, 0.01, version="0"), 1001.0)
    row = plan(store, _candidate(), RolloutConfig(stages=(50, 100)), bundle_url="/b.edgepack")
    assert row["from_version"] == "1" and row["to_version"] == "2"
    assert row["state"] == "running" and row["stage"] == 0 and row["phase"] == "sending"
    members = rs.rollout_devices(store, row["id"])
    assert {m["device_id"] for m in members} == set(ids)  # the v0 device is not in scope
    assert all(m["role"] == "control" and m["bucket"] == bucket("demo", m["device_id"])
               for m in members)
    assert row["config"]["budget_p95_ms"] == 25.0


def test_offline_devices_are_left_out_and_a_racing_start_is_refused(store):  # noqa: F811
    ids = _fleet(store, 3)
    gone = {**window(ids[0], 2, 0.0), "kind": "status",
            "body": {"state": "offline", "reason": "connection lost"}}
    store.set_status(gone)
    row = plan(store, _candidate(), RolloutConfig(), bundle_url="/b")
    assert {m["device_id"] for m in rs.rollout_devices(store, row["id"])} == set(ids[1:])
    # two `rollout start` racing past the check: the store keeps one unfinished per model
    from toolchain.fleet.store import StoreError

    with pytest.raises(StoreError):
        rs.create(store, {**row, "id": "ro-racer", "config": row["config"]})


@pytest.mark.parametrize("fleet, candidate, problem", [
    (0, "2", "no device in the store runs model 'demo'"),
    (1, "2", "a phased rollout needs at least 2"),
    (4, "1", "nothing to roll out to"),
])
def test_plan_refuses_what_cannot_work(store, fleet, candidate, problem):  # noqa: F811
    _fleet(store, fleet)
    with pytest.raises(UsageError, match=problem):
        plan(store, _candidate(candidate), RolloutConfig(), bundle_url="/b")


def test_one_rollout_at_a_time_per_model(store):  # noqa: F811
    _fleet(store)
    first = plan(store, _candidate(), RolloutConfig(), bundle_url="/b")
    with pytest.raises(UsageError, match=f"rollout {first['id']} of demo is still running"):
        plan(store, _candidate(), RolloutConfig(), bundle_url="/b")
    rs.update(store, first["id"], state="rolled_back")
    plan(store, _candidate(), RolloutConfig(), bundle_url="/b")  # the first one ended


def test_requests_and_the_lease(store):  # noqa: F811
    _fleet(store)
    rid = plan(store, _candidate(), RolloutConfig(), bundle_url="/b")["id"]
    assert rs.request(store, rid, None, state="paused")
    assert rs.get(store, rid)["state"] == "paused"
    assert rs.request(store, rid, "abort")
    assert rs.get(store, rid)["request"] == "abort"
    now = time.time()
    assert rs.take_lease(store, rid, "host-a:1", now + 30) is None
    assert rs.take_lease(store, rid, "host-b:2", now + 30) == "host-a:1"  # held
    assert rs.take_lease(store, rid, "host-b:2", now + 30, holder_gone=True) is None
    rs.update(store, rid, lease_until=now - 1)
    assert rs.take_lease(store, "no-such", "x:1", now) is not None
    assert rs.take_lease(store, rid, "host-a:1", now + 30) is None  # ran out: taken
    rs.update(store, rid, state="completed")
    assert not rs.request(store, rid, "promote")  # a finished rollout takes no request


def test_a_lease_holder_gone_is_only_said_of_this_machines_processes():
    import socket
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    here = socket.gethostname()
    assert holder_gone(f"{here}:{proc.stdout.strip()}")  # that process has ended
    assert not holder_gone(f"{here}:{os.getpid()}")
    assert not holder_gone(f"another-host:{proc.stdout.strip()}")
    assert not holder_gone(None) and not holder_gone("garbage")


def test_status_report_and_requests_from_the_command_line(tmp_path):
    from toolchain.fleet.store import open_store

    url = f"sqlite:///{tmp_path}/fleet.db"
    s = open_store(url)
    _fleet(s)
    rid = plan(s, _candidate(), RolloutConfig(stages=(50, 100), shadow_first=True),
               bundle_url="/b")["id"]
    rs.add_verdict(s, rid, -1, "hold", "not enough data: p95_ms (2/3 windows)",
                   {"metrics": [{"metric": "p95_ms", "status": "insufficient", "canary_n": 2,
                                 "control_n": 3, "canary_median": 1.0,
                                 "control_median": 1.1, "note": "needs 8 windows per arm"}]})
    text = render_text(summarize(s))
    s.close()
    assert f"rollout {rid}: demo 1 -> 2 [running] shadow (50%), sending" in text
    assert "control (4)" in text and "p95_ms" in text and "insufficient" in text
    runner = CliRunner()
    out = runner.invoke(cli, ["rollout", "status", "--store", url])
    assert out.exit_code == 0 and rid in out.output
    for command, field, value in (("pause", "state", "paused"),
                                  ("promote", "request", "promote"),
                                  ("abort", "request", "abort")):
        out = runner.invoke(cli, ["rollout", command, rid, "--store", url])
        assert out.exit_code == 0, out.output
        assert "no driver is running" in out.output
        s = open_store(url)
        assert rs.get(s, rid)[field] == value
        s.close()
    out = runner.invoke(cli, ["rollout", "status", "nope", "--store", url])
    assert out.exit_code == 2 and "no rollout 'nope'" in out.output


@pytest.mark.parametrize("args, problem", [
    (["--stages", "50,20,100"], "rising percentages"),
    (["--stages", "abc"], "percentages separated by commas"),
    (["--soak", "10"], "--soak '10': give a positive duration"),
    (["--min-windows", "0"], "0 is not in the range"),
])
def test_start_refuses_bad_options_with_exit_2(tmp_path, args, problem):
    from toolchain.fleet.store import open_store

    open_store(f"sqlite:///{tmp_path}/fleet.db").close()
    bundle = tmp_path / "b.edgepack"
    bundle.write_bytes(b"not a bundle")
    out = CliRunner().invoke(cli, ["rollout", "start", str(bundle), "--store",
                                   f"sqlite:///{tmp_path}/fleet.db", "--broker",
                                   "mqtt://127.0.0.1:1", *args])
    assert out.exit_code == 2 and problem in out.output, out.output


def test_start_refuses_a_damaged_bundle(tmp_path):
    from toolchain.fleet.store import open_store

    open_store(f"sqlite:///{tmp_path}/fleet.db").close()
    bundle = tmp_path / "b.edgepack"
    bundle.write_bytes(b"not a bundle")
    out = CliRunner().invoke(cli, ["rollout", "start", str(bundle), "--store",
                                   f"sqlite:///{tmp_path}/fleet.db", "--broker",
                                   "mqtt://127.0.0.1:1"])
    assert out.exit_code == 2 and f"bundle {bundle}" in out.output
    assert "Traceback" not in out.output


def test_resume_leaves_a_rollout_to_its_live_driver(tmp_path):
    import socket

    from toolchain.fleet.store import open_store

    url = f"sqlite:///{tmp_path}/fleet.db"
    s = open_store(url)
    _fleet(s)
    rid = plan(s, _candidate(), RolloutConfig(), bundle_url="/b")["id"]
    rs.request(s, rid, None, state="paused")
    rs.take_lease(s, rid, f"{socket.gethostname()}:{os.getpid()}", time.time() + 30)
    s.close()
    # this process holds the lease and is alive: resume only marks the rollout running
    out = CliRunner().invoke(cli, ["rollout", "resume", rid, "--store", url, "--broker",
                                   "mqtt://127.0.0.1:1"])
    assert out.exit_code == 0 and "carries it on" in out.output, out.output
    s = open_store(url)
    assert rs.get(s, rid)["state"] == "running"
    s.close()


def test_an_answer_to_any_attempt_counts_and_a_busy_refusal_is_no_answer(store):  # noqa: F811
    """Attempt 2 of a reload reaches the device while attempt 1 still runs ("already in
    progress"); attempt 1 then succeeds: the device did reload."""
    from toolchain.fleet.rollout import Driver

    def result(seq: int, cid: str, ok: bool, error: str = "") -> dict:
        msg = {**window("d1", seq, 0.0), "kind": "result",
               "body": {"id": cid, "command": "reload", "ok": ok}}
        if not ok:
            msg["body"]["error"] = error
        return msg

    store.ingest(window("d1", 1, 0.0), 1001.0)
    driver = Driver(store, None, "ro-x")
    m = {"device_id": "d1", "command_id": "ro-x:0:reload:2", "seq_at_send": 1}
    assert driver._answer(m) is None
    store.ingest(result(2, "ro-x:0:reload:2", False, "a reload is already in progress"), 1002.0)
    assert driver._answer(m) is None  # busy with attempt 1: not an answer
    store.ingest(result(3, "ro-x:1:reload:1", True), 1003.0)  # another stage's: not ours
    assert driver._answer(m) is None
    store.ingest(result(4, "ro-x:0:reload:1", True), 1004.0)
    assert driver._answer(m) is True
    m2 = {**m, "device_id": "d2"}
    store.ingest(window("d2", 1, 0.0), 1001.0)
    store.ingest({**result(2, "ro-x:0:reload:1", False, "fetch failed"), "device_id": "d2"},
                 1002.0)
    assert driver._answer(m2) == "fetch failed"
