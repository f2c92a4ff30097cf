"""Shadow runs and rollback on the device (runtime.shadow, Device.shadow/rollback): a
candidate bundle runs beside the served one on sampled live inputs and windows carry how the
two compare; the served path never waits for it; bad candidates are refused while serving
goes on; `rollback` reinstalls the bundle served before and a restarted device serves it.
Real bundles (the demo and small builds of it), real Device objects with their spools."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from runtime import protocol
from runtime.device import Device, command_args
from runtime.model import load
from runtime.shadow import ShadowRunner, pause_after, sample_step
from runtime.telemetry import CommandError, handle_command
from tests.conftest import assert_exit, toolchain

pytestmark = pytest.mark.timeout(900)


def _build(folder: Path, *args: str) -> Path:
    """A quick build of the demo (one epoch): a real bundle, not a good model."""
    proc = toolchain("build", "--target", "host-cpu", "--out", folder / "out", "--epochs", "1",
                     "--bench-runs", "10", "--quiet", "--json", folder / "report.json", *args)
    assert_exit(proc.returncode, 0, folder / "report.json", proc.stderr + proc.stdout)
    return next((folder / "out").iterdir())


@pytest.fixture(scope="module")
def served(build_demo) -> Path:
    return build_demo("host-cpu").bundle


@pytest.fixture(scope="module")
def weak(tmp_path_factory) -> Path:
    """Version 2 of the demo after one epoch with another seed: it disagrees a lot."""
    return _build(tmp_path_factory.mktemp("weak"), "--seed", "1", "--model-version", "2")


@pytest.fixture(scope="module")
def misfits(tmp_path_factory) -> dict[str, Path]:
    """Bundles the served demo cannot be compared with: 16x16 inputs; 5 classes."""
    from toolchain.build.data import load_data

    folder = tmp_path_factory.mktemp("misfits")
    d = load_data("digits", seed=0)
    x, y = np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])
    np.savez(folder / "small.npz", x=np.ascontiguousarray(x[:, :, ::2, ::2]), y=y)
    np.savez(folder / "five.npz", x=x[y < 5], y=y[y < 5])
    return {name: _build(folder / name, "--data", str(folder / f"{name}.npz"))
            for name in ("small", "five")}


def _open(bundle: Path, spool: Path) -> Device:
    return Device.open(bundle, device_id="shadow-01", spool_dir=spool, window_seconds=3600)


def _command(dev: Device, name: str, **args) -> dict:
    """Through the same parser a command from the broker takes: a result, never a raise."""
    raw = json.dumps({"id": name, "command": name, "args": args}).encode()
    return handle_command(raw, dev.handle_command)


def _windows(dev: Device) -> list[dict]:
    """The window messages in the spool, as the listener validates them (dotted fields)."""
    out = []
    for rec in dev.telemetry.spool.pending(limit=10_000):
        kind, _msg, fields = protocol.validate_fields(rec.topic, rec.payload,
                                                      protocol.DEFAULT_PREFIX)
        if kind == "telemetry":
            out.append({**fields, "body": json.loads(rec.payload)["body"]})
    return out


def _events(dev: Device) -> list[dict]:
    return [json.loads(r.payload)["body"] for r in dev.telemetry.spool.pending(limit=10_000)
            if r.topic.endswith("/events")]


def _settled(runner: ShadowRunner, expected: int, timeout: float = 120) -> dict:
    """The runner's totals once every sampled row is run, dropped or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = runner.totals()
        if t["count"] + t["dropped"] + t["errors"] >= expected:
            return t
        time.sleep(0.05)
    raise AssertionError(f"the shadow runner did not take {expected} rows: {runner.totals()}")


