"""The listener's group commit: a batch is one transaction, the rules over a batch decide what
the same windows decide one at a time, the fast validation path agrees with the exact one,
and the listener's own MQTT client reads a real Mosquitto (sessions, redelivery, refusals)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import protocol
from runtime.mqtt import BrokerConfig
from tests.mqtt_broker import Broker
from tests.test_fleet_store import store, window  # noqa: F401 - SQLite and PostgreSQL
from toolchain.fleet.listener import Listener, ListenerOptions
from toolchain.fleet.rules import DEFAULT_RULES, Rule
from toolchain.fleet.store import Incoming, RuleCache, open_store
from toolchain.fleet.subscriber import Message, ProtocolError, Subscriber, _read_varint

PREFIX = "edgepack"
NOWHERE = BrokerConfig.from_url("mqtt://127.0.0.1:1")


def wire(msg: dict) -> Message:
    return Message(protocol.topic(PREFIX, msg["device_id"], "telemetry"),
                   json.dumps(msg).encode(), 0)


def listener(db, rules=DEFAULT_RULES) -> Listener:
    return Listener(ListenerOptions(NOWHERE, listener_id="t"), db, rules)


def test_a_batch_stores_new_messages_once_and_counts_the_duplicates_in_it(store):  # noqa: F811
    """On SQLite and PostgreSQL: repeats inside a batch, and a batch that is partly stored
    already (the one-statement insert then falls back to one by one)."""
    db = store
    lis = listener(db)
    batch = [wire(window("d1", 1, 0.0)), wire(window("d1", 2, 0.0)),
             wire(window("d1", 1, 0.0)), wire(window("d2", 1, 0.0))]
    lis.process(batch)
    assert lis.stats["stored"] == 3 and lis.stats["duplicates"] == 1
    lis.process([wire(window("d1", 3, 0.0)), wire(window("d2", 1, 0.0))])
    assert lis.stats["stored"] == 4 and lis.stats["duplicates"] == 2
    lis.process([wire(window("d1", 4, 0.0)), wire(window("d2", 2, 0.0))])
    assert lis.stats["stored"] == 6 and db.counts() == {"messages": 6, "windows": 6}
    assert db.message_seqs("d1") == [1, 2, 3, 4] and db.message_seqs("d2") == [1, 2]
    # stored as received: the payload column holds the very text the device sent
    row = db._rows("SELECT payload FROM messages WHERE device_id = 'd2'")[0]
    assert row["payload"] == batch[3].payload.decode()


def test_a_batch_the_store_fails_half_way_leaves_nothing_stored(store):  # noqa: F811
    """A batch is one transaction: the database refusing its windows rows (a trigger stands
    in for a full disk) keeps none of its messages rows either, so the redelivered batch
    stores everything instead of taking the messages for duplicates and losing the windows."""
    from toolchain.fleet.store import StoreError

    db = store
    with db._transaction() as cur:
        if db.placeholder == "?":
            cur.execute("CREATE TRIGGER full_disk BEFORE INSERT ON windows"
                        " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        else:
            cur.execute("CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS"
                        " $$ BEGIN RAISE EXCEPTION 'could not extend file'; END $$")
            cur.execute("CREATE TRIGGER full_disk BEFORE INSERT ON windows"
                        " FOR EACH ROW EXECUTE FUNCTION full_disk()")
    lis = listener(db)
    batch = [wire(window("d1", 1, 0.0)), wire(window("d1", 2, 0.0)), wire(window("d2", 1, 0.0))]
    with pytest.raises(StoreError):
        lis.process(batch)
    assert db.counts() == {"messages": 0, "windows": 0} and db.devices() == []
    with db._transaction() as cur:
        cur.execute("DROP TRIGGER full_disk" + ("" if db.placeholder == "?" else " ON windows"))
    lis.process(batch)  # the broker's redelivery
    assert lis.stats["stored"] == 3 and db.counts() == {"messages": 3, "windows": 3}
    assert {d["device_id"]: d["windows"] for d in db.devices()} == {"d1": 2, "d2": 1}


def test_a_batch_whose_commit_fails_on_the_committer_thread_is_not_acknowledged(tmp_path):
    """The listener commits a batch on its committer thread while it validates the next: a
    commit that fails (a deferred constraint checked only at COMMIT stands in for the disk)
    leaves nothing stored, nothing acknowledged and no streak remembered; the next batch
    (the broker's redelivery) is stored whole."""
    db = open_store(f"sqlite:///{tmp_path}/f.db")
    with db._transaction() as cur:
        cur.execute("CREATE TABLE parent (id TEXT PRIMARY KEY)")
        cur.execute("CREATE TABLE guard (device_id TEXT REFERENCES parent (id)"
                    " DEFERRABLE INITIALLY DEFERRED)")
        cur.execute("CREATE TRIGGER guarded AFTER INSERT ON windows WHEN NEW.device_id = 'bad'"
                    " BEGIN INSERT INTO guard VALUES (NEW.device_id); END")
    db.conn.execute("PRAGMA foreign_keys = ON")
    lis = listener(db)
    batch = [Message(m.topic, m.payload, pid) for pid, m in enumerate(
        (wire(window("d1", 1, 0.0)), wire(window("bad", 1, 0.0))), start=1)]
    lis._commit(batch)
    assert lis._pending is not None  # handed to the committer
    assert lis.settle() is False and lis.stats["store_errors"] == 1
    assert db.counts() == {"messages": 0, "windows": 0} and lis.stats["stored"] == 0
    assert lis.cache._through == {}  # forgotten: it saw windows that are not stored
    with db._transaction() as cur:
        cur.execute("DROP TRIGGER guarded")
    lis._commit(batch)
    assert lis.settle() is True
    assert db.counts() == {"messages": 2, "windows": 2} and lis.stats["stored"] == 2


def test_a_poison_message_in_a_batch_goes_to_the_dead_letters_and_the_rest_is_stored(tmp_path):
    db = open_store(f"sqlite:///{tmp_path}/f.db")
    lis = listener(db)
    bad = window("d1", 2, 0.0)
    bad["body"]["count"] = "many"
    acks = lis.process([wire(window("d1", 1, 0.0)), wire(bad), wire(window("d1", 3, 0.0))])
    assert acks == []  # QoS 0 in this test: nothing to acknowledge to the broker
    assert db.message_seqs("d1") == [1, 3] and lis.stats["rejected"] == 1
    assert "body.count 'many' is not a whole number" in db.dead_letters(1)[0]["reason"]


def test_the_device_is_acked_for_stored_duplicate_and_dead_lettered_records(tmp_path):
    from toolchain.fleet.acks import AckBatch

    db = open_store(f"sqlite:///{tmp_path}/f.db")
    lis = listener(db)
    lis.process([wire(window("d1", 1, 0.0))])
    bad = window("d1", 3, 0.0)
    bad["body"]["errors"] = -1
    acks = AckBatch()
    lis.process([wire(window("d1", 1, 0.0)), wire(window("d1", 2, 0.0)), wire(bad)], acks)
    (topic, payload), = acks.messages(PREFIX, "t")
    assert topic == protocol.topic(PREFIX, "d1", protocol.ACKS)
    assert protocol.parse_ack(payload) == [(1, 3)]


def rules_over(store_url: str, windows: list[dict], splits: list[int],
               rules: tuple[Rule, ...], remember: bool = True
               ) -> tuple[list[tuple[str, str, str]], list]:
    """Feed `windows` in batches cut at `splits`; returns the transitions and rule_state.
    `remember=False`: a fresh cache for every batch, so every streak is read from the store
    (what the listener did before it kept streaks in memory)."""
    db = open_store(store_url)
    cache = RuleCache(rules)
    seen, start = [], 0
    for cut in [*splits, len(windows)]:
        if cut <= start:
            continue
        if not remember:
            cache = RuleCache(rules)
        result = db.ingest_batch([Incoming(w) for w in windows[start:cut]], 1.0, cache)
        seen += [(t.kind, t.rule.name, t.scope) for t in result.transitions]
        start = cut
    state = db._rows("SELECT rule, scope, device_id, breaching FROM rule_state"
                        " WHERE breaching = 1 ORDER BY rule, scope, device_id")
    db.close()
    return seen, [tuple(r.values()) for r in state]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(scores=st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0.0, 0.5, None]),
                                 st.sampled_from([None, (3, 0), (10, 2), (10, 9)])),
                       min_size=1, max_size=40),
       splits=st.lists(st.integers(0, 40), max_size=6))
