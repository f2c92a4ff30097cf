"""The fleet loop end to end: the torch-free runtime replays the demo's test split through a
real Mosquitto (started here on a free loopback port) to real listener processes that store
into SQLite; outages of the broker and of the runtime, shared subscriptions, TLS and
passwords, commands, drift triggers."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from runtime.mqtt import BrokerConfig, Connection
from runtime.protocol import trigger_topic
from tests.conftest import REPO, RUNTIME_VENV, toolchain
from tests.fleet_helpers import (
    EDGE_RUNTIME,
    Proc,
    query,
    replay,
    replay_args,
    seqs,
    start_listener,
    wait_until,
)
from tests.mqtt_broker import Broker, make_certs

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def bundle(build_demo, runtime_venv) -> Path:
    return build_demo("smart-speaker").bundle


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digits_test_npz) -> dict[str, Path]:
    """The demo's test split as recorded, and three shifted versions of it."""
    folder = tmp_path_factory.mktemp("inputs")
    with np.load(digits_test_npz) as d:
        x, y = d["x"], d["y"]
    rng = np.random.default_rng(7)
    hi = float(x.max())
    variants = {
        "plain": x,
        "inverted": hi - x,
        "noised": np.clip(x + rng.normal(0, 0.3 * hi, x.shape), 0, hi),
        "class-mix": x[np.isin(y, [0, 1, 2])],
    }
    out = {}
    for name, v in variants.items():
        out[name] = folder / f"{name}.npz"
        np.savez(out[name], x=v.astype(np.float32))
    return out


def _rules(folder: Path, consecutive: int = 2) -> tuple[Path, Path]:
    """Drift rule whose command appends the trigger it got to a file."""
    ran = folder / "commands-ran.jsonl"
    script = ("import os, pathlib; p = pathlib.Path(os.environ['OUT']); "
              "p.open('a').write(os.environ['EDGEPACK_TRIGGER'] + '\\n')")
    rules = folder / "rules.toml"
    rules.write_text(
        "[[rule]]\nname = \"drift\"\nmetric = \"drift_score\"\nabove = 0.25\n"
        f"consecutive = {consecutive}\nmin_devices = 1\n"
        f"command = [\"env\", \"OUT={ran}\", \"python3\", \"-c\", {json.dumps(script)}]\n")
    return rules, ran


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def _subscriber(url: str, topic: str, **cfg) -> tuple[Connection, list[dict]]:
    got: list[dict] = []
    conn = Connection(BrokerConfig.from_url(url, **cfg), f"test-{uuid.uuid4().hex[:6]}",
                      on_message=lambda m: got.append(json.loads(m.payload)))
    conn._on_connect_cb = lambda _present: conn.subscribe([topic])
    conn.start()
    assert conn.wait_connected(10)
    time.sleep(0.3)
    return conn, got


def test_replay_stores_every_window_without_gaps_and_no_trigger(broker, bundle, inputs,
                                                                tmp_path):
    prefix, store = _prefix(), tmp_path / "fleet.db"
    rules, ran = _rules(tmp_path)
    listener = start_listener(broker.url, store, "--prefix", prefix, "--rules", rules)
    summary = replay(bundle, inputs["plain"], broker.url, "spk-0001", tmp_path / "spool",
                     "--prefix", prefix, "--window-inferences", "90")
    assert summary["inferences"] == 269 and summary["windows"] == 3
    assert summary["spool"]["pending"] == 0 and summary["spool"]["drained"]
    assert wait_until(lambda: seqs(store, "spk-0001", "window") == summary["window_seqs"])
    all_seqs = seqs(store, "spk-0001")
    assert all_seqs == list(range(1, all_seqs[-1] + 1))  # events and windows, no gap
    listener.stop()

    rows = query(store, "SELECT count, p50_ms, p95_ms, drift_score, input_psi, class_psi,"
                        " budget_p95_ms FROM windows ORDER BY seq")
    assert [r[0] for r in rows] == [90, 90, 89]
    for _count, p50, p95, score, _ipsi, _cpsi, budget in rows:
        assert 0 < p50 <= p95 and budget == 25.0
        assert score is not None and score < 0.25, rows  # unshifted data: no drift
    assert query(store, "SELECT COUNT(*) FROM triggers")[0][0] == 0
    assert not ran.exists()

    report = toolchain("fleet", "--store", f"sqlite:///{store}", "--json",
                       "--html", tmp_path / "fleet.html")
    assert report.returncode == 0, report.stderr
    dev = json.loads(report.stdout)["devices"][0]
    assert dev["device_id"] == "spk-0001" and dev["state"] == "offline"
    assert dev["sequence_gaps"] == 0 and dev["windows"] == 3 and dev["inferences"] == 269
    page = (tmp_path / "fleet.html").read_text()
    assert "spk-0001" in page and page.count("<svg") == 4  # fleet and worst devices: p95, drift
    text = toolchain("fleet", "--store", f"sqlite:///{store}")
    assert "spk-0001" in text.stdout and "triggers: none" in text.stdout


