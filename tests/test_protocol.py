"""runtime.protocol: the envelope a device builds is what the listener's validation
accepts, and validation names what is wrong with anything else."""

from __future__ import annotations

import json

import pytest

from runtime import protocol
from runtime.protocol import MessageRejected

BUNDLE = {"sha256": "ab" * 32, "model": "demo", "version": "1"}


def _wire(msg: dict) -> bytes:
    return json.dumps(msg).encode()


def _message(kind: str = "window", device: str = "spk-1", seq: int = 5) -> dict:
    return protocol.envelope(kind, device, BUNDLE, {"count": 3}, boot="b", seq=seq)


@pytest.mark.parametrize("topic_kind,kind", [("telemetry", "window"), ("events", "event"),
                                             ("results", "result"), ("status", "status")])
def test_envelope_round_trips_through_validation(topic_kind, kind):
    msg = _message(kind)
    topic = protocol.topic("fleet/eu", "spk-1", topic_kind)
    got_kind, got = protocol.validate(topic, _wire(msg), "fleet/eu")
    assert got_kind == topic_kind and got == msg
    assert got["schema"] == protocol.SCHEMA_VERSION and got["device_id"] == "spk-1"
    assert set(got["time"]) == {"wall", "mono", "boot"} and got["bundle"] == BUNDLE


def test_a_spooled_envelope_leaves_seq_to_the_spool():
    assert "seq" not in protocol.envelope("event", "spk-1", BUNDLE, {}, boot="b")


@pytest.mark.parametrize("change,topic_kind,problem", [
    ({"schema": 99}, "telemetry", "schema 99"),
    ({"device_id": "spk-2"}, "telemetry", "device_id 'spk-2' does not match"),
    ({}, "events", "kind 'window' does not belong on events"),
    ({}, "commands", "kind 'window' does not belong on commands"),
    ({"seq": -1}, "telemetry", "seq -1 is not a sequence number"),
    ({"seq": 1.5}, "telemetry", "seq 1.5 is not a sequence number"),
    ({"seq": "7"}, "telemetry", "seq '7' is not a sequence number"),
    ({"seq": True}, "telemetry", "seq True is not a sequence number"),
    ({"body": [1, 2]}, "telemetry", "body is not a JSON object"),
])
def test_validation_names_the_problem(change, topic_kind, problem):
    msg = {**_message(), **change}
    with pytest.raises(MessageRejected, match=problem.replace(".", r"\.")):
        protocol.validate(protocol.topic("edgepack", "spk-1", topic_kind), _wire(msg),
                          "edgepack")


def test_validation_rejects_foreign_topics_and_payloads():
    good = _wire(_message())
    with pytest.raises(MessageRejected, match="not under other/<device>/<kind>"):
        protocol.validate("edgepack/spk-1/telemetry", good, "other")
    with pytest.raises(MessageRejected, match="not JSON"):
        protocol.validate("edgepack/spk-1/telemetry", b"\xff{", "edgepack")
    with pytest.raises(MessageRejected, match="not a JSON object"):
        protocol.validate("edgepack/spk-1/telemetry", b"[1]", "edgepack")


def test_listener_topics_and_names():
    assert protocol.listener_topics("ep") == ["ep/+/telemetry", "ep/+/events", "ep/+/results",
                                              "ep/+/capture", "ep/+/status"]
    assert protocol.listener_topics("ep", "g")[0] == "$share/g/ep/+/telemetry"
    assert protocol.trigger_topic("ep") == "ep/_fleet/triggers"
    # the triggers topic never parses as a device's message
    with pytest.raises(MessageRejected):
        protocol.validate(protocol.trigger_topic("ep"), _wire(_message(device="_fleet")),
                          "ep")
    protocol.check_names("spk-0042", "edgepack/eu")
    with pytest.raises(ValueError, match="device id"):
        protocol.check_names("_fleet", "edgepack")
    with pytest.raises(ValueError, match="topic prefix"):
        protocol.check_names("spk-1", "edgepack/#")