def test_batches_decide_what_one_window_at_a_time_decides(tmp_path_factory, scores, splits):
    """The in-memory streaks over any batching give the triggers and breaching devices that
    storing the same windows one by one gives (drift above 0.25 for 2 windows on 2 devices;
    None: a window too small for drift; feedback (labels, correct): accuracy below 0.5 for 2
    windows, where a window of fewer than 5 labels has no accuracy for the rule)."""
    rules = (Rule("drift", "drift_score", above=0.25, consecutive=2, min_devices=2),
             Rule("p95", "p95_ms", above=3.0, consecutive=1, min_devices=1),
             Rule("acc", "accuracy", below=0.5, consecutive=2, min_devices=1))
    seqs = {0: 0, 1: 0, 2: 0}
    windows = []
    for dev, score, feedback in scores:
        seqs[dev] += 1
        w = window(f"d{dev}", seqs[dev], 0.0, p95=5.0 if score == 0.5 else 1.0)
        w["body"]["drift"]["score"] = score
        if feedback is not None:
            count, correct = feedback
            w["body"]["feedback"] = {"count": count, "correct": correct,
                                     "accuracy": correct / count}
        windows.append(w)
    folder = tmp_path_factory.mktemp("rules")
    one_by_one = rules_over(f"sqlite:///{folder}/a.db", windows, list(range(len(windows))),
                            rules, remember=False)
    batched = rules_over(f"sqlite:///{folder}/b.db", windows, sorted(splits), rules)
    assert batched == one_by_one