def test_the_served_bundle_as_candidate_agrees_fully_in_every_window(served, digits, tmp_path):
    x, y = digits
    with _open(served, tmp_path / "spool") as dev:
        done = _command(dev, "reload", bundle=str(served), mode="shadow", sample=0.5,
                        cpu_share=1.0)
        assert done["ok"], done
        assert done["result"]["every"] == 2 and done["result"]["serving"] == dev.info
        runner = dev._shadow
        for i in range(100):  # inferences 1..100: the even ones are shadowed
            dev.classify(x[i:i + 1])
        logits = dev.predict(x[100:108])  # 101..108, a batch: 102, 104, 106, 108
        assert logits.shape == (8, 10)
        totals = _settled(runner, 54)
        assert totals["count"] > 0 and totals["agreement"] == 1.0 and totals["errors"] == 0
        # ground truth for every inference: counted for the shadowed ones only, both models
        for n in range(1, 109):
            for listener in dev.feedback_listeners:
                listener(n, int(y[n - 1]))
        dev.telemetry.flush()
        assert _command(dev, "ping")["result"]["shadow"]["candidate"]["sha256"] == \
            dev.info["sha256"]
        dev.classify(x[:1])  # inference 109 (not sampled): the next window has no shadow rows
        dev.telemetry.flush()
        first, second = _windows(dev)
        assert first["shadow.candidate.sha256"] == dev.info["sha256"]
        assert first["shadow.count"] == totals["count"]
        assert first["body"]["shadow"]["dropped"] == totals["dropped"]
        assert first["shadow.agreement"] == 1.0 and first["shadow.errors"] == 0
        assert 0 < first["shadow.latency_ms.p50"] <= first["shadow.latency_ms.p95"]
        assert 0 < first["shadow.confidence_mean"] <= 1
        assert first["shadow.feedback.count"] == totals["count"]
        assert first["shadow.feedback.accuracy"] == first["shadow.feedback.served_accuracy"] > 0.5
        assert second["body"]["shadow"]["count"] == 0 and "shadow.agreement" not in second
        started = [e for e in _events(dev) if e["event"] == "shadow_started"]
        assert started[0]["candidate"]["sha256"] == dev.info["sha256"]


def test_a_weaker_candidate_agrees_less_and_feedback_compares_both(served, weak, digits,
                                                                   tmp_path):
    x, y = digits
    with _open(served, tmp_path / "spool") as dev:
        assert _command(dev, "reload", bundle=str(served), mode="shadow", sample=1,
                        cpu_share=1)["ok"]
        swap = _command(dev, "reload", bundle=weak.as_uri(), mode="shadow", sample=1,
                        cpu_share=1)  # a second shadow reload replaces the candidate
        assert swap["ok"], swap
        assert swap["result"]["replaced"]["candidate"]["sha256"] == dev.info["sha256"]
        assert swap["result"]["candidate"]["version"] == "2"
        for i in range(200):
            dev.classify(x[i:i + 1])
        totals = _settled(dev._shadow, 200)
        for n in range(1, 201):
            for listener in dev.feedback_listeners:
                listener(n, int(y[n - 1]))
        dev.telemetry.flush()
        (window,) = _windows(dev)
        assert window["shadow.candidate.version"] == "2"
        assert window["shadow.count"] == totals["count"] > 0
        assert window["shadow.agreement"] < 0.9
        assert window["shadow.feedback.accuracy"] < window["shadow.feedback.served_accuracy"]
        assert dev.info["version"] == "1"  # serving never changed


def test_the_served_path_never_waits_and_drops_are_counted(served):
    with load(served, self_test=False) as model:
        info = {"sha256": "0" * 64, "model": "demo", "version": "9"}
        # not started: nothing takes from the queue, as if the candidate were far too slow
        runner = ShadowRunner(model, info, sample=0.25, cpu_share=1, queue_items=2)
        x = np.zeros((10, *model.raw_shape), np.float32)
        ids = np.zeros(10, np.int64)
        for n in range(1, 101, 10):  # ten batches of 10 rows: rows 4, 8, 12, ... sampled
            runner.offer(x, ids, n)
        # the truth about rows 8 and 13 comes before the candidate ran on them: 8 is queued
        # and counts when it runs; 13 was never sampled
        assert not runner.feedback(8, 0) and not runner.feedback(13, 0)
        window = runner.take_window()
        # 25 rows sampled; the first two batches (rows 4, 8 | 12, 16, 20) were queued
        assert window["dropped"] == 25 - 5 and window["count"] == 0
        assert window["agreement"] is None and window["latency_ms"]["p50"] is None
        assert runner.take_window()["dropped"] == 0  # counters start again each window
        runner.start()
        totals = _settled(runner, 25)
        assert totals["count"] == 5 and totals["dropped"] == 20
        assert runner.feedback(12, 0) and not runner.feedback(13, 0)  # 13 was not shadowed
        assert runner.take_window()["feedback"]["count"] == 2  # 8 (early) and 12
        runner.stop()
        assert not runner.running


