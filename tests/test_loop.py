"""Closing the loop end to end, with real processes: a real Mosquitto, a listener with the
recipe's rules (examples/closing-the-loop), torch-free device processes serving the demo,
reporting feedback and capturing data, the recipe's retrain script run by the trigger
(dataset export, a real build, `toolchain rollout start`), and rollouts judged on the
devices' own windows. Also: a bad version rolled back at its first stage, while its driver
and the broker restart in the middle of that stage."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BIN, REPO, RUNTIME_VENV, toolchain
from tests.fleet_helpers import Proc, query, start_listener, wait_until
from tests.mqtt_broker import Broker

pytestmark = [pytest.mark.timeout(1500), pytest.mark.slow]

# v1 and every later version are built alike, quickly: no pruning, a few epochs. The judge
# compares versions' latency, so they must not differ in how they were compressed.
QUICK = ["--set", "prune.enabled=false", "--set", "distill.enabled=false", "--epochs", "6",
         "--bench-runs", "50"]
RECIPE = REPO / "examples" / "closing-the-loop"


def _build(out: Path, *args: str) -> Path:
    proc = toolchain("build", "--target", "smart-speaker", "--out", out, "--json",
                     out / "report.json", *QUICK, *args)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    (bundle,) = out.glob("*.edgepack")
    return bundle


@pytest.fixture(scope="module")
def v1(tmp_path_factory, runtime_venv) -> Path:
    return _build(tmp_path_factory.mktemp("v1"), "--model-version", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory, digits_test_npz) -> dict[str, Path]:
    """The demo's held-out split, plain and inverted (the drift), with its labels."""
    folder = tmp_path_factory.mktemp("loop-inputs")
    with np.load(digits_test_npz) as d:
        x, y = d["x"], d["y"]
    out = {"plain": folder / "plain.npz", "inverted": folder / "inverted.npz"}
    np.savez(out["plain"], x=x, y=y)
    np.savez(out["inverted"], x=(float(x.max()) - x).astype(np.float32), y=y)
    return out