def test_a_device_whose_history_another_listener_stored_is_read_from_the_store(tmp_path):
    """Two listeners share the db (a shared subscription): each sees every other window
    of a device, and the streak still counts all of them."""
    url = f"sqlite:///{tmp_path}/f.db"
    one, two = open_store(url), open_store(url)
    rule = (Rule("drift", "drift_score", above=0.25, consecutive=3, min_devices=1),)
    caches = [RuleCache(rule), RuleCache(rule)]
    fired = []
    for seq in range(1, 5):
        db, cache = (one, caches[0]) if seq % 2 else (two, caches[1])
        result = db.ingest_batch([Incoming(window("d1", seq, 0.9))], 1.0, cache)
        fired += [(seq, t.kind) for t in result.transitions]
    assert fired == [(3, "fired")]
    assert caches[0].loads + caches[1].loads >= 3  # each saw a hole: asked the db


def test_a_bug_one_message_finds_costs_only_that_message(tmp_path, monkeypatch):
    db = open_store(f"sqlite:///{tmp_path}/f.db")
    lis = listener(db)
    real = db.ingest_prepared

    def fragile(prepared, received_at, cache, **kw):
        if any(message[1] == 2 for message, _device, _row in prepared[0]):
            raise RuntimeError("a bug the message with seq 2 finds")
        return real(prepared, received_at, cache, **kw)

    monkeypatch.setattr(db, "ingest_prepared", fragile)
    lis.process([wire(window("d1", s, 0.0)) for s in (1, 2, 3)])
    assert db.message_seqs("d1") == [1, 3]
    assert "a bug the message with seq 2 finds" in db.dead_letters(1)[0]["reason"]