def test_cpu_share_is_kept_by_pausing_after_each_run(served):
    assert pause_after(0.01, 0.25) == pytest.approx(0.03)
    assert pause_after(0.01, 1.0) == 0
    assert [sample_step(s) for s in (1, 0.5, 0.25, 0.3, 0.001)] == [1, 2, 4, 3, 1000]
    with load(served, self_test=False) as model:
        runner = ShadowRunner(model, {"sha256": "", "model": "", "version": ""},
                              sample=1, cpu_share=0.2).start()
        x = np.zeros((1, *model.raw_shape), np.float32)
        for n in range(1, 6):
            runner.offer(x, np.zeros(1, np.int64), n)
        totals = _settled(runner, 5)
        runner.stop()
        assert totals["count"] == 5
        busy, paused = runner.busy_s, runner.paused_s
        # the thread's busy time is `cpu_share` of busy + paused, run by run
        assert busy > 0 and busy / (busy + paused) == pytest.approx(0.2)
        assert not runner.running  # stop does not wait out a pause


def test_bad_candidates_are_refused_and_serving_goes_on(served, misfits, digits, tmp_path):
    x, _ = digits
    spool = tmp_path / "spool"
    broken = tmp_path / "broken.edgepack"
    broken.write_bytes(served.read_bytes()[:-100])
    with _open(served, spool) as dev:
        before = dev.classify(x[:16])[0]
        cases = [(misfits["small"], "inputs shaped (1, 16, 16), the served model (1, 32, 32)"),
                 (misfits["five"], "the candidate has 5 classes, the served model 10"),
                 (broken, "refused, still serving demo-cnn 1"),
                 (tmp_path / "missing.edgepack", "is not a file")]
        for bundle, words in cases:
            result = _command(dev, "reload", bundle=str(bundle), mode="shadow")
            assert not result["ok"] and words in result["error"], result
            assert "\n" not in result["error"]
        assert dev._shadow is None and _command(dev, "ping")["result"]["shadow"] is None
        np.testing.assert_array_equal(dev.classify(x[:16])[0], before)
        assert dev.bundle_path == served
        dev.telemetry.flush()
        assert "shadow" not in _windows(dev)[0]["body"]
        # nothing left behind: no staging or extraction folder but the served model's own
        assert len(list((spool / "extracted").iterdir())) == 1
        assert not (spool / "reloaded-bundle.json").exists()


def test_shadow_stop_and_a_serve_reload_end_the_run(served, weak, digits, tmp_path):
    x, _ = digits
    with _open(served, tmp_path / "spool") as dev:
        assert _command(dev, "reload", bundle=str(weak), mode="shadow")["ok"]
        for i in range(20):
            dev.classify(x[i:i + 1])
        _settled(dev._shadow, 5)
        stop = _command(dev, "shadow_stop")
        assert stop["ok"] and stop["result"]["stopped"] is True
        assert stop["result"]["totals"]["count"] + stop["result"]["totals"]["dropped"] == 5
        assert dev._shadow is None and dev.feedback_listeners == []
        assert _command(dev, "shadow_stop")["result"]["stopped"] is False  # nothing to stop
        dev.classify(x[:1])
        dev.telemetry.flush()
        assert "shadow" not in _windows(dev)[-1]["body"]
        # a serve-mode reload ends a shadow run: the candidate was judged against the old model
        assert _command(dev, "reload", bundle=str(weak), mode="shadow")["ok"]
        done = _command(dev, "reload", bundle=str(weak))
        assert done["ok"] and done["result"]["shadow_stopped"]["candidate"]["version"] == "2"
        assert dev._shadow is None and dev.info["version"] == "2"
        reasons = [e["reason"] for e in _events(dev) if e["event"] == "shadow_stopped"]
        assert reasons == ["shadow_stop command", "a serve-mode reload replaced the served model"]
        assert len(list((tmp_path / "spool" / "extracted").iterdir())) == 1  # candidates gone