def _devices(bundle: Path, ids: list[str], data: Path, url: str, prefix: str, spools: Path,
             switch: Path, *extra: str) -> list[Proc]:
    """One torch-free process per device (tests/loop_devices.py)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    procs = [Proc([RUNTIME_VENV / "bin" / "python", REPO / "tests" / "loop_devices.py", bundle,
                   "--device-id", d, "--inputs", data, "--switch", switch, "--broker", url,
                   "--prefix", prefix, "--spools", spools, "--seed", str(i), *extra],
                  env={**os.environ, "PYTHONPATH": path})
             for i, d in enumerate(ids)]
    for p in procs:
        p.wait_for("started", timeout=180)
    return procs


def _stop_all(procs: list[Proc]) -> tuple[list[dict], list[str]]:
    """Stop the device processes: their summaries, and the output of any that had died on
    the way (each must run to the end)."""
    died = [p.text() for p in procs if p.p.poll() is not None]
    out = []
    for p in procs:
        if p.p.poll() is None:
            p.stop(timeout=120)
        if p.out:
            out.append(json.loads(p.out[-1]))
    return out, died


def _rollouts(store: Path) -> list[dict]:
    try:
        rows = query(store, "SELECT id, state, stage, phase, message FROM rollouts")
    except sqlite3.OperationalError:  # no rollout yet: the table comes with the first
        return []
    return [dict(zip(("id", "state", "stage", "phase", "message"), r, strict=True))
            for r in rows]


def _versions(store: Path, ids: list[str]) -> dict[str, str]:
    marks = ",".join("?" * len(ids))
    return dict(query(store, f"SELECT device_id, model_version FROM devices WHERE device_id "
                             f"IN ({marks})", tuple(ids)))


def _verdict_lines(store: Path, rollout_id: str) -> list[str]:
    proc = toolchain("rollout", "status", rollout_id, "--store", f"sqlite:///{store}")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_drift_feedback_capture_retrain_shadow_and_phased_rollout(v1, data, tmp_path):
    """The acceptance of the loop: 6 devices serve v1; their inputs drift (inverted digits)
    and half their inferences get the true label back; the drift and accuracy rules fire and
    run the recipe's retrain script, which exports the captured labelled data, builds v2 on
    the digits plus that data, and rolls it out: shadow first, then 2 stages. The judge
    promotes it (more accurate on the drifted inputs), every device ends on v2, and the v1
    alarms clear."""
    prefix, store = f"loop{uuid.uuid4().hex[:6]}", tmp_path / "fleet.db"
    work = tmp_path / "work"
    mosq = Broker(tmp_path / "broker").start()
    rules = tmp_path / "rules.toml"
    rules.write_text((RECIPE / "rules.toml").read_text().replace(
        '"examples/closing-the-loop/retrain.sh"', json.dumps(str(RECIPE / "retrain.sh"))))
    env_for_the_chain = {
        "EDGEPACK_STORE": f"sqlite:///{store}", "EDGEPACK_BROKER": mosq.url,
        "EDGEPACK_WORK": str(work), "EDGEPACK_TARGET": "smart-speaker",
        "EDGEPACK_MIX": "0.8", "EDGEPACK_COLLECT_S": "20", "EDGEPACK_SINCE": "20s",
        "EDGEPACK_BUILD_ARGS": " ".join(QUICK),
        "EDGEPACK_ROLLOUT_ARGS": f"--prefix {prefix} --stages 50,100 --soak 8s "
                                 "--min-windows 6 --reload-timeout 60s --poll 0.5",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    os.environ.update(env_for_the_chain)  # the listener's trigger command inherits them
    ids = [f"spk-{i}" for i in range(6)]
    switch = tmp_path / "inputs.txt"
    listener = start_listener(mosq.url, store, "--prefix", prefix, "--rules", rules)
    devices: list[Proc] = []
    try:
        devices = _devices(v1, ids, data["plain"], mosq.url, prefix, tmp_path / "spools",
                           switch, "--rate", "40", "--feedback-share", "0.5",
                           "--capture-rate", "0.5", "--window-seconds", "3")
        time.sleep(9)  # v1 on the data it was built for: no alarm
        assert not query(store, "SELECT rule FROM triggers"), "an alarm before any drift"
        t0 = time.monotonic()
        switch.write_text(str(data["inverted"]))
        assert wait_until(lambda: any(r["state"] in ("completed", "rolled_back", "aborted")
                                      for r in _rollouts(store)), timeout=900, interval=2), \
            (listener.text(), _rollouts(store),
             (work / "v2.json").read_text()[-500:] if (work / "v2.json").exists() else "")
        loop_s = time.monotonic() - t0
        (rollout,) = _rollouts(store)
        assert rollout["state"] == "completed", rollout
        assert wait_until(lambda: set(_versions(store, ids).values()) == {"2"}, timeout=60)
        # the v1 alarms clear once no device runs v1
        assert wait_until(lambda: not query(store, "SELECT rule FROM triggers WHERE scope = "
                                                   "'demo-cnn@1' AND cleared_at IS NULL"),
                          timeout=60), query(store, "SELECT rule, scope, cleared_at FROM "
                                                    "triggers")
        fired = {r[0] for r in query(store, "SELECT rule FROM triggers WHERE scope = "
                                            "'demo-cnn@1'")}
        assert {"drift", "accuracy"} <= fired
        time.sleep(5)  # v2 on the drifted inputs: no new alarm
        active = query(store, "SELECT rule, scope FROM triggers WHERE cleared_at IS NULL")
        assert not [a for a in active if a[0] in ("drift", "accuracy")], active
    finally:
        summaries, died = _stop_all(devices)
        listener.stop()
        mosq.stop()
        for key in env_for_the_chain:
            os.environ.pop(key, None)
    assert not died, died
    assert {s["version"] for summary in summaries for s in summary["devices"].values()} == {"2"}
    verdicts = query(store, "SELECT stage, decision, reason, detail FROM rollout_verdicts "
                            "ORDER BY decided_at")
    final = [v for v in verdicts if v[1] != "hold"]
    assert [(v[0], v[1]) for v in final] == [(-1, "promote"), (0, "promote"), (1, "promote")]
    stage1 = {m["metric"]: m for m in json.loads(final[1][3])["metrics"]}
    assert stage1["accuracy"]["status"] == "better", stage1["accuracy"]
    exported = np.load(work / "captured-v1.npz")
    assert len(exported["y"]) > 50 and (exported["label_source"] == 0).all()
    print(f"\nloop: drift to v2 everywhere in {loop_s:.0f} s; {len(exported['y'])} captured "
          f"labelled samples exported")
    print("\n".join(_verdict_lines(store, rollout["id"])))


def test_a_bad_version_is_rolled_back_at_its_first_stage_across_restarts(v1, data, tmp_path):
    """A v2 that answers one class goes out to half of 4 devices (by their buckets: at least
    one, and one left as control); the rollout's driver is
    killed and the broker restarted in the middle of that stage; a resumed driver judges
    the stage, rolls the canaries back, and the fleet ends on v1 everywhere: the controls
    never reloaded."""
    one_class = tmp_path / "one-class.npz"
    from toolchain.build.data import load_data

    d = load_data("digits", seed=0)
    x = np.concatenate([d.x_train, d.x_val, d.x_test])
    y = np.concatenate([d.y_train, d.y_val, d.y_test])
    keep = np.concatenate([np.flatnonzero(y == c)[:3] for c in range(10)])
    y_bad = np.zeros_like(y)
    y_bad[keep] = y[keep]  # every class still named (3 samples each), nearly all say "0"
    np.savez(one_class, x=x, y=y_bad)
    bad = _build(tmp_path / "bad", "--model-version", "2", "--data", str(one_class))
    prefix, store = f"bad{uuid.uuid4().hex[:6]}", tmp_path / "fleet.db"
    mosq = Broker(tmp_path / "broker").start()
    ids = [f"spk-{i}" for i in range(4)]
    listener = start_listener(mosq.url, store, "--prefix", prefix)
    devices: list[Proc] = []
    driver = resumed = None
    try:
        devices = _devices(v1, ids, data["plain"], mosq.url, prefix, tmp_path / "spools",
                           tmp_path / "no-switch", "--rate", "15", "--feedback-share", "0.5",
                           "--window-seconds", "2")
        assert wait_until(lambda: set(_versions(store, ids).values()) == {"1"}, timeout=60)
        common = ["--store", f"sqlite:///{store}", "--broker", mosq.url, "--reconnect-max", "1"]
        created = toolchain("rollout", "start", bad, *common, "--prefix", prefix, "--stages",
                            "50,100", "--soak", "10s", "--min-windows", "6",
                            "--reload-timeout", "40s", "--detach")
        assert created.returncode == 0, created.stderr
        rollout_id = created.stdout.strip()
        driver = Proc([BIN / "toolchain", "rollout", "resume", rollout_id, *common,
                       "--poll", "0.5"])
        assert wait_until(lambda: _rollouts(store)[0]["phase"] == "soaking", timeout=180), \
            (driver.text(), _rollouts(store))
        canaries = [r[0] for r in query(store, "SELECT device_id FROM rollout_devices WHERE "
                                               "role = 'canary'")]
        controls = sorted(set(ids) - set(canaries))
        assert canaries and controls  # 50% of 4 by their hashes: at least one of each
        driver.stop(signal.SIGKILL)  # in the middle of the stage, and so is the broker
        mosq.stop()
        time.sleep(3)
        mosq.start()
        resumed = Proc([BIN / "toolchain", "rollout", "resume", rollout_id, *common,
                        "--poll", "0.5"])
        assert resumed.wait(300) == 3, resumed.text()  # 3: rolled back
        assert wait_until(lambda: set(_versions(store, ids).values()) == {"1"}, timeout=60), \
            _versions(store, ids)
    finally:
        for p in (driver, resumed):
            if p is not None and p.p.poll() is None:
                p.stop(signal.SIGKILL)
        summaries, died = _stop_all(devices)
        listener.stop()
        mosq.stop()
    assert not died, died
    assert {s["version"] for summary in summaries for s in summary["devices"].values()} == {"1"}
    (rollout,) = _rollouts(store)
    assert rollout["state"] == "rolled_back" and rollout["stage"] == 0, rollout
    verdicts = query(store, "SELECT stage, decision, reason FROM rollout_verdicts WHERE "
                            "decision != 'hold'")
    assert verdicts == [(0, "rollback", verdicts[0][2])] and "accuracy" in verdicts[0][2]
    for device in controls:  # never reloaded: every message came from v1
        versions = {r[0] for r in query(store, "SELECT model_version FROM messages WHERE "
                                               "device_id = ?", (device,))}
        assert versions == {"1"}, (device, versions)
    print("\n".join(_verdict_lines(store, rollout["id"])))