VALID = window("spk-1", 7, 0.1)
HOLE = "\x01hole"  # a placeholder value: json.dumps writes it "\u0001hole", then spliced over
READ = ([tuple(p.split(".")) for p in protocol.ENVELOPE_FIELDS]
        + [("body", *p.split(".")) for p in protocol.BODY_FIELDS["telemetry"]])
# every object on the way to a field read, and fields the store does not read
OBJECTS = sorted({p[:i] for p in READ for i in range(1, len(p))})
SKIPPED = [("extra",), ("time", "mono"), ("bundle", "precision"), ("body", "extra"),
           ("body", "latency_ms", "mean"), ("body", "drift", "available"),
           ("body", "drift", "confidence_ks", "statistic")]
PATHS = [("seq",), ("schema",), *READ, *OBJECTS, *SKIPPED]


def _at(msg: dict, path: tuple[str, ...]) -> dict:
    """The object that holds `path`'s last key, made on the way where missing."""
    for key in path[:-1]:
        if not isinstance(msg.get(key), dict):
            msg[key] = {}
        msg = msg[key]
    return msg


def _splice(msg: dict, literal: bytes) -> bytes:
    return json.dumps(msg).encode().replace(json.dumps(HOLE).encode(), literal)


def mutations() -> st.SearchStrategy[tuple[str, bytes]]:
    """(topic kind, payload): payloads near a valid window (or event, or result: the same
    message under another kind) with a field, read by the store or not, replaced by a
    hostile value or a raw JSON literal (numbers past the caps, escapes, bad UTF-8, deep
    nesting), or a key given twice, the second time first or last, perhaps spelled with an
    escape."""
    values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                       st.sampled_from([2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, -1, 0]),
                       st.floats(allow_nan=False), st.text(max_size=5),
                       st.sampled_from(["\x00", "a\ud800", "\udc00", "é" * protocol.MAX_TEXT,
                                        "x" * (protocol.MAX_TEXT + 1), "window", "spk-1"]),
                       st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
    literals = st.one_of(
        st.sampled_from([b"1e999", b"-1E+400", b"1e308", b"1e-400", b"0.5e309", b"123e300",
                         b"1e99", b"-0", b"-0.0", b"1E2", b"1.0", b"true", b"null", b"{}",
                         b"1" + b"0" * 300 + b".0", b"0." + b"0" * 60 + b"1",
                         b'"\\u0000"', b'"\\ud800"', b'"\\udc00x"', b'"\\ud83d\\ude00"',
                         b'"\\u00e9\\/\\"\\\\"', b'"\xc3\xa9"',
                         b'"e123"', b"NaN"]),
        st.integers(20, 40).map(lambda n: b'{"a":' * n + b"[]" + b"}" * n),  # MAX_DEPTH
        st.sampled_from([b'"\xff"', b'"a\xe9"', b'"\xed\xa0\x80"', b'"\xc0\x80"']),  # not UTF-8
        st.integers(1, 60).map(lambda n: b"-" * (n % 2) + b"9" * n),  # around MAX_INT_DIGITS
        st.builds(lambda m, e: f"{m}e{e}".encode(), st.sampled_from(["1", "9.99", "0.5", "123"]),
                  st.integers(-400, 400)),
        st.from_regex(rb"\A-?(0|[1-9][0-9]{0,44})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?\Z"))
    paths = st.sampled_from(PATHS)

    def replace(path, value):
        msg = json.loads(json.dumps(VALID))
        _at(msg, path)[path[-1]] = value
        return json.dumps(msg).encode()

    def splice(path, literal):
        msg = json.loads(json.dumps(VALID))
        _at(msg, path)[path[-1]] = HOLE
        return _splice(msg, literal)

    def twice(path, literal, first, escaped):
        msg = json.loads(json.dumps(VALID))
        obj, key = _at(msg, path), path[-1]
        spelled = f"\\u{ord(key[0]):04x}{key[1:]}" if escaped else key
        dup = "\x01dup"
        if first:
            reordered = {dup: HOLE, **obj}
            obj.clear()
            obj.update(reordered)
        else:
            obj[dup] = HOLE
        return _splice(msg, literal).replace(json.dumps(dup).encode(),
                                             f'"{spelled}"'.encode())

    raw = st.sampled_from([b'{"seq": 1e999}', b'{"a": NaN}', b"[1]", b'{"a": "\\ud800"}',
                           b'{"seq": 123456789012345678901234567890}', b"\xff\xfe",
                           json.dumps(VALID).replace('"count": 100', '"count": 1' + "0" * 50)
                           .encode(),
                           # where the store does not look: orjson takes it, as a float
                           json.dumps(VALID).replace('"boot": "b"', '"boot": 1' + "0" * 40)
                           .encode()])
    as_literal = values.map(lambda v: json.dumps(v).encode())
    payloads = st.one_of(st.builds(replace, paths, values), st.builds(splice, paths, literals),
                         st.builds(twice, paths, st.one_of(literals, as_literal), st.booleans(),
                                   st.booleans()),
                         raw)
    kinds = st.sampled_from(["telemetry"] * 4 + ["events", "results"])

    def under(topic_kind: str, payload: bytes) -> tuple[str, bytes]:
        kind = protocol.MESSAGE_KINDS[topic_kind]
        return topic_kind, payload.replace(b'"kind": "window"', f'"kind": "{kind}"'.encode())

    return st.builds(under, kinds, payloads)


