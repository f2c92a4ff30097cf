"""The fleet message protocol, shared by the device (runtime) and the cloud listener
(toolchain.fleet): schema version, topic layout, names, the message envelope and the
validation of an incoming message. Standard library only: the device imports it (the
listener's optional parsers, orjson and msgspec, are used when installed).

Topics, under a prefix (default `edgepack`), per device:
  <prefix>/<device>/telemetry   windows                     spooled, QoS 1
  <prefix>/<device>/events      model loaded, self-test...  spooled, QoS 1
  <prefix>/<device>/results     command results             spooled, QoS 1
  <prefix>/<device>/capture     captured inputs (opt-in)    spooled, QoS 1
  <prefix>/<device>/status      online / offline            retained, last will, QoS 1
  <prefix>/<device>/commands    commands to the device      subscribed, QoS 1
  <prefix>/<device>/acks        from the listeners: stored  subscribed, sent at QoS 0
and, from the listeners, `<prefix>/_fleet/triggers` (rules firing and clearing).

An ack (`ack_payloads`, `parse_ack`) names the seqs a listener's store now holds for that
device, as sorted, disjoint inclusive ranges: the device's spool releases a record only when
one covers it (end-to-end delivery; runtime.telemetry).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edgepack"
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PREFIX = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")

# topic kind -> the message kind it carries
SPOOLED_KINDS = {"telemetry": "window", "events": "event", "results": "result",
                 "capture": "capture"}
MESSAGE_KINDS = {**SPOOLED_KINDS, "status": "status"}
COMMANDS = "commands"
ACKS = "acks"  # not in MESSAGE_KINDS: listeners publish it and never subscribe to it
# device ids start with a letter or digit, so this level never collides with a device's
TRIGGERS = "_fleet/triggers"

MAX_PAYLOAD_BYTES = 256 * 1024  # a window message is a few KiB
MAX_DEPTH = 32  # a window message nests 5 levels
MAX_INT = 2**63 - 1  # a BIGINT column
MAX_INT_DIGITS = 40  # longer integer literals are refused before int() converts them
MAX_TEXT = 1024  # a text field the store keeps in a column of its own
MAX_ACK_RANGES = 1000  # per ack message (about 40 KiB at most); more go in several messages
# possessive, and an unterminated string runs to the end: one pass over any text
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")

try:  # the listener's fast parser; the device does without it
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the installation
    _orjson = None

# What the store reads out of a message, by dotted path: "int" a whole number in
# 0..2^63-1, "number" a finite number, "text" a string a column can hold; null is allowed
# for each (the store writes NULL), an object on the way is checked above or by _check_fields.
ENVELOPE_FIELDS = {
    "kind": "text", "device_id": "text",
    "bundle.sha256": "text", "bundle.model": "text", "bundle.version": "text",
    "bundle.profile": "text", "bundle.backend": "text", "time.wall": "number",
}
BODY_FIELDS = {
    "telemetry": {
        "count": "int", "errors": "int", "error_rate": "number", "throughput_per_s": "number",
        "latency_ms.p50": "number", "latency_ms.p95": "number", "latency_ms.p99": "number",
        "budgets.p95_latency_ms": "number",
        "window.start_wall": "number", "window.end_wall": "number", "window.period_s": "number",
        "drift.score": "number", "drift.input_psi": "number", "drift.class_psi": "number",
        "drift.confidence_psi": "number", "drift.input_ks_min_p": "number",
        "drift.confidence_ks.p_value": "number", "spool.dropped_since_last": "int",
        "output.confidence_mean": "number",
        # ground truth the application reported in this window (Device.feedback)
        "feedback.count": "int", "feedback.correct": "int", "feedback.accuracy": "number",
        # a candidate bundle run beside the served one on a sample of live inputs
        "shadow.candidate.sha256": "text", "shadow.candidate.version": "text",
        "shadow.count": "int", "shadow.agreement": "number",
        "shadow.latency_ms.p50": "number", "shadow.latency_ms.p95": "number",
        "shadow.confidence_mean": "number", "shadow.errors": "int",
        "shadow.feedback.count": "int", "shadow.feedback.accuracy": "number",
        "shadow.feedback.served_accuracy": "number",
    },
    "status": {"state": "text", "reason": "text"},
}
_EXPECTED = {"int": "a whole number in 0..2^63-1", "number": "a finite number",
             "text": f"text of at most {MAX_TEXT} characters without NUL or lone surrogates"}


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


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Sequence numbers as sorted, merged inclusive ranges: [1, 2, 3, 7, 5, 6] -> [(1, 3),
    (5, 7)]."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


def ack_payloads(ranges: list[tuple[int, int]], listener_id: str) -> list[bytes]:
    """The ack messages for sorted, merged `ranges` (seq_ranges'), at most MAX_ACK_RANGES
    ranges in each: compact JSON, {"schema":1,"kind":"ack","listener":...,"ranges":[[lo,hi],
    ...]}, written directly (a listener sends one per device and batch)."""
    head = _ack_head(listener_id)
    return [head + b",".join([b"[%d,%d]" % r for r in ranges[i:i + MAX_ACK_RANGES]]) + b"]}"
            for i in range(0, len(ranges), MAX_ACK_RANGES)]


@functools.lru_cache(maxsize=64)
def _ack_head(listener_id: str) -> bytes:
    return (json.dumps({"schema": SCHEMA_VERSION, "kind": "ack", "listener": listener_id},
                       separators=(",", ":"))[:-1] + ',"ranges":[').encode()


def parse_ack(payload: bytes) -> list[tuple[int, int]]:
    """An ack from a listener -> its ranges, checked as hostile input: the size, depth and
    number caps, whole numbers with 0 <= lo <= hi <= MAX_INT, ranges increasing and disjoint
    (so applying them costs at most one pass over what the device holds). Raises
    MessageRejected with a one-line reason."""
    msg = parse_payload("ack", payload)
    if msg.get("schema") != SCHEMA_VERSION or msg.get("kind") != "ack":
        raise MessageRejected(f"ack: schema {_show(msg.get('schema'))} kind "
                              f"{_show(msg.get('kind'))}, expected schema {SCHEMA_VERSION} "
                              f"kind 'ack'")
    listener = msg.get("listener")
    if not isinstance(listener, str) or len(listener) > MAX_TEXT:
        raise MessageRejected(f"ack: listener {_show(listener)} is not text of at most "
                              f"{MAX_TEXT} characters")
    ranges = msg.get("ranges")
    if not isinstance(ranges, list):
        raise MessageRejected(f"ack: ranges {_show(ranges)} is not a list")
    if len(ranges) > MAX_ACK_RANGES:
        raise MessageRejected(f"ack: {len(ranges)} ranges, at most {MAX_ACK_RANGES}")
    out: list[tuple[int, int]] = []
    for pair in ranges:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(type(v) is int and 0 <= v <= MAX_INT for v in pair)
                and pair[0] <= pair[1]):
            raise MessageRejected(f"ack: range {_show(pair)} is not [lo, hi] with whole "
                                  f"numbers 0 <= lo <= hi <= 2^63-1")
        if out and pair[0] <= out[-1][1]:
            raise MessageRejected(f"ack: range {_show(pair)} overlaps or precedes the one "
                                  f"before it (ranges must be sorted and disjoint)")
        out.append((pair[0], pair[1]))
    return out


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
    the problem, for anything not ours or not well formed: the listener stores whatever
    passes, so every field the store reads is checked here for its type and range."""
    device, kind = _topic_parts(topic_name, prefix)
    msg, _fields = _validate_dict(topic_name, device, kind, payload)
    return kind, msg


def validate_fields(topic_name: str, payload: bytes,
                    prefix: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """validate(), also returning the checked values the store reads, by dotted path
    (`bundle.model`, `latency_ms.p95`: body fields without `body.`; absent or null ones
    left out), so the listener does not look them up a second time.

    A spooled message (window, event, result) the typed fast path takes (msgspec installed)
    comes with a message of its envelope only: schema, kind, device_id and seq, all that
    the store reads from it next to these values (the payload text is stored as received).
    Anything else gets the whole parsed message, as validate() does."""
    device, kind = _topic_parts(topic_name, prefix)
    typed = _typed_kinds().get(kind)
    if typed is not None:
        taken = _validate_typed(typed, device, kind, payload)
        if taken is not None:
            return (kind, *taken)
    return (kind, *_validate_dict(topic_name, device, kind, payload))


def _topic_parts(topic_name: str, prefix: str) -> tuple[str, str]:
    """(device, topic kind) of a topic under `prefix`, or MessageRejected."""
    parts = topic_name.rsplit("/", 2)  # the prefix, the device, the kind
    if len(parts) != 3 or parts[0] != prefix:
        raise MessageRejected(f"topic {_show(topic_name)} is not under {prefix}/<device>/<kind>")
    device, kind = parts[1], parts[2]
    if not DEVICE_ID.match(device):
        raise MessageRejected(f"{topic_name}: device id {_show(device)} is not valid (1-128 "
                              f"letters, digits, '.', '_' or '-', starting with one of the first "
                              f"two)")
    return device, kind


def _validate_dict(topic_name: str, device: str, kind: str,
                   payload: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole message as a dict and its checked values: orjson's parse when it takes the
    message, else the exact parse, which also words every refusal."""
    fast = _parse_fast(payload)
    if fast is not None:
        try:  # no NUL escape: every string is storable (orjson refuses lone surrogates)
            return _checked(topic_name, device, kind, fast, b"\\u0000" not in payload)
        except MessageRejected:
            pass  # the exact parse below words the refusal (exact integers, for one)
    return _checked(topic_name, device, kind, parse_payload(topic_name, payload), False)


def _checked(topic_name: str, device: str, kind: str, msg: dict[str, Any],
             clean: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`msg`, its checked values) if its envelope and the fields the store reads are what
    they must be."""
    if msg.get("schema") != SCHEMA_VERSION:
        raise MessageRejected(f"{topic_name}: schema {_show(msg.get('schema'))}, this listener "
                              f"reads {SCHEMA_VERSION}")
    if msg.get("device_id") != device:
        raise MessageRejected(f"{topic_name}: device_id {_show(msg.get('device_id'))} does not "
                              f"match the topic's {device!r}")
    seq = msg.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_INT:
        raise MessageRejected(f"{topic_name}: seq {_show(seq)} is not a sequence number (a "
                              f"whole number in 0..2^63-1)")
    expected = MESSAGE_KINDS.get(kind)
    if expected is None or msg.get("kind") != expected:
        raise MessageRejected(f"{topic_name}: kind {_show(msg.get('kind'))} does not belong on "
                              f"{kind}")
    for key in ("bundle", "time", "body"):
        # the store reads fields out of these; a list or a string there is not ours
        if msg.get(key) is not None and not isinstance(msg[key], dict):
            raise MessageRejected(f"{topic_name}: {key} is not a JSON object")
    fields: dict[str, Any] = {}
    _check_fields(topic_name, msg, _ENVELOPE_TREE, "", clean, fields)
    if kind in BODY_FIELDS:
        _check_fields(topic_name, msg.get("body") or {}, _BODY_TREES[kind], "body.", clean,
                      fields)
    return msg, fields


def parse_payload(topic_name: str, payload: bytes) -> dict[str, Any]:
    """The payload as a JSON object, within the size and nesting caps, without NaN or
    Infinity (a store column cannot hold them, and JSON has no such numbers)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageRejected(f"{topic_name}: payload is {len(payload)} bytes, the limit is "
                              f"{MAX_PAYLOAD_BYTES} ({MAX_PAYLOAD_BYTES // 1024} KiB)")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageRejected(f"{topic_name}: payload is not JSON (not UTF-8: {exc})") from exc
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise MessageRejected(f"{topic_name}: payload nests {depth} levels deep, the limit is "
                              f"{MAX_DEPTH}")
    try:
        msg = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                         parse_int=_bounded_int)
    except MessageRejected as exc:
        raise MessageRejected(f"{topic_name}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise MessageRejected(f"{topic_name}: payload is not JSON ({exc})") from exc
    if not isinstance(msg, dict):
        raise MessageRejected(f"{topic_name}: payload is not a JSON object")
    return msg


def _parse_fast(payload: bytes) -> dict[str, Any] | None:
    """The listener's common case in a few microseconds: orjson (strict JSON in C: no NaN or
    Infinity, no overflowing number, no lone surrogate, valid UTF-8) when it is installed.
    None sends the payload down the exact path (parse_payload), which also words the
    refusal: anything orjson refuses, and what _plain_payload rules out. orjson reads an
    integer past 64 bits (and of at most MAX_INT_DIGITS digits) as a float: harmless where
    the store does not look (the payload is stored as received), and a field the store reads
    refuses a float where it wants an integer, after which validate() re-parses exactly to
    say so."""
    if _orjson is None or _plain_payload(payload) is None:
        return None
    try:
        msg = _orjson.loads(payload)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


# payload bytes -> one class each, so that the fast paths' guards are a few passes in C: a
# digit reads '0', an exponent or a sign 'e' (so "1E+999" reads "0ee000"), whatever can end
# a number ',', the rest 'x'; the opening brackets are deleted (translate's second
# argument), and the length lost counts them
_CLASSES = bytes(ord("0") if c in b"0123456789" else ord("e") if c in b"eE+-"
                 else ord(",") if c in b",]} \t\n\r" else ord("x") for c in range(256))
_LONG_DIGITS = b"0" * (MAX_INT_DIGITS + 1)  # an integer _bounded_int refuses, or part of one


def _plain_payload(payload: bytes) -> bytes | None:
    """The payload's byte classes (_CLASSES) if a fast parser may take it: within the size
    cap, no more brackets than the depth cap (perhaps not nested that deep: the exact path
    measures), and no digit run longer than MAX_INT_DIGITS (an integer _bounded_int refuses,
    which a fast parser takes, even where the store does not look). Else None."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    classes = payload.translate(_CLASSES, b"[{")
    if len(payload) - len(classes) > MAX_DEPTH or _LONG_DIGITS in classes:
        return None
    return classes


# -- the listener's typed fast path (msgspec) ---------------------------------------------
# A spooled message decoded straight into msgspec Structs generated from ENVELOPE_FIELDS and
# BODY_FIELDS: parsing and the type and range checks run in C, unknown fields are skipped.
# It only ever takes a message: on any doubt it steps aside, and validate_fields parses the
# whole message (orjson, else the exact path that words every refusal). What msgspec would
# take and the exact path refuses is ruled out before decoding, by _typed_guard: msgspec
# skips unknown fields without converting their numbers (an integer of any length, 1e999)
# or checking their UTF-8, and nests as deep as it is sent.

class _TypedKind(NamedTuple):
    """One topic kind's typed decoding."""
    decode: Callable[[bytes], Any]  # payload -> the kind's Struct; ValueError if not that
    fields: Callable[[Any], dict[str, Any]]  # Struct -> the store's values by dotted path
    texts: tuple[str, ...]  # the text paths, checked for NUL when the payload has escapes


_TYPED: dict[str, _TypedKind] | None = None  # built on first use: the device never needs it

# an exponent of 3 digits or more that ends a number: the only way to infinity short of
# _LONG_DIGITS (up to 40 digits and an exponent of 99 stay below 1e140); also a negative
# integer of 3 digits or more, which the whole-dict path then takes (rare in telemetry)
_BIG_EXPONENT = re.compile(rb"e0000*,")


def _typed_kinds() -> dict[str, _TypedKind]:
    """The typed decoding of each spooled kind; none when msgspec is not installed.
    (Status messages, a few per connection, keep the whole-dict path: the store reads
    their body from the message.)"""
    global _TYPED
    if _TYPED is None:
        try:
            import msgspec
        except ImportError:  # pragma: no cover - depends on the installation
            _TYPED = {}
        else:
            _TYPED = {kind: _typed_kind(msgspec, kind) for kind in SPOOLED_KINDS}
    return _TYPED


def _typed_kind(msgspec: Any, kind: str) -> _TypedKind:
    """Structs for topic kind `kind`: the envelope with what _checked asks of it (schema,
    device_id, seq and kind required and exact; bundle, time and body objects or null) and
    the fields the store reads, each typed as _check_fields checks it; and the function
    that collects the fields' values out of the Struct."""
    from typing import Annotated, Literal

    meta = msgspec.Meta
    leaf = {  # null allowed, as _check_fields allows it
        "int": Annotated[int, meta(ge=0, le=MAX_INT)] | None,
        # an int within 64 bits stays an int, as _check_fields keeps it; a longer one
        # (which _check_fields turns into a float) is refused, and the exact path decides
        "number": Annotated[int, meta(ge=-MAX_INT - 1, le=MAX_INT)] | float | None,
        "text": Annotated[str, meta(max_length=MAX_TEXT)] | None,
    }
    envelope = {"schema": Literal[SCHEMA_VERSION], "seq": Annotated[int, meta(ge=0, le=MAX_INT)],
                "kind": Literal[MESSAGE_KINDS[kind]], "device_id": str}
    code = ["def fields(o0):", " out = {}"]  # straight-line: a loop costs twice as much

    def struct(name: str, tree: tuple[Any, ...], obj: str, top: bool = False) -> Any:
        """A Struct for one object of `tree`, and the code that copies its fields' values,
        when not null, from generated variable `obj` into `out`."""
        pad = " " * (obj.count("_") + 1)
        spec: list[tuple[str, Any, Any]] = []
        for i, (key, sub, path) in enumerate(tree):
            attr = key if top and key in envelope else f"f{i}"  # an envelope's: typed below
            if type(sub) is tuple:  # an object on the way: absent and null read None
                inner = f"{obj}_{i}"
                code.extend([f"{pad}{inner} = {obj}.{attr}", f"{pad}if {inner} is not None:",
                             f"{pad} pass"])  # pass: for an object with no field read
                typ = struct(f"{name}_{key}", sub, inner) | None
            else:
                code.append(f"{pad}if (x := {obj}.{attr}) is not None: out[{path!r}] = x")
                typ = leaf[sub]
            if attr not in envelope:
                spec.append((attr, typ, msgspec.field(default=None, name=key)))
        if top:
            spec += [(key, typ, msgspec.field(name=key)) for key, typ in envelope.items()]
        return msgspec.defstruct(name, spec, kw_only=True, frozen=True, gc=False)

    top = list(_ENVELOPE_TREE)
    top += [(key, (), key) for key in ("bundle", "time")
            if key not in {k for k, _, _ in top}]  # objects or null even if nothing is read
    top.append(("body", _BODY_TREES.get(kind, ()), "body"))
    message = struct(f"_{kind}_message", tuple(top), "o0", top=True)
    code.append(" return out")
    scope: dict[str, Any] = {}
    exec("\n".join(code), scope)  # noqa: S102 - our own field names, repr()'d
    texts = {path for path, k in {**ENVELOPE_FIELDS, **BODY_FIELDS.get(kind, {})}.items()
             if k == "text"}
    return _TypedKind(msgspec.json.Decoder(message).decode, scope["fields"], tuple(sorted(texts)))


def _typed_guard(payload: bytes) -> bool:
    """Whether the payload is free of what msgspec would take and the exact path refuses:
    over the size cap, invalid UTF-8, more brackets than the depth cap (perhaps not nested
    that deep: the exact path measures), an integer literal over MAX_INT_DIGITS digits, a
    number that could overflow to infinity."""
    classes = _plain_payload(payload)
    if classes is None or _BIG_EXPONENT.search(classes) is not None:
        return False
    if not payload.isascii():
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _validate_typed(typed: _TypedKind, device: str, kind: str,
                    payload: bytes) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the envelope, the checked values) if the typed decoding takes the message, else
    None: then the whole-dict path decides."""
    if not _typed_guard(payload):
        return None
    try:
        decoded = typed.decode(payload)
    except ValueError:  # msgspec.DecodeError and ValidationError; bad UTF-8 in a field
        return None
    if decoded.device_id != device:
        return None
    fields = typed.fields(decoded)
    # msgspec refuses lone surrogates, but a \u0000 escape decodes to a NUL
    if b"\\" in payload and not all(storable_text(fields.get(p, "")) for p in typed.texts):
        return None
    msg = {"schema": SCHEMA_VERSION, "kind": MESSAGE_KINDS[kind], "device_id": device,
           "seq": decoded.seq}
    return msg, fields


def json_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (strings skipped), without
    parsing it: the parser recurses once per level."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = deepest = 0
    for c in brackets:
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _tree(fields: dict[str, str], where: str = "") -> tuple[Any, ...]:
    """Dotted paths -> a tree of (key, kind or subtree, full path) walked once per message:
    each key is read once, however many fields share its parent."""
    groups: dict[str, dict[str, str]] = {}
    leaves: dict[str, str] = {}
    for path, kind in fields.items():
        head, _, rest = path.partition(".")
        if rest:
            groups.setdefault(head, {})[rest] = kind
        else:
            leaves[head] = kind
    out: list[tuple[str, Any, str]] = [(k, kind, where + k) for k, kind in leaves.items()]
    out += [(k, _tree(sub, f"{where}{k}."), where + k) for k, sub in groups.items()]
    return tuple(out)


_ENVELOPE_TREE = _tree(ENVELOPE_FIELDS)
_BODY_TREES = {kind: _tree(fields) for kind, fields in BODY_FIELDS.items()}


def _check_fields(topic_name: str, obj: dict[str, Any], tree: tuple[Any, ...], where: str,
                  clean: bool, out: dict[str, Any]) -> None:
    """Each field in `tree` is null or of its kind; the values found go into `out` by
    dotted path. `clean`: no string can hold a NUL or a lone surrogate (checked on the
    whole payload), so texts are only measured. Runs for every message the listener takes:
    type() checks, each key read once, no helper calls on the common path."""
    for key, kind, path in tree:
        value = obj.get(key)
        if value is None:
            continue
        t = type(value)
        if type(kind) is tuple:
            if t is not dict:
                raise MessageRejected(f"{topic_name}: {where}{path} {_show(value)} is not a "
                                      f"JSON object")
            _check_fields(topic_name, value, kind, where, clean, out)
            continue
        if kind == "number":
            ok = (t is float and math.isfinite(value)) or t is int
            if t is int and not -MAX_INT - 1 <= value <= MAX_INT:
                value = float(value)  # a double column binds it (orjson reads it so too)
        elif kind == "int":
            ok = t is int and 0 <= value <= MAX_INT
        else:
            ok = t is str and len(value) <= MAX_TEXT and (clean or storable_text(value))
        if not ok:
            raise MessageRejected(f"{topic_name}: {where}{path} {_show(value)} is not "
                                  f"{_EXPECTED[kind]}")
        out[path] = value


def storable_text(value: str) -> bool:
    """Whether SQLite and PostgreSQL both take the string: no NUL, valid UTF-8."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a \ud800 escape
        return False
    return True


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short (it comes from the sender)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_constant(token: str) -> Any:
    raise MessageRejected(f"payload has {token}, which is not a JSON number")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise MessageRejected(f"payload has the number {token[:40]}, beyond a double's range")
    return value


def _bounded_int(token: str) -> int:
    if len(token.lstrip("-")) > MAX_INT_DIGITS:
        raise MessageRejected(f"payload has an integer of {len(token.lstrip('-'))} digits "
                              f"(at most {MAX_INT_DIGITS})")
    return int(token)
