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
                                              "ep/+/status"]
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