@pytest.mark.parametrize("shift", ["inverted", "noised", "class-mix"])
def test_shifted_inputs_fire_the_drift_trigger_once(broker, bundle, inputs, tmp_path, shift):
    prefix, store = _prefix(), tmp_path / "fleet.db"
    rules, ran = _rules(tmp_path)
    listener = start_listener(broker.url, store, "--prefix", prefix, "--rules", rules)
    sub, triggers = _subscriber(broker.url, trigger_topic(prefix))
    repeat = "3" if shift == "class-mix" else "1"  # 81 samples: repeat for several windows
    replay(bundle, inputs[shift], broker.url, "spk-0002", tmp_path / "spool", "--prefix",
           prefix, "--window-inferences", "90", "--repeat", repeat)
    assert wait_until(lambda: ran.exists() and ran.read_text().strip(), timeout=30)
    assert wait_until(lambda: query(store, "SELECT command_rc FROM triggers")[0][0] == 0)
    fired = query(store, "SELECT rule, scope, cleared_at, devices FROM triggers")
    assert len(fired) == 1
    rule, scope, cleared, devices = fired[0]
    assert (rule, scope, cleared, json.loads(devices)) == ("drift", "demo-cnn@1", None,
                                                           ["spk-0002"])
    assert wait_until(lambda: any(t["state"] == "fired" for t in triggers))
    assert json.loads(ran.read_text().splitlines()[0])["rule"] == "drift"

    if shift == "inverted":
        # Still drifting: the active trigger does not fire (or run its command) again.
        replay(bundle, inputs[shift], broker.url, "spk-0002", tmp_path / "spool", "--prefix",
               prefix, "--window-inferences", "90")
        # Back to normal: the trigger clears.
        replay(bundle, inputs["plain"], broker.url, "spk-0002", tmp_path / "spool",
               "--prefix", prefix, "--window-inferences", "90")
        assert wait_until(lambda: query(store, "SELECT cleared_at FROM triggers")[0][0])
        assert len(query(store, "SELECT id FROM triggers")) == 1
        assert len(ran.read_text().splitlines()) == 1
        assert wait_until(lambda: any(t["state"] == "cleared" for t in triggers))
    listener.stop()
    sub.stop()