# -- end-to-end acks ----------------------------------------------------------------------------
def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching ('+' one level, '#' the rest), after a $share/<group>/ prefix."""
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        levels = levels[2:]
    parts = topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(parts) or level not in ("+", parts[i]):
            return False
    return len(levels) == len(parts)


def test_listeners_never_subscribe_to_the_acks_they_publish():
    acks = protocol.topic("ep", "spk-1", protocol.ACKS)
    assert acks == "ep/spk-1/acks"
    for group in (None, "g"):
        filters = protocol.listener_topics("ep", group)
        assert any(_matches(f, "ep/spk-1/telemetry") for f in filters)  # the matcher works
        assert not any(_matches(f, acks) for f in filters)


def test_seq_ranges_sorts_merges_and_drops_repeats():
    assert protocol.seq_ranges([]) == []
    assert protocol.seq_ranges([7, 1, 2, 3, 5, 6, 3, 10]) == [(1, 3), (5, 7), (10, 10)]
    assert protocol.seq_ranges(range(1, 100_001)) == [(1, 100_000)]


@pytest.mark.parametrize("listener_id", ["L1", 'we"ird\\\u00e9/\u2028id', ""])
def test_ack_payloads_are_the_compact_json_of_the_ack(listener_id):
    """Written without json.dumps (one per device and batch): the very bytes it would give."""
    ranges = [(1, 1), (5, 9), *((i, i + 1) for i in range(20, 2100, 3))]
    want = [json.dumps({"schema": protocol.SCHEMA_VERSION, "kind": "ack",
                        "listener": listener_id, "ranges": [list(r) for r in ranges[i:i + cap]]},
                       separators=(",", ":")).encode()
            for cap in [protocol.MAX_ACK_RANGES] for i in range(0, len(ranges), cap)]
    assert protocol.ack_payloads(ranges, listener_id) == want


def test_ack_payloads_round_trip_and_split_at_the_cap():
    ranges = protocol.seq_ranges(range(0, 4 * protocol.MAX_ACK_RANGES + 10, 2))  # 2005, apart
    payloads = protocol.ack_payloads(ranges, "L1")
    assert len(payloads) == 3
    got = [r for p in payloads for r in protocol.parse_ack(p)]
    assert got == ranges
    first = json.loads(payloads[0])
    assert first["kind"] == "ack" and first["listener"] == "L1"
    assert first["schema"] == protocol.SCHEMA_VERSION
    assert len(first["ranges"]) == protocol.MAX_ACK_RANGES
    assert protocol.ack_payloads([], "L1") == []
    top = [(protocol.MAX_INT, protocol.MAX_INT)]
    assert protocol.parse_ack(protocol.ack_payloads(top, "L1")[0]) == top


def _ack(**change) -> bytes:
    msg = {"schema": protocol.SCHEMA_VERSION, "kind": "ack", "listener": "L1",
           "ranges": [[1, 3], [5, 5]], **change}
    return json.dumps(msg).encode()


@pytest.mark.parametrize("payload,problem", [
    (_ack(schema=2), "expected schema 1 kind 'ack'"),
    (_ack(kind="window"), "expected schema 1 kind 'ack'"),
    (_ack(listener=7), "listener 7 is not text"),
    (_ack(ranges={"1": 3}), "ranges {'1': 3} is not a list"),
    (_ack(ranges=[[1, 2, 3]]), r"range \[1, 2, 3\] is not \[lo, hi\]"),
    (_ack(ranges=[[3, 1]]), r"range \[3, 1\] is not"),
    (_ack(ranges=[[-1, 1]]), r"range \[-1, 1\] is not"),
    (_ack(ranges=[[1, 2**63]]), "is not"),
    (_ack(ranges=[[1, 2.0]]), r"range \[1, 2.0\] is not"),
    (_ack(ranges=[[True, 2]]), r"range \[True, 2\] is not"),
    (_ack(ranges=[["1", "2"]]), "is not"),
    (_ack(ranges=[5]), "range 5 is not"),
    (_ack(ranges=[[5, 9], [1, 2]]), "overlaps or precedes"),
    (_ack(ranges=[[5, 9], [9, 12]]), "overlaps or precedes"),
    (_ack(ranges=[[1, 1]] * (protocol.MAX_ACK_RANGES + 1)), "1001 ranges, at most 1000"),
    (_ack(ranges=[[1, 10**50]]), "integer of 51 digits"),
    (b"[" * 100 + b"]" * 100, "nests 100 levels"),
    (b"x" * (protocol.MAX_PAYLOAD_BYTES + 1), "limit is"),
    (b"\xff", "not UTF-8"),
    (b"[]", "not a JSON object"),
    (b'{"ranges": NaN}', "NaN"),
])
def test_parse_ack_refuses_anything_else_in_one_line(payload, problem):
    with pytest.raises(MessageRejected, match=problem) as exc:
        protocol.parse_ack(payload)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("ack: ")
