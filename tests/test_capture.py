"""Opt-in data capture on a real bundle: the capture messages a device spools decode back to
exactly the inputs it served, with their predictions, confidences, labels and late labels;
the byte cap holds; messages stay within the protocol's payload limit; options are checked.
With capture off, nothing a device publishes to a real Mosquitto carries its inputs."""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from runtime import protocol
from runtime.capture import (
    CAPTURE_CHUNK_BYTES,
    CAPTURE_CHUNK_SAMPLES,
    CAPTURE_LATE_LABELS,
    Capture,
    as_fraction,
    nth_sampled,
)
from runtime.device import Device
from runtime.mqtt import BrokerConfig, Connection
from runtime.telemetry import Telemetry, TelemetryOptions
from tests import test_feedback
from tests.conftest import run_cmd
from tests.fleet_helpers import EDGE_RUNTIME, Proc, wait_until
from tests.mqtt_broker import Broker

PREFIX = protocol.DEFAULT_PREFIX
# the demo bundle fixture and the spool reader of the feedback tests (digits: conftest's)
bundle, spooled = test_feedback.bundle, test_feedback.spooled


def decode(body: dict) -> np.ndarray:
    data = base64.b64decode(body["data"], validate=True)
    return np.frombuffer(data, dtype="<f4").reshape(body["shape"])


def check_message(topic: str, payload: bytes) -> dict:
    """What a listener takes: the envelope validates, the body is consistent and bounded."""
    kind, msg = protocol.validate(topic, payload, PREFIX)
    assert kind == "capture" and msg["kind"] == "capture"
    assert len(payload) <= protocol.MAX_PAYLOAD_BYTES
    body = msg["body"]
    n = body["shape"][0]
    assert body["format"] == 1 and body["dtype"] == "float32"
    assert n <= CAPTURE_CHUNK_SAMPLES
    assert len(base64.b64decode(body["data"])) == math.prod(body["shape"]) * 4 \
        <= CAPTURE_CHUNK_BYTES
    for key in ("inference_ids", "predictions", "confidence", "labels"):
        assert len(body[key]) == n, key
    assert len(body["late_labels"]) <= CAPTURE_LATE_LABELS
    return body