def test_broker_down_30_seconds_loses_nothing(broker, bundle, inputs, tmp_path):
    """The broker goes away for 30 s while the device replays at a steady rate; afterwards
    every window the device produced is in the store exactly once."""
    prefix, store = _prefix(), tmp_path / "fleet.db"
    outage = Broker(tmp_path / "broker").start()
    listener = start_listener(outage.url, store, "--prefix", prefix)
    device = Proc(replay_args(bundle, inputs["plain"], outage.url, "spk-0003",
                              tmp_path / "spool", "--prefix", prefix, "--window-inferences",
                              "10", "--rate", "12", "--repeat", "2", "--drain-timeout", "60"))
    try:
        assert wait_until(lambda: len(seqs(store, "spk-0003", "window")) >= 3, timeout=30)
        outage.stop()
        down_at = time.monotonic()
        time.sleep(30)
        outage.start()
        assert device.wait(240) == 0, device.text()
        summary = json.loads(device.out[-1])
        produced = summary["window_seqs"]
        assert len(produced) == 54
        # windows produced while the broker was down went through the spool
        assert time.monotonic() - down_at > 30
        assert wait_until(lambda: seqs(store, "spk-0003", "window") == produced, timeout=60), (
            sorted(set(produced) - set(seqs(store, "spk-0003", "window"))))
        everything = seqs(store, "spk-0003")
        assert everything == list(range(1, everything[-1] + 1))
        assert query(store, "SELECT COUNT(*) FROM messages")[0][0] == len(everything)
    finally:
        device.stop(signal.SIGKILL)
        listener.stop()
        outage.stop()


def test_runtime_killed_mid_replay_resends_only_the_unacknowledged(broker, bundle, inputs,
                                                                   tmp_path):
    prefix, store, spool = _prefix(), tmp_path / "fleet.db", tmp_path / "spool"
    listener = start_listener(broker.url, store, "--prefix", prefix)
    first = Proc(replay_args(bundle, inputs["plain"], broker.url, "spk-0004", spool,
                             "--prefix", prefix, "--window-inferences", "10", "--rate", "40"))
    assert wait_until(lambda: len(seqs(store, "spk-0004", "window")) >= 5, timeout=60)
    first.stop(signal.SIGKILL)
    before = seqs(store, "spk-0004")
    summary = replay(bundle, inputs["plain"], broker.url, "spk-0004", spool, "--prefix",
                     prefix, "--window-inferences", "10")
    assert summary["spool"]["drained"]
    assert min(summary["window_seqs"]) > max(before)  # numbering continued
    assert wait_until(lambda: set(summary["window_seqs"]) <= set(seqs(store, "spk-0004")))
    listener.stop()
    everything = seqs(store, "spk-0004")
    # nothing spooled before the kill was lost, whether or not it had been acknowledged
    assert everything == list(range(1, everything[-1] + 1))
    received, stored, duplicates = query(
        store, "SELECT received, stored, duplicates FROM listener_stats")[0]
    # Only what was in flight at the kill (at most the 50-message window) can come twice.
    assert stored == len(everything) and duplicates <= 50


def test_two_listeners_share_the_load_and_store_each_message_once(broker, bundle, inputs,
                                                                  tmp_path):
    prefix, store = _prefix(), tmp_path / "fleet.db"
    one = start_listener(broker.url, store, "--prefix", prefix, "--group", "g", listener_id="L1")
    two = start_listener(broker.url, store, "--prefix", prefix, "--group", "g", listener_id="L2")
    summaries = [replay(bundle, inputs["plain"], broker.url, f"spk-01{i}", tmp_path / f"sp{i}",
                        "--prefix", prefix, "--window-inferences", "5") for i in range(2)]
    total = sum(s["spool"]["next_seq"] - 1 for s in summaries)
    assert wait_until(lambda: query(store, "SELECT COUNT(*) FROM messages")[0][0] == total)
    one.stop()
    two.stop()
    stats = {r[0]: r[1:] for r in query(store, "SELECT listener_id, stored, duplicates"
                                               " FROM listener_stats")}
    assert set(stats) == {"L1", "L2"}
    assert stats["L1"][0] > 0 and stats["L2"][0] > 0, stats  # the broker split the load
    assert stats["L1"][0] + stats["L2"][0] == total, stats  # each stored exactly once
    assert stats["L1"][1] == stats["L2"][1] == 0


