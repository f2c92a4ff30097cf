"""The fleet message protocol, shared by the device (runtime) and the cloud listener
(toolchain.fleet): schema version, topic layout, names, the message envelope and the
validation of an incoming message. Standard library only: the device imports it.

Topics, under a prefix (default `edgepack`), per device:
  <prefix>/<device>/telemetry   windows                     spooled, QoS 1
  <prefix>/<device>/events      model loaded, self-test...  spooled, QoS 1
  <prefix>/<device>/results     command results             spooled, QoS 1
  <prefix>/<device>/status      online / offline            retained, last will, QoS 1
  <prefix>/<device>/commands    commands to the device      subscribed, QoS 1
and, from the listeners, `<prefix>/_fleet/triggers` (rules firing and clearing).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edgepack"
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PREFIX = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")

# topic kind -> the message kind it carries
SPOOLED_KINDS = {"telemetry": "window", "events": "event", "results": "result"}
MESSAGE_KINDS = {**SPOOLED_KINDS, "status": "status"}
COMMANDS = "commands"
# device ids start with a letter or digit, so this level never collides with a device's
TRIGGERS = "_fleet/triggers"


class MessageRejected(ValueError):
    """An incoming message that is not ours or not well formed; the text says why."""


def topic(prefix: str, device_id: str, kind: str) -> str:
    return f"{prefix}/{device_id}/{kind}"


def trigger_topic(prefix: str) -> str:
    return f"{prefix}/{TRIGGERS}"


def listener_topics(prefix: str, group: str | None = None) -> list[str]:
    """The filters a listener subscribes to: every device's messages, through the MQTT 5
    shared subscription `$share/<group>/...` when a group splits the fleet."""
    base = f"{prefix}/+"
    if group:
        base = f"$share/{group}/{base}"
    return [f"{base}/{kind}" for kind in MESSAGE_KINDS]


def check_prefix(prefix: str) -> None:
    if not PREFIX.match(prefix):
        raise ValueError(f"topic prefix {prefix!r} is not valid: use letters, digits, '.', "
                         f"'_', '-' in '/'-separated levels (no wildcards)")


def check_names(device_id: str, prefix: str) -> None:
    if not DEVICE_ID.match(device_id):
        raise ValueError(f"device id {device_id!r} is not valid: use 1-128 letters, digits, "
                         f"'.', '_' or '-', starting with a letter or digit")
    check_prefix(prefix)


def envelope(kind: str, device_id: str, bundle: dict[str, Any], body: dict[str, Any], *,
             boot: str, seq: int | None = None) -> dict[str, Any]:
    """The fields every device message carries around its body. `seq` is left out for a
    spooled message: the spool numbers it when it is appended."""
    msg: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "kind": kind, "device_id": device_id, "bundle": bundle,
        # monotonic times compare only within one boot, hence the boot id next to them
        "time": {"wall": time.time(), "mono": time.monotonic(), "boot": boot},
        "body": body}
    if seq is not None:
        msg["seq"] = seq
    return msg


def trigger_message(state: str, trigger_id: str, rule: str, scope: str, devices: list[str],
                    detail: dict[str, Any], listener_id: str) -> dict[str, Any]:
    """What a listener publishes on the triggers topic when a rule fires or clears."""
    return {"schema": SCHEMA_VERSION, "kind": "trigger", "state": state,
            "trigger_id": trigger_id, "rule": rule, "scope": scope, "devices": devices,
            "detail": detail, "time": time.time(), "listener": listener_id}


def validate(topic_name: str, payload: bytes, prefix: str) -> tuple[str, dict[str, Any]]:
    """An incoming device message -> (topic kind, message). Raises MessageRejected, naming
    the problem, for anything not ours or not well formed."""
    parts = topic_name.split("/")
    base = prefix.split("/")
    if len(parts) != len(base) + 2 or parts[:len(base)] != base:
        raise MessageRejected(f"topic {topic_name!r} is not under {prefix}/<device>/<kind>")
    device, kind = parts[-2], parts[-1]
    try:
        msg = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageRejected(f"{topic_name}: payload is not JSON ({exc})") from exc
    if not isinstance(msg, dict):
        raise MessageRejected(f"{topic_name}: payload is not a JSON object")
    if msg.get("schema") != SCHEMA_VERSION:
        raise MessageRejected(f"{topic_name}: schema {msg.get('schema')!r}, this listener "
                              f"reads {SCHEMA_VERSION}")
    if msg.get("device_id") != device:
        raise MessageRejected(f"{topic_name}: device_id {msg.get('device_id')!r} does not "
                              f"match the topic's {device!r}")
    seq = msg.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise MessageRejected(f"{topic_name}: seq {seq!r} is not a sequence number (a "
                              f"whole number >= 0)")
    expected = MESSAGE_KINDS.get(kind)
    if expected is None or msg.get("kind") != expected:
        raise MessageRejected(f"{topic_name}: kind {msg.get('kind')!r} does not belong on "
                              f"{kind}")
    for key in ("bundle", "time", "body"):
        # the store reads fields out of these; a list or a string there is not ours
        if msg.get(key) is not None and not isinstance(msg[key], dict):
            raise MessageRejected(f"{topic_name}: {key} is not a JSON object")
    return kind, msg
