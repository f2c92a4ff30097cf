"""Forged and hostile acks: anyone the broker lets publish on `<prefix>/<device>/acks` can
send a device anything there. Through a real Mosquitto, the device counts and ignores every
ack that is not well formed (10 MB, deep nesting, wrong types, unsorted or too many ranges),
keeps running, and releases no record such an ack named; a well-formed ack releases only
what the spool holds, however wide its ranges. Hypothesis fuzzes the parser."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from runtime import protocol
from runtime.mqtt import BrokerConfig
from runtime.protocol import MAX_ACK_RANGES, MessageRejected, parse_ack
from runtime.telemetry import Telemetry, TelemetryOptions
from tests.fleet_helpers import wait_until
from tests.mqtt_broker import Broker

pytestmark = pytest.mark.timeout(300)


def _ack(**change) -> bytes:
    msg = {"schema": protocol.SCHEMA_VERSION, "kind": "ack", "listener": "L1",
           "ranges": [[1, 5]], **change}
    return json.dumps(msg).encode()


# Each names seqs 1..5 one way or another, so that accepting it would release them.
HOSTILE = {
    "10 MB": b'{"schema":1,"kind":"ack","listener":"L","ranges":[' + b"[1,5]," * 1_700_000
             + b"[9,9]]}",
    "nested": b"[" * 100_000 + b"]" * 100_000,
    "nested in a field": _ack(listener=json.loads("[" * 40 + "]" * 40)),
    "not JSON": b"\xff\xfe ranges [[1,5]]",
    "empty": b"",
    "NaN": b'{"schema":1,"kind":"ack","listener":"L","ranges":[[1,NaN]]}',
    "a list": b"[[1, 5]]",
    "no ranges": _ack(ranges=None),
    "ranges as text": _ack(ranges="1-5"),
    "text numbers": _ack(ranges=[["1", "5"]]),
    "floats": _ack(ranges=[[1.0, 5.0]]),
    "booleans": _ack(ranges=[[True, 5]]),
    "three numbers": _ack(ranges=[[1, 3, 5]]),
    "reversed": _ack(ranges=[[5, 1]]),
    "negative": _ack(ranges=[[-5, 5]]),
    "past 2^63": _ack(ranges=[[1, 2**64]]),
    "50 digits": _ack(ranges=[[1, 10**50]]),
    "overlapping": _ack(ranges=[[1, 3], [2, 5]]),
    "unsorted": _ack(ranges=[[4, 5], [1, 3]]),
    "too many": _ack(ranges=[[i * 2 + 1, i * 2 + 1] for i in range(MAX_ACK_RANGES + 1)]),
    "wrong schema": _ack(schema=99),
    "wrong kind": _ack(kind="window"),
    "listener a number": _ack(listener=5),
}


@pytest.fixture
def mosquitto(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def _device(folder: Path, url: str, prefix: str) -> Telemetry:
    opts = TelemetryOptions(device_id="dev-1", spool_dir=folder, prefix=prefix,
                            broker=BrokerConfig.from_url(url), ack_timeout_s=600)
    return Telemetry(opts, {"model": "m", "version": "1"}, None, 3, {}).start()


@pytest.mark.slow
def test_hostile_acks_are_counted_and_ignored_and_release_nothing(mosquitto, tmp_path):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    tel = _device(tmp_path / "spool", mosquitto.url, prefix)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"forger-{uuid.uuid4().hex[:6]}")
    try:
        assert tel.conn is not None and tel.conn.wait_connected(10)
        for i in range(5):
            tel.event("e", i=i)
        assert wait_until(lambda: tel._subscribed_on == tel.conn.connects, timeout=10)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        topic = protocol.topic(prefix, "dev-1", protocol.ACKS)

        def send(payload: bytes) -> None:
            pub.publish(topic, payload, qos=1).wait_for_publish(30)

        for payload in HOSTILE.values():
            send(payload)
        assert wait_until(lambda: tel.bad_acks == len(HOSTILE), timeout=60), tel.bad_acks
        assert tel.spool.pending_count == 5 and tel.spool.acked == 0
        # still serving: a new record goes out, and well-formed acks work
        tel.event("after")
        send(_ack(ranges=[[100, 2**63 - 1]]))  # never issued: ignored
        send(_ack(ranges=[[2, 2]]))
        assert wait_until(lambda: tel.spool.pending_count == 5, timeout=10)
        assert [r.seq for r in tel.spool.pending()] == [1, 3, 4, 5, 6]
        start = time.monotonic()
        send(_ack(ranges=[[0, 2**63 - 1]]))  # 2^63 wide: costs what the spool holds
        assert wait_until(tel.drained, timeout=10)
        assert time.monotonic() - start < 10
        assert tel.spool.acked == 6 and tel.bad_acks == len(HOSTILE)
    finally:
        pub.loop_stop()
        stats = tel.close(drain_timeout=0)
    assert stats["bad_acks"] == len(HOSTILE) and stats["pending"] == 0


def _json_values() -> st.SearchStrategy:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                       st.floats(allow_nan=False), st.text(max_size=5))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
        max_leaves=20)


def _ack_like() -> st.SearchStrategy[bytes]:
    ranges = st.one_of(_json_values(), st.lists(st.lists(
        st.one_of(st.integers(-3, 2**64), _json_values()), min_size=0, max_size=3),
        max_size=6))
    msg = st.fixed_dictionaries({}, optional={
        "schema": st.one_of(st.just(1), _json_values()),
        "kind": st.one_of(st.just("ack"), _json_values()),
        "listener": st.one_of(st.just("L1"), _json_values()),
        "ranges": ranges})
    return st.one_of(msg.map(lambda m: json.dumps(m).encode()), st.binary(max_size=64))


@settings(max_examples=500, deadline=None)
@given(payload=_ack_like())
def test_fuzzed_acks_parse_or_are_refused_in_one_line(payload):
    try:
        ranges = parse_ack(payload)
    except MessageRejected as exc:
        assert "\n" not in str(exc) and str(exc).startswith("ack: ")
        return
    last = -1
    for lo, hi in ranges:  # what an accepted ack gives is what ack_ranges may rely on
        assert type(lo) is int and type(hi) is int and last < lo <= hi <= protocol.MAX_INT
        last = hi