def _outcome(topic: str, payload: bytes) -> tuple:
    """What validate_fields makes of a payload: the refusal's words, or the checked values
    (type and repr: 1 is not 1.0, nor 0.0 -0.0) and what the store reads of the message."""
    try:
        kind, msg, fields = protocol.validate_fields(topic, payload, PREFIX)
    except protocol.MessageRejected as exc:
        return ("refused", str(exc))
    return ("taken", kind, {k: (type(v).__name__, repr(v)) for k, v in fields.items()},
            {k: msg[k] for k in ("schema", "kind", "device_id", "seq")},
            msg.get("body") if kind == "status" else None)


def _every_path(topic: str, payload: bytes) -> list[tuple]:
    """_outcome through the typed path (msgspec), orjson's and the exact one."""
    pytest.importorskip("orjson")
    pytest.importorskip("msgspec")
    outcomes = [_outcome(topic, payload)]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(protocol, "_TYPED", {})  # as without msgspec
        outcomes.append(_outcome(topic, payload))
        m.setattr(protocol, "_orjson", None)
        outcomes.append(_outcome(topic, payload))
    return outcomes


@settings(max_examples=300, deadline=None)
@given(case=mutations())
def test_the_fast_validation_path_agrees_with_the_exact_one(case):
    """With msgspec, with orjson only and with neither, a payload is accepted or refused
    alike, with the same words; accepted ones carry the same checked values, of the same
    types. (orjson reads an integer past 64 bits in a field the db does not read as a float;
    msgspec skips it: all accept it, up to MAX_INT_DIGITS digits.)"""
    topic_kind, payload = case
    typed, whole, exact = _every_path(protocol.topic(PREFIX, "spk-1", topic_kind), payload)
    assert typed == exact and whole == exact


def test_the_typed_path_takes_a_device_window_and_says_what_the_store_reads():
    pytest.importorskip("msgspec")
    payload = json.dumps(VALID).encode()
    typed = protocol._typed_kinds()["telemetry"]
    msg, fields = protocol._validate_typed(typed, "spk-1", "telemetry", payload)
    assert msg == {"schema": 1, "kind": "window", "device_id": "spk-1", "seq": 7}
    assert fields == protocol.validate_fields("edgepack/spk-1/telemetry", payload, PREFIX)[2]
    assert fields["latency_ms.p95"] == 1.0 and fields["count"] == 100


WRONG = {"int": [True, 1.5, -1, 2**63, "7", [7]], "number": [True, "7", [1.0], {}],
         "text": [5, True, "x" * (protocol.MAX_TEXT + 1), "a\x00b", "\ud800", {}]}