def test_rollback_reinstalls_the_bundle_served_before_and_a_restart_keeps_it(served, weak,
                                                                             tmp_path):
    spool = tmp_path / "spool"
    with _open(served, spool) as dev:
        none = _command(dev, "rollback")
        assert not none["ok"] and "nothing to roll back to" in none["error"]
        assert _command(dev, "reload", bundle=str(weak))["ok"]
        assert _command(dev, "reload", bundle=str(weak))["ok"]  # the same again: no new past
        v1, v2 = dev.previous["sha256"], dev.info["sha256"]
    with _open(served, spool) as dev:  # restarted: serves v2 and still knows what came before
        assert dev.info["sha256"] == v2 and dev.previous["sha256"] == v1
        back = _command(dev, "rollback")
        assert back["ok"], back
        assert back["result"]["serving"]["sha256"] == v1
        assert back["result"]["rolled_back"]["sha256"] == v2
        assert dev.info["version"] == "1" and dev.previous is None
        again = _command(dev, "rollback")  # a resent rollback does not flip back to v2
        assert not again["ok"] and "nothing to roll back to: serving demo-cnn 1" in again["error"]
        events = {e["event"]: e for e in _events(dev)}
        assert events["rolled_back"]["bundle"]["sha256"] == v1
        assert events["rolled_back"]["replaced"]["sha256"] == v2
    with _open(served, spool) as dev:  # restarted after the rollback: v1
        assert dev.info["sha256"] == v1 and dev.previous is None
    with _open(weak, spool) as dev:  # another bundle on the command line wins, as ever
        assert dev.info["sha256"] == v2 and dev.previous is None


def test_rollback_refuses_a_bundle_that_changed_since(served, weak, tmp_path):
    mine = tmp_path / "v1.edgepack"
    mine.write_bytes(served.read_bytes())
    with _open(mine, tmp_path / "spool") as dev:
        assert _command(dev, "reload", bundle=str(weak))["ok"]
        mine.write_bytes(weak.read_bytes())
        result = _command(dev, "rollback")
        assert not result["ok"] and "changed since" in result["error"]
        assert dev.info["version"] == "2"
        mine.unlink()
        result = _command(dev, "rollback")
        assert not result["ok"] and "cannot be read" in result["error"]


@pytest.mark.parametrize("name, args, words", [
    ("reload", {"bundle": "b", "mode": "fast"}, "reload takes args.mode: one of 'serve', "
                                                "'shadow'"),
    ("reload", {"bundle": "b", "mode": ["shadow"]}, "args.mode: one of"),
    ("reload", {"bundle": "b", "mode": "shadow", "sample": 0},
     "reload takes args.sample: a number above 0 and at most 1"),
    ("reload", {"bundle": "b", "mode": "shadow", "sample": True}, "args.sample: a number"),
    ("reload", {"bundle": "b", "mode": "shadow", "sample": "0.5"}, "args.sample: a number"),
    ("reload", {"bundle": "b", "mode": "shadow", "cpu_share": 1.5},
     "args.cpu_share: a number above 0 and at most 1"),
    ("reload", {"bundle": "b", "sample": 0.5}, "reload takes args.sample only with mode "
                                               "'shadow'"),
    ("reload", {"bundle": "b", "mode": "shadow", "rate": 1},
     "takes no argument(s) 'rate'; it takes bundle, mode, sample, cpu_share"),
    ("shadow_stop", {"now": True}, "shadow_stop takes no argument(s) 'now'; it takes none"),
    ("rollback", {"to": "v1"}, "rollback takes no argument(s) 'to'; it takes none"),
    ("undo", {}, "this runtime knows ping, bench, reload, shadow_stop, rollback"),
])
def test_command_arguments_are_checked_with_one_line_errors(name, args, words):
    with pytest.raises(CommandError) as err:
        command_args(name, args)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_command_argument_defaults():
    assert command_args("reload", {"bundle": "b"}) == {
        "bundle": "b", "mode": "serve", "sample": 0.25, "cpu_share": 0.25}
    assert command_args("reload", {"bundle": "b", "mode": "shadow", "sample": 1}) == {
        "bundle": "b", "mode": "shadow", "sample": 1.0, "cpu_share": 0.25}
    assert command_args("rollback", {}) == {} and command_args("shadow_stop", {}) == {}