def test_the_stride_takes_n_where_floor_n_times_rate_steps():
    for rate in (1.0, 0.5, 0.25, 0.1, 1 / 3, 0.3, 0.07, 0.999, 1e-6):
        r = as_fraction(rate)
        picked = [n for n in range(1, 3001) if n * r // 1 > (n - 1) * r // 1]
        assert [nth_sampled(k, r) for k in range(1, len(picked) + 1)] == picked, rate
    assert nth_sampled(1, as_fraction(0.1)) == 10 and nth_sampled(2, as_fraction(1 / 3)) == 6
    assert nth_sampled(10**18, as_fraction(1.0)) == 10**18  # exact however far along


def test_captured_chunks_decode_to_the_inputs_with_labels_and_the_cap_holds(
        bundle, digits, tmp_path):
    x, y = digits
    x = np.concatenate([x, x[::-1] * 0.5])  # 538 inputs
    y = np.concatenate([y, y[::-1]])
    cap_mb = 0.4
    cap = int(cap_mb * 2**20)
    per_sample = x[0].size * 4
    spool = tmp_path / "spool"
    served: dict[str, tuple[int, float]] = {}
    given: dict[str, int] = {}
    with Device.open(bundle, device_id="cap-1", spool_dir=spool, capture_rate=0.5,
                     capture_max_mb=cap_mb, window_inferences=50) as dev:
        names: list[str] = []
        for i in range(0, len(x), 7):
            ids, conf, batch_names = dev.classify(x[i:i + 7], with_ids=True)
            names += batch_names
            served.update({name: (int(p), float(c))
                           for name, p, c in zip(batch_names, ids, conf, strict=True)})
            for j, name in enumerate(batch_names):  # labels while most are still pending
                if (i + j) % 3 == 0:
                    dev.feedback(name, int(y[i + j]))
                    given[name] = int(y[i + j])
        dev.telemetry.flush()  # everything captured has shipped now
        for k, name in enumerate(names):  # labels after their samples shipped: late
            if k % 3 == 1:
                dev.feedback(name, int(y[k]))
                given[name] = int(y[k])
        totals = dict(dev.capture.total)
    messages = spooled(spool)
    bodies = [check_message(t, p) for t, p, m in messages if m["kind"] == "capture"]
    assert all(m["bundle"]["sha256"] == dev.info["sha256"]
               for _, _, m in messages if m["kind"] == "capture")

    # exactly the inputs the stride picked (every 2nd inference), up to the cap
    fit = cap // per_sample
    expect_n = [n for n in range(2, len(x) + 1, 2)][:fit]
    got_ids = [i for b in bodies for i in b["inference_ids"]]
    assert got_ids == [f"{dev.session}-{n}" for n in expect_n]
    samples = np.concatenate([decode(b) for b in bodies if b["shape"][0]])
    assert samples.dtype == np.float32 and samples.shape == (fit, *x.shape[1:])
    assert np.array_equal(samples, x[np.array(expect_n) - 1])
    assert sum(b["shape"][0] for b in bodies) * per_sample == totals["bytes"] <= cap
    assert totals["samples"] == fit and totals["dropped"] >= 1

    # predictions and confidence as served; each label once, inline or late
    preds = [p for b in bodies for p in b["predictions"]]
    confs = [c for b in bodies for c in b["confidence"]]
    assert preds == [served[i][0] for i in got_ids]
    assert confs == pytest.approx([served[i][1] for i in got_ids], abs=1e-6)
    labels: dict[str, int] = {}
    inline = late = 0
    for b in bodies:
        for name, label in zip(b["inference_ids"], b["labels"], strict=True):
            if label is not None:
                labels[name] = label
                inline += 1
        for name, label in b["late_labels"]:
            assert name not in labels
            labels[name] = label
            late += 1
    assert labels == {name: given[name] for name in got_ids if name in given}
    assert inline and late

    events = [m["body"] for _, _, m in messages if m["kind"] == "event"]
    assert [e["event"] for e in events].count("capture_cap_reached") == 1
    sections = [m["body"]["capture"] for _, _, m in messages if m["kind"] == "window"]
    assert sum(s["samples"] for s in sections) == fit
    assert sum(s["bytes"] for s in sections) == totals["bytes"]
    assert sum(s["dropped"] for s in sections) == totals["dropped"]


def test_messages_stay_within_the_payload_limit_at_the_worst(tmp_path):
    """A full message of samples (CAPTURE_CHUNK_SAMPLES of them, CAPTURE_CHUNK_BYTES in
    all), the longest ids, the widest labels and almost a message's worth of late labels in
    the same message: it still fits what the listener accepts."""
    opts = TelemetryOptions(device_id="cap-worst", spool_dir=tmp_path / "spool",
                            capture_rate=1.0)
    info = {"sha256": "0" * 64, "model": "m", "version": "1"}
    tel = Telemetry(opts, info, None, 65536, {})
    try:
        cap = Capture(tel, "abcdef01", 1.0, 64 * 2**20)
        first = 10**18  # the counter far along: ids of 28 characters
        size = CAPTURE_CHUNK_BYTES // CAPTURE_CHUNK_SAMPLES // 4
        rows = np.full((1024, size), 0.123456789, np.float32)

        def take(count: int, at: int) -> None:
            cap.take(rows[:count], at, np.full(count, 65535), np.full(count, 0.987654321))

        take(1024, first)
        cap.flush()
        take(512, first + 1024)  # a full message pending
        for n in range(first, first + CAPTURE_LATE_LABELS - 1):
            cap.label(n, 65535)  # late: shipped already
        take(1, first + 1536)  # ships the full message with all those late labels
        cap.flush()
        cap.take(np.zeros((2, 40_000), np.float32), first + 1537,  # bigger than a message
                 np.zeros(2, int), np.ones(2))
        assert cap.total["dropped"] == 2
    finally:
        tel.close(0)
    found = [(t, p) for t, p, m in spooled(tmp_path / "spool") if m["kind"] == "capture"]
    bodies = [check_message(t, p) for t, p in found]
    assert [b["shape"][0] for b in bodies] == [512, 512, 512, 1]
    assert [len(b["late_labels"]) for b in bodies] == [0, 0, CAPTURE_LATE_LABELS - 1, 0]
    assert max(len(p) for _, p in found) < protocol.MAX_PAYLOAD_BYTES


def test_serving_threads_may_capture_in_any_order(tmp_path):
    """Inference numbers are handed out under the model lock and captures taken after it,
    so a later batch may reach `take` first: each picked row still goes with its own id."""
    opts = TelemetryOptions(device_id="cap-order", spool_dir=tmp_path / "spool",
                            capture_rate=0.5)
    tel = Telemetry(opts, {"sha256": "0" * 64, "model": "m", "version": "1"}, None, 10, {})
    try:
        cap = Capture(tel, "abcdef01", 0.5, 2**20)
        rows = np.arange(1, 13, dtype=np.float32)[:, None]  # row n holds the value n
        for first, count in ((5, 4), (1, 4), (11, 2), (9, 2)):  # out of order
            batch = rows[first - 1:first - 1 + count]
            cap.take(batch, first, batch[:, 0].astype(int), np.full(count, 0.5))
        cap.flush()
    finally:
        tel.close(0)
    bodies = [check_message(t, p) for t, p, m in spooled(tmp_path / "spool")
              if m["kind"] == "capture"]
    got = {int(i.rsplit("-", 1)[1]): (float(x[0]), pred) for b in bodies
           for i, x, pred in zip(b["inference_ids"], decode(b), b["predictions"], strict=True)}
    assert got == {n: (float(n), n) for n in (2, 4, 6, 8, 10, 12)}  # every other one


@pytest.mark.parametrize("field,value,words", [
    ("capture_rate", -0.1, "capture_rate must be 0 (off) or a number from"),
    ("capture_rate", 1.5, "capture_rate must be 0 (off) or a number from"),
    ("capture_rate", 1e-9, "capture_rate must be 0 (off) or a number from"),
    ("capture_rate", float("nan"), "capture_rate must be 0 (off) or a number from"),
    ("capture_rate", "0.5", "capture_rate must be 0 (off) or a number from"),
    ("capture_rate", True, "capture_rate must be 0 (off) or a number from"),
    ("capture_max_mb", 0, "capture_max_mb must be a positive number"),
    ("capture_max_mb", float("inf"), "capture_max_mb must be a positive number"),
])
def test_capture_options_are_checked(tmp_path, field, value, words):
    opts = TelemetryOptions(device_id="d", spool_dir=tmp_path, **{field: value})
    with pytest.raises(ValueError, match=re.escape(words)):
        opts.validate()


def test_capture_needs_telemetry_and_the_cli_checks_its_flags(bundle, digits_test_npz,
                                                             runtime_venv, tmp_path):
    with pytest.raises(ValueError, match="capture needs telemetry"):
        Device.open(bundle, capture_rate=0.5)
    for flag, value in (("--capture-rate", "1.5"), ("--capture-max-mb", "0")):
        proc = run_cmd(EDGE_RUNTIME, "replay", bundle, "--inputs", digits_test_npz,
                       "--device-id", "d", "--spool", tmp_path / "spool", flag, value)
        assert proc.returncode == 2 and flag in proc.stderr, proc.stderr


# -- on the wire: a real broker sees no input bytes unless capture is on ------------------------
def traces(x: np.ndarray) -> list[list[bytes]]:
    """What each sample's bytes look like inside a payload: raw, hex, and base64 at each of
    the three alignments a sample can start at within a longer base64 text."""
    out = []
    for row in x:
        raw = row.astype("<f4").tobytes()
        out.append([raw[64:128], raw.hex()[:128].encode(),
                    *(base64.b64encode(raw[k:])[8:72] for k in range(3))])
    return out


def run_on_the_wire(broker: Broker, bundle: Path, inputs: Path, spool: Path,
                    *extra: str) -> tuple[dict, list[tuple[str, bytes]]]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    seen: list[tuple[str, bytes]] = []
    sub = Connection(BrokerConfig.from_url(broker.url), f"spy-{uuid.uuid4().hex[:6]}",
                     on_message=lambda m: seen.append((m.topic, bytes(m.payload))))
    sub._on_connect_cb = lambda _present: sub.subscribe(["#"])
    sub.start()
    try:
        assert sub.wait_connected(10)
        wait_until(lambda: False, timeout=0.3)  # the SUBSCRIBE reaches the broker
        proc = Proc([EDGE_RUNTIME, "replay", bundle, "--inputs", inputs, "--broker",
                     broker.url, "--device-id", "wire-1", "--spool", spool, "--prefix",
                     prefix, "--ack", "broker", "--json", "--reconnect-max", "1",
                     "--window-inferences", "40", "--feedback-share", "1", *extra])
        assert proc.wait(300) == 0, proc.text()
        summary = json.loads(proc.out[-1])
        spooled_count = summary["windows"] + 2 + summary.get("capture", {}).get("messages", 0)
        assert wait_until(lambda: sum(1 for t, _ in seen if not t.endswith("/status"))
                          >= spooled_count, timeout=30), len(seen)
    finally:
        sub.stop()
    return summary, [(t, p) for t, p in seen if t.startswith(prefix + "/")]


def test_capture_off_no_input_bytes_leave_the_device_and_on_they_do(broker, bundle, digits,
                                                                    runtime_venv, tmp_path):
    x, y = digits
    rng = np.random.default_rng(13)
    odd = (x[:120] * np.float32(0.731) + rng.uniform(0.01, 0.02, x[:120].shape)) \
        .astype(np.float32)  # values no other input has
    inputs = tmp_path / "odd.npz"
    np.savez(inputs, x=odd, y=y[:120])
    per_sample = traces(odd)
    marks = [m for sample in per_sample for m in sample]

    summary, seen = run_on_the_wire(broker, bundle, inputs, tmp_path / "spool-off")
    assert summary["inferences"] == 120 and summary["feedback"]["accepted"] == 120
    assert "capture" not in summary
    assert seen and not [t for t, _ in seen if t.endswith("/capture")]
    assert {t.rsplit("/", 1)[1] for t, _ in seen} <= {"telemetry", "events", "status"}
    leaked = [(t, m[:16]) for t, p in seen for m in marks if m in p]
    assert not leaked, leaked[:3]
    windows = [json.loads(p)["body"] for t, p in seen if t.endswith("/telemetry")]
    assert sum(w.get("feedback", {}).get("count", 0) for w in windows) == 120
    assert all("capture" not in w for w in windows)

    # the control: with capture on, the same search finds the inputs in capture messages
    summary, seen = run_on_the_wire(broker, bundle, inputs, tmp_path / "spool-on",
                                    "--capture-rate", "1")
    captured = [p for t, p in seen if t.endswith("/capture")]
    assert summary["capture"]["samples"] == 120 and captured
    assert all(any(m in p for p in captured for m in sample[2:])  # each sample's base64
               for sample in per_sample)
    assert sum(json.loads(p)["body"]["shape"][0] for p in captured) == 120