def test_tls_with_password_and_with_client_certificate(bundle, inputs, tmp_path):
    certs = make_certs(tmp_path / "certs")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    secured = Broker(tmp_path / "b1", users={"dev": "s3cret"}, tls=certs).start()
    try:
        store = tmp_path / "fleet.db"
        auth = ["--tls-ca", certs["ca.crt"], "--username", "dev", "--password-file", pw]
        listener = start_listener(secured.url, store, *auth)
        summary = replay(bundle, inputs["plain"], secured.url, "spk-0005", tmp_path / "s1",
                         "--window-inferences", "90", *auth)
        assert wait_until(lambda: seqs(store, "spk-0005", "window") == summary["window_seqs"])
        # A wrong password: refused, nothing lost (it stays in the spool), exit 1.
        bad = tmp_path / "bad"
        bad.write_text("wrong")
        proc = Proc(replay_args(bundle, inputs["plain"], secured.url, "spk-0006",
                                tmp_path / "s2", "--tls-ca", certs["ca.crt"], "--username",
                                "dev", "--password-file", bad, "--drain-timeout", "3"))
        assert proc.wait(120) == 1
        assert json.loads(proc.out[-1])["spool"]["pending"] > 0
        assert "refused" in proc.text().lower() or "not authori" in proc.text().lower()
        listener.stop()
    finally:
        secured.stop()

    mutual = Broker(tmp_path / "b2", tls=certs, require_client_cert=True).start()
    try:
        store = tmp_path / "fleet2.db"
        cert = ["--tls-ca", certs["ca.crt"], "--tls-cert", certs["client.crt"], "--tls-key",
                certs["client.key"]]
        listener = start_listener(mutual.url, store, *cert)
        summary = replay(bundle, inputs["plain"], mutual.url, "spk-0007", tmp_path / "s3",
                         "--window-inferences", "90", "--mqtt-version", "3.1.1", *cert)
        assert wait_until(lambda: seqs(store, "spk-0007", "window") == summary["window_seqs"])
        listener.stop()
    finally:
        mutual.stop()