RIGHT = {"int": [0, 2**63 - 1], "number": [7, -2.5, 2**63, 1e300, None],
         "text": ["", "é" * protocol.MAX_TEXT, None]}
FIELDS = ([("telemetry", path, kind) for path, kind in protocol.ENVELOPE_FIELDS.items()]
          + [(topic_kind, f"body.{path}", kind)
             for topic_kind, fields in protocol.BODY_FIELDS.items()
             for path, kind in fields.items()])


def _message(topic_kind: str, path: str, value) -> bytes:
    """A valid message for the topic kind with the field at dotted `path` set to `value`."""
    kind = protocol.MESSAGE_KINDS[topic_kind]
    msg = json.loads(json.dumps(VALID)) if kind == "window" else protocol.envelope(
        kind, "spk-1", VALID["bundle"], {"state": "online"}, boot="b", seq=3)
    keys = tuple(path.split("."))
    _at(msg, keys)[keys[-1]] = value
    return json.dumps(msg).encode()


@pytest.mark.parametrize("topic_kind,path,kind", FIELDS, ids=[f[1] for f in FIELDS])
def test_every_field_the_store_reads_is_checked_alike_on_every_path(topic_kind, path, kind):
    """Each field in ENVELOPE_FIELDS and BODY_FIELDS (a new one the day it lands): a value of
    the wrong type is refused with the same words, naming the field, on the typed, orjson and
    exact paths; a right one is taken with the same value."""
    topic = protocol.topic(PREFIX, "spk-1", topic_kind)
    for value in WRONG[kind]:
        typed, whole, exact = _every_path(topic, _message(topic_kind, path, value))
        assert exact[0] == "refused" and f": {path} " in exact[1], (value, exact)
        assert typed == exact and whole == exact, value
    if path in ("kind", "device_id"):
        return  # these have one right value, the topic's
    for value in RIGHT[kind]:
        typed, whole, exact = _every_path(topic, _message(topic_kind, path, value))
        assert exact[0] == "taken" and typed == exact and whole == exact, value


ENVELOPE = [("seq", v) for v in (True, 1.5, -1, 2**63, 2**63 - 1, 0, "7", None, [1])] + [
    ("schema", v) for v in (1, 1.0, True, 2, "1", None)] + [
    (key, v) for key in ("bundle", "time", "body") for v in (None, [], "x", 1, {})] + [
    ("body.drift", None), ("body.drift.confidence_ks", None), ("body.latency_ms", [1.0])]


@pytest.mark.parametrize("topic_kind", ["telemetry", "events"])
@pytest.mark.parametrize("path,value", ENVELOPE, ids=[f"{p}={v!r}" for p, v in ENVELOPE])
def test_the_envelope_is_checked_alike_on_every_path(topic_kind, path, value):
    """What _checked asks of the envelope (schema 1.0 and true equal 1 there, and pass),
    and objects or null on the way to the fields, on the typed, orjson and exact paths."""
    topic = protocol.topic(PREFIX, "spk-1", topic_kind)
    typed, whole, exact = _every_path(topic, _message(topic_kind, path, value))
    assert typed == exact and whole == exact