# -- a real device process, commands through a real broker -------------------------------------
def test_a_serving_process_shadows_rolls_back_and_restarts_on_what_it_rolled_back_to(
        broker, served, weak, digits, tmp_path):
    import urllib.request
    import uuid

    from runtime.mqtt import BrokerConfig, Connection
    from tests.fleet_helpers import EDGE_RUNTIME, Proc, wait_until

    prefix, device = f"t{uuid.uuid4().hex[:8]}", "shadow-proc"
    got: list[dict] = []
    conn = Connection(BrokerConfig.from_url(broker.url), f"test-{uuid.uuid4().hex[:6]}",
                      on_message=lambda m: got.append(json.loads(m.payload)))
    conn._on_connect_cb = lambda _present: conn.subscribe([f"{prefix}/{device}/+"])
    conn.start()
    assert conn.wait_connected(10)
    argv = [EDGE_RUNTIME, "serve", served, "--http", "127.0.0.1:0", "--broker", broker.url,
            "--device-id", device, "--spool", tmp_path / "spool", "--prefix", prefix,
            "--window-seconds", "1"]

    def start() -> tuple[Proc, str]:
        proc = Proc(argv)
        proc.wait_for("serving ")
        return proc, next(line for line in proc.err if "serving " in line).split(" on ")[-1]

    def command(name: str, **args) -> dict:
        cid = uuid.uuid4().hex[:8]
        conn.publish(f"{prefix}/{device}/commands",
                     json.dumps({"id": cid, "command": name, "args": args}).encode())

        def answer() -> dict | None:
            return next((m["body"] for m in got if m.get("kind") == "result"
                         and m["body"]["id"] == cid), None)
        assert wait_until(lambda: answer() is not None, timeout=120), proc.text()
        return answer()

    def health(url: str) -> dict:
        return json.loads(urllib.request.urlopen(f"{url.strip()}/v1/health", timeout=10).read())

    x = digits[0][:40]
    proc, url = start()
    try:
        v1 = health(url)["bundle"]["sha256"]
        shadow = command("reload", bundle=weak.as_uri(), mode="shadow", sample=1, cpu_share=1)
        assert shadow["ok"], shadow
        req = urllib.request.Request(f"{url.strip()}/v1/predict",
                                     data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert len(json.loads(resp.read())["predictions"]) == 40
        assert command("ping")["result"]["shadow"]["candidate"]["version"] == "2"
        assert wait_until(lambda: any(m.get("kind") == "window" and m["body"].get("shadow", {})
                                      .get("count") for m in got), timeout=60), proc.text()
        stop = command("shadow_stop")["result"]
        assert stop["stopped"] and stop["totals"]["count"] + stop["totals"]["dropped"] == 40
        assert command("reload", bundle=weak.as_uri())["ok"]
        assert health(url)["bundle"]["version"] == "2"
    finally:
        assert proc.stop() == 0, proc.text()
    proc, url = start()  # restarted: serves v2, and can still roll back to v1
    try:
        assert health(url)["bundle"]["version"] == "2"
        back = command("rollback")
        assert back["ok"] and back["result"]["serving"]["sha256"] == v1, back
    finally:
        assert proc.stop() == 0, proc.text()
    proc, url = start()
    try:
        assert health(url)["bundle"]["sha256"] == v1
        assert not command("rollback")["ok"]
    finally:
        assert proc.stop() == 0, proc.text()
        conn.stop()
    events = [m["body"]["event"] for m in got if m.get("kind") == "event"]
    assert {"shadow_started", "shadow_stopped", "rolled_back"} <= set(events)