def test_serve_answers_and_takes_commands(broker, bundle, build_demo, inputs, tmp_path):
    prefix, store = _prefix(), tmp_path / "fleet.db"
    listener = start_listener(broker.url, store, "--prefix", prefix)
    serve = Proc([EDGE_RUNTIME, "serve", bundle, "--http", "127.0.0.1:0", "--broker",
                  broker.url, "--device-id", "spk-0008", "--spool", tmp_path / "spool",
                  "--prefix", prefix, "--window-seconds", "1"])
    try:
        serve.wait_for("serving ")
        url = next(line for line in serve.err if "serving " in line).split(" on ")[-1].strip()
        with np.load(inputs["plain"]) as d:
            x = d["x"][:4]

        def post(body: bytes, ctype: str) -> dict:
            req = urllib.request.Request(f"{url}/v1/predict", data=body,
                                         headers={"Content-Type": ctype})
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())

        got = post(json.dumps({"inputs": x.tolist()}).encode(), "application/json")
        assert len(got["predictions"]) == 4 and all(0 < c <= 1 for c in got["confidence"])
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(b'{"inputs": [1, 2]}', "application/json")
        assert bad.value.code == 400

        sub, results = _subscriber(broker.url, f"{prefix}/spk-0008/results")
        pub = Connection(BrokerConfig.from_url(broker.url), "test-commander").start()
        assert pub.wait_connected(10)

        def command(payload: bytes, timeout: float = 120) -> dict:
            n = len(results)
            pub.publish(f"{prefix}/spk-0008/commands", payload)
            assert wait_until(lambda: len(results) > n, timeout=timeout), serve.text()
            return results[-1]["body"]

        assert command(b'{"id": "1", "command": "ping"}')["result"]["pong"] is True
        unknown = command(b'{"id": "2", "command": "selfdestruct"}')
        assert not unknown["ok"] and "unknown command" in unknown["error"]
        assert not command(b"{not json")["ok"]
        assert not command(b'{"id": "3", "command": "reload"}')["ok"]  # no bundle named
        broken = tmp_path / "broken.edgepack"
        broken.write_bytes(bundle.read_bytes()[:-100])
        failed = command(json.dumps({"id": "4", "command": "reload",
                                     "args": {"bundle": str(broken)}}).encode())
        assert not failed["ok"] and "still serving" in failed["error"]
        health = json.loads(urllib.request.urlopen(f"{url}/v1/health", timeout=10).read())
        old_sha = health["bundle"]["sha256"]
        assert post(json.dumps({"inputs": x.tolist()}).encode(), "application/json")

        other = build_demo("host-cpu").bundle
        done = command(json.dumps({"id": "5", "command": "reload",
                                   "args": {"bundle": other.as_uri()}}).encode())
        assert done["ok"], done
        health = json.loads(urllib.request.urlopen(f"{url}/v1/health", timeout=10).read())
        assert health["bundle"]["sha256"] != old_sha
        assert health["bundle"]["backend"] == "onnxruntime"
        again = post(np_bytes(x), "application/x-npy")
        assert again["predictions"] == got["predictions"]

        bench = command(b'{"id": "6", "command": "bench", "args": {"runs": 50}}')
        assert bench["ok"], bench
        assert bench["result"]["latency_ms"]["p50"] > 0
        assert bench["result"]["backend"] == "onnxruntime"
        assert serve.p.poll() is None  # nothing above took the device down
        sub.stop()
        pub.stop()
    finally:
        assert serve.stop() == 0, serve.text()
    # Restarted with the same command line and spool: the reloaded bundle serves again.
    again = Proc([EDGE_RUNTIME, "serve", bundle, "--http", "127.0.0.1:0", "--broker",
                  broker.url, "--device-id", "spk-0008", "--spool", tmp_path / "spool",
                  "--prefix", prefix])
    try:
        again.wait_for("a reload command installed")
        url = next(line for line in again.err if "serving " in line).split(" on ")[-1].strip()
        health = json.loads(urllib.request.urlopen(f"{url}/v1/health", timeout=10).read())
        assert health["bundle"]["backend"] == "onnxruntime"
    finally:
        assert again.stop() == 0, again.text()
        listener.stop()
    kinds = [r[0] for r in query(store, "SELECT kind FROM messages WHERE device_id = ?"
                                        " ORDER BY seq", ("spk-0008",))]
    assert kinds.count("result") == 7  # every command got its answer stored
    assert "window" in kinds
    state = query(store, "SELECT state, model_version FROM devices")[0]
    assert state[0] == "offline"