# -- the listener's MQTT client against a real broker --------------------------------------
@pytest.fixture
def mosquitto(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def publish_raw(port: int, topic: str, payloads: list[bytes]) -> None:
    """A plain paho publisher at QoS 1, as a device sends."""
    from runtime.mqtt import Connection

    pub = Connection(BrokerConfig.from_url(f"mqtt://127.0.0.1:{port}"), "test-pub").start()
    assert pub.wait_connected(10)
    infos = [pub.publish(topic, p) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)
    pub.stop()


def drain(sub: Subscriber, want: int, timeout: float = 15) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += sub.poll(0.2)
    return got


def test_unacknowledged_messages_come_back_to_the_resumed_session(mosquitto):
    cfg = BrokerConfig.from_url(mosquitto.url)
    sub = Subscriber(cfg, "sub-1", ["t/+/x"])
    assert sub.connect()
    publish_raw(mosquitto.port, "t/a/x", [b"one", b"two", b"three"])
    got = drain(sub, 3)
    assert [m.payload for m in got] == [b"one", b"two", b"three"]
    sub.ack([got[0].packet_id])
    assert sub.flush()
    sub.close()  # as a crash would: two messages never acknowledged
    again = Subscriber(cfg, "sub-1", ["t/+/x"])
    assert again.connect()
    assert sorted(m.payload for m in drain(again, 2)) == [b"three", b"two"]
    again.disconnect()


def test_outgoing_publishes_reach_a_subscriber(mosquitto):
    cfg = BrokerConfig.from_url(mosquitto.url)
    sub = Subscriber(cfg, "sub-2", ["acks/#"])
    assert sub.connect()
    pub = Subscriber(cfg, "pub-2", ["nothing/here"])
    assert pub.connect()
    for i in range(3):
        pub.publish("acks/d1", f"ack {i}".encode())
    assert pub.flush()
    assert [m.payload for m in drain(sub, 3)] == [b"ack 0", b"ack 1", b"ack 2"]
    deadline = time.monotonic() + 10
    while pub._outgoing and time.monotonic() < deadline:  # the broker's PUBACKs arrive
        pub.poll(0.1)
    assert not pub._outgoing
    pub.disconnect()
    sub.disconnect()


def test_a_refused_login_and_a_babbling_server_are_one_line_errors(tmp_path):
    b = Broker(tmp_path / "auth", users={"u": "right"}).start()
    try:
        sub = Subscriber(BrokerConfig.from_url(f"mqtt://u:wrong@127.0.0.1:{b.port}"), "s", ["x"])
        assert not sub.connect(timeout=5)
        assert "refused the connection" in sub.last_error
    finally:
        b.stop()
    with socket.socket() as server:  # not a broker: answers CONNECT with garbage
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def babble():
            conn, _ = server.accept()
            conn.recv(1024)
            conn.sendall(b"\x20\xff\xff\xff\xff\x7f")  # a CONNACK with a 5-byte length
            time.sleep(0.5)
            conn.close()

        threading.Thread(target=babble, daemon=True).start()
        sub = Subscriber(BrokerConfig.from_url(f"mqtt://127.0.0.1:{server.getsockname()[1]}"),
                         "s", ["x"])
        assert not sub.connect(timeout=5)
        assert "longer than 4 bytes" in sub.last_error
    with pytest.raises(ProtocolError, match="longer than 4 bytes"):
        _read_varint(b"\x80\x80\x80\x80\x01", 0, 5)


def test_the_listener_serves_prometheus_metrics(mosquitto, tmp_path):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from toolchain.fleet import metrics

    db = open_store(f"sqlite:///{tmp_path}/f.db")
    lis = Listener(ListenerOptions(BrokerConfig.from_url(mosquitto.url), listener_id="m1"),
                   db, DEFAULT_RULES)
    stop = threading.Event()
    thread = threading.Thread(target=lis.run, args=(stop,))
    thread.start()
    server, port = metrics.serve("127.0.0.1:0", lis)
    try:
        publish_raw(mosquitto.port, protocol.topic(PREFIX, "d1", "telemetry"),
                    [json.dumps(window("d1", s, 0.0)).encode() for s in (1, 2, 3)])
        deadline = time.monotonic() + 15
        while lis.stats["stored"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        server.shutdown()
        stop.set()
        thread.join()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    assert samples[("edgepack_listener_messages_stored_total", (("listener", "m1"),))] == 3
    assert samples[("edgepack_listener_connected", (("listener", "m1"),))] == 1
    assert samples[("edgepack_fleet_devices", (("state", "unknown"),))] == 1
    with pytest.raises(Exception, match="use HOST:PORT"):
        metrics.serve("9464", lis)