def np_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_usage_errors_exit_2(bundle, inputs, tmp_path):
    from tests.conftest import run_cmd

    cases = [
        ([EDGE_RUNTIME, "replay", bundle, "--inputs", inputs["plain"], "--device-id", "x",
          "--broker", "http://nope"], "not a broker URL"),
        ([EDGE_RUNTIME, "replay", bundle, "--inputs", inputs["plain"], "--device-id",
          "bad/id"], "device id"),
        ([EDGE_RUNTIME, "replay", bundle, "--inputs", inputs["plain"], "--device-id", "x",
          "--username", "u"], "needs --broker"),
    ]
    for args, message in cases:
        proc = run_cmd(*args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "x"\nmetric = "nonsense"\nabove = 1\n')
    proc = toolchain("listen", "--broker", "mqtt://127.0.0.1:1", "--rules", rules)
    assert proc.returncode == 2 and "metric 'nonsense'" in proc.stderr
    proc = toolchain("fleet", "--store", f"sqlite:///{tmp_path}/missing.db")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not (tmp_path / "missing.db").exists()


def parse_exposition(text: str) -> tuple[dict[str, str], list[tuple[str, dict, float]]]:
    """Prometheus' text format 0.0.4, strictly: (type per family, samples). Raises on any
    line that does not parse."""
    types: dict[str, str] = {}
    samples = []
    for line in text.split("\n")[:-1]:  # the text ends with a line feed
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types, line
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, f"not a sample line: {line!r}"
        labels, rest = {}, m.group(2) or ""
        while rest:
            lm = re.match(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\[\\"n])*)",?', rest)
            assert lm, f"bad labels in {line!r}"
            labels[lm.group(1)] = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n"
                                         else e.group(1), lm.group(2))
            rest = rest[lm.end():]
        samples.append((m.group(1), labels, float(m.group(3))))
    return types, samples


def test_metrics_label_values_are_escaped():
    from runtime.metrics import _labels

    nasty = 'a"b\\c\nd}'
    _, [(name, labels, value)] = parse_exposition(f"x{_labels({'v': nasty, 'w': 'ok'})} 1\n")
    assert (name, labels, value) == ("x", {"v": nasty, "w": "ok"}, 1.0)


def test_serve_metrics_over_http(bundle, tmp_path):
    """`GET /metrics` on a real `edge-runtime serve`, parsed back: counts, errors by kind,
    a cumulative latency histogram, spool, model and process figures."""
    serve = Proc([EDGE_RUNTIME, "serve", bundle, "--http", "127.0.0.1:0", "--device-id",
                  "spk-0011", "--spool", tmp_path / "spool", "--window-inferences", "3"])
    try:
        serve.wait_for("serving ")
        url = next(line for line in serve.err if "serving " in line).split(" on ")[-1].strip()

        def call(path: str, body: bytes | None = None, method: str | None = None) -> int:
            req = urllib.request.Request(f"{url}{path}", data=body, method=method,
                                         headers={"Content-Type": "application/x-npy"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        x = np.zeros((4, 1, 32, 32), np.float32)
        assert call("/v1/predict", np_bytes(x)) == 200
        assert call("/v1/predict", np_bytes(x[:1])) == 200
        assert call("/v1/predict", b"not npy") == 400
        assert call("/nowhere") == 404
        assert call("/metrics", b"x", "POST") == 405
        health = json.loads(urllib.request.urlopen(f"{url}/v1/health", timeout=10).read())
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = resp.read().decode()
    finally:
        assert serve.stop() == 0, serve.text()
    types, samples = parse_exposition(text)
    for name, _labels, _v in samples:  # every sample belongs to a declared family
        assert name in types or name.rsplit("_", 1)[0] in types, name

    def value(name: str, **labels: str) -> float:
        (v,) = [v for n, lab, v in samples if n == name and lab == labels]
        return v

    assert value("edgepack_inferences_total") == 5
    assert value("edgepack_requests_total", path="/v1/predict", code="200") == 2
    assert value("edgepack_requests_total", path="/v1/health", code="200") == 1
    assert value("edgepack_requests_total", path="other", code="404") == 1
    for kind in ("bad_request", "not_found", "method_not_allowed"):
        assert value("edgepack_errors_total", kind=kind) == 1
    assert types["edgepack_inference_seconds"] == "histogram"
    buckets = [(lab["le"], v) for n, lab, v in samples if n == "edgepack_inference_seconds_bucket"]
    counts = [v for _, v in buckets]
    assert buckets[-1][0] == "+Inf" and counts == sorted(counts) and counts[-1] == 2
    assert value("edgepack_inference_seconds_count") == 2
    assert 0 < value("edgepack_inference_seconds_sum") < 60
    (info,) = [lab for n, lab, _ in samples if n == "edgepack_model_info"]
    b = health["bundle"]
    assert info == {"model": b["model"], "version": b["version"], "backend": b["backend"],
                    "profile": b["profile"], "sha256": b["sha256"][:12]}
    # no broker: the windows of 3 inferences and the start-up events wait in the spool
    assert value("edgepack_spool_pending_records") >= 3 and value("edgepack_spool_bytes") > 0
    assert value("edgepack_spool_dropped_total") == 0 and value("edgepack_spool_lost_total") == 0
    assert value("edgepack_telemetry_connected") == 0
    assert value("process_resident_memory_bytes") > 10 * 2**20
    assert value("process_cpu_seconds_total") > 0 and value("edgepack_uptime_seconds") > 0


def test_serve_on_a_unix_socket_spools_without_a_broker(bundle, inputs, tmp_path):
    """No broker given: the device serves and spools; a later run with a broker sends it."""
    import http.client
    import socket

    sock_path = tmp_path / "rt.sock"
    serve = Proc([EDGE_RUNTIME, "serve", bundle, "--socket", sock_path, "--device-id",
                  "spk-0009", "--spool", tmp_path / "spool", "--window-inferences", "2"])
    try:
        serve.wait_for("serving ")

        class UnixConnection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(sock_path))

        with np.load(inputs["plain"]) as d:
            x = d["x"][:2]
        conn = UnixConnection("localhost")
        conn.request("POST", "/v1/predict", body=np_bytes(x),
                     headers={"Content-Type": "application/x-npy"})
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())["predictions"]) == 2
        conn.request("GET", "/v1/health")
        health = json.loads(conn.getresponse().read())
        assert health["telemetry"]["broker"] is None and health["telemetry"]["spool"]["pending"]
    finally:
        assert serve.stop() == 0, serve.text()
    from runtime.spool import Spool

    kinds = [json.loads(r.payload)["kind"] for r in Spool(tmp_path / "spool").pending()]
    assert kinds == ["event", "event", "window"]  # loaded, self-test, one window of 2


def test_a_message_the_store_refuses_is_redelivered_not_lost(broker, bundle, inputs, tmp_path):
    prefix, store = _prefix(), tmp_path / "fleet.db"
    listener = start_listener(broker.url, store, "--prefix", prefix)
    query(store, "CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.device_id ="
                 " 'spk-0010' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    # --ack broker: the device lets go when the broker has them; the redelivery to the
    # listener is what is under test here
    summary = replay(bundle, inputs["plain"], broker.url, "spk-0010", tmp_path / "spool",
                     "--prefix", prefix, "--window-inferences", "90", "--ack", "broker")
    assert summary["spool"]["drained"]  # the broker has them
    time.sleep(3)
    assert seqs(store, "spk-0010") == []
    query(store, "DROP TRIGGER refuse")
    assert wait_until(lambda: seqs(store, "spk-0010") == list(
        range(1, summary["spool"]["next_seq"])), timeout=30), listener.text()
    listener.stop()
    assert "redelivers" in listener.text()


# -- end-to-end acknowledgement ------------------------------------------------------------------
def _fleet_of_devices(bundle: Path, inputs: Path, url: str, prefix: str, spools: Path,
                      *extra) -> Proc:
    """tests/fleet_devices.py: many Device instances in one torch-free process."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return Proc([RUNTIME_VENV / "bin" / "python", REPO / "tests" / "fleet_devices.py", bundle,
                 "--inputs", inputs, "--broker", url, "--prefix", prefix, "--spools", spools,
                 *extra], env={**os.environ, "PYTHONPATH": path})


def test_broker_restart_under_shared_subscription_listeners_loses_nothing(bundle, inputs,
                                                                         tmp_path):
    """Mosquitto, without persistence (it forgets sessions, queued messages and shared
    subscriptions, as a broker losing its state does), stops for 30 s and comes back on the
    same port while 20 devices publish windows to two listeners of one shared-subscription
    group: every record each device spooled is stored exactly once. The listeners are held
    (SIGSTOP) until 5 s after the broker is back, so the devices' backlog surely reaches a
    broker where no shared subscription exists yet: the race a fleet loses whenever devices
    reconnect before the listeners (with `--ack broker` a few hundred records are lost)."""
    prefix, store = _prefix(), tmp_path / "fleet.db"
    mosq = Broker(tmp_path / "broker", persistence=False).start()
    listeners = [start_listener(mosq.url, store, "--prefix", prefix, "--group", "g",
                                listener_id=f"L{i}") for i in (1, 2)]
    fleet = _fleet_of_devices(bundle, inputs["plain"], mosq.url, prefix, tmp_path / "spools",
                              "--devices", "20", "--rate", "100", "--window-inferences", "10",
                              "--ack-timeout", "2", "--drain-timeout", "120")
    try:
        fleet.wait_for("started", timeout=180)
        assert wait_until(lambda: query(store, "SELECT COUNT(DISTINCT device_id) FROM messages"
                                               " WHERE kind = 'window'")[0][0] == 20,
                          timeout=60), fleet.text()
        mosq.stop()
        for listener in listeners:
            listener.p.send_signal(signal.SIGSTOP)
        time.sleep(30)
        mosq.start()
        time.sleep(5)
        for listener in listeners:
            listener.p.send_signal(signal.SIGCONT)
        time.sleep(10)  # windows keep coming after the restart
        assert fleet.stop(timeout=300) == 0, fleet.text()
        devices = json.loads(fleet.out[-1])["devices"]
    finally:
        if fleet.p.poll() is None:
            fleet.stop(signal.SIGKILL)
        for listener in listeners:
            listener.p.send_signal(signal.SIGCONT)
            listener.stop()
        mosq.stop()
    assert len(devices) == 20
    for device, summary in devices.items():
        assert summary["drained"] and summary["pending"] == 0, (device, summary)
        assert len(summary["window_seqs"]) >= 15, (device, summary)  # before, during, after
        # no gap: every window and event the device spooled is in the store
        assert seqs(store, device) == list(range(1, summary["next_seq"])), device
        assert seqs(store, device, "window") == summary["window_seqs"]
    total = sum(s["next_seq"] - 1 for s in devices.values())
    assert query(store, "SELECT COUNT(*) FROM messages")[0][0] == total
    stored = query(store, "SELECT listener_id, stored FROM listener_stats ORDER BY listener_id")
    assert [r[0] for r in stored] == ["L1", "L2"]
    assert sum(r[1] for r in stored) == total  # each stored exactly once, by one of them
    # the outage lost PUBACKed messages, and the devices sent them again
    assert sum(s["resent"] for s in devices.values()) > 0


def test_a_record_no_listener_acknowledged_stays_spooled_and_is_resent(broker, bundle,
                                                                       tmp_path):
    prefix, store = _prefix(), tmp_path / "fleet.db"
    # an observer sees what the broker accepted and forwarded: the device's records do reach
    # the broker (PUBACKed), but no listener stores them yet
    sub, seen = _subscriber(broker.url, f"{prefix}/spk-0011/events")
    serve = Proc([EDGE_RUNTIME, "serve", bundle, "--http", "127.0.0.1:0", "--broker",
                  broker.url, "--device-id", "spk-0011", "--spool", tmp_path / "spool",
                  "--prefix", prefix, "--ack-timeout", "1"])
    listener = None
    try:
        serve.wait_for("serving ")
        url = next(line for line in serve.err if "serving " in line).split(" on ")[-1].strip()

        def pending() -> int:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=10) as resp:
                return json.loads(resp.read())["telemetry"]["spool"]["pending"]

        # model_loaded and self_test: sent, PUBACKed, unacknowledged, sent again after 1 s
        assert wait_until(lambda: all([m["seq"] for m in seen].count(s) >= 2 for s in (1, 2)),
                          timeout=30), seen
        assert pending() == 2
        listener = start_listener(broker.url, store, "--prefix", prefix)
        # the next resend (the backoff doubles up to 8 s) reaches the listener, which acks
        assert wait_until(lambda: pending() == 0, timeout=60), serve.text()
        assert seqs(store, "spk-0011") == [1, 2]
    finally:
        assert serve.stop() == 0, serve.text()
        if listener is not None:
            listener.stop()
        sub.stop()
    duplicates = query(store, "SELECT duplicates FROM listener_stats")[0][0]
    assert duplicates <= 2  # at most one resend of each crossed the listener's ack
