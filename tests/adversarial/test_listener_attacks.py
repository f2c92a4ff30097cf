"""Hostile telemetry against the cloud listener: each poison message goes through the
listener's handle path into a real SQLite store (no broker), lands in the dead letters with
a reason naming the problem, and the good messages around it are stored; the store
refusing a write still leaves the message for redelivery. One slow test drives a real
Mosquitto with 10,000 good messages and one poison message. Hypothesis fuzzes validation and
the store's row building."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import protocol
from runtime.mqtt import BrokerConfig
from runtime.protocol import MessageRejected
from tests.conftest import toolchain
from tests.test_fleet_store import store  # noqa: F401 - SQLite and PostgreSQL, as there
from toolchain.fleet.acks import AckBatch
from toolchain.fleet.listener import Listener, ListenerOptions
from toolchain.fleet.rules import DEFAULT_RULES
from toolchain.fleet.store import Store, StoreError, message_rows, open_store
from toolchain.fleet.subscriber import Message

PREFIX = "edgepack"
DEVICE = "spk-1"
TOPIC = protocol.topic(PREFIX, DEVICE, "telemetry")


def window(seq: int, device: str = DEVICE) -> dict:
    """A window message as a device sends it, with every field the store reads."""
    return {"schema": protocol.SCHEMA_VERSION, "kind": "window", "device_id": device,
            "seq": seq,
            "bundle": {"sha256": "ab" * 32, "model": "demo", "version": "1",
                       "profile": "smart-speaker", "backend": "onnx"},
            "time": {"wall": 1000.0 + seq, "mono": float(seq), "boot": "b"},
            "body": {"count": 100, "errors": 1, "error_rate": 0.01, "throughput_per_s": 50.0,
                     "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                     "budgets": {"p95_latency_ms": 25.0},
                     "window": {"start_wall": 999.0 + seq, "end_wall": 1000.0 + seq},
                     "drift": {"available": True, "score": 0.1, "input_psi": 0.1,
                               "class_psi": 0.01, "confidence_psi": 0.02,
                               "input_ks_min_p": 0.5, "confidence_ks": {"p_value": 0.4}},
                     "spool": {"dropped_since_last": 0},
                     "output": {"confidence_mean": 0.9},
                     "feedback": {"count": 10, "correct": 9, "accuracy": 0.9},
                     "shadow": {"candidate": {"sha256": "cd" * 32, "version": "2"},
                                "count": 25, "agreement": 0.96, "errors": 0,
                                "latency_ms": {"p50": 1.1, "p95": 2.1},
                                "confidence_mean": 0.92,
                                "feedback": {"count": 6, "accuracy": 1.0,
                                             "served_accuracy": 0.83}}}}


def wire(msg: dict) -> bytes:
    return json.dumps(msg).encode()


def changed(path: str, value, seq: int = 2, device: str = DEVICE) -> bytes:
    """A window whose field at dotted `path` is `value`."""
    msg = window(seq, device)
    *parents, last = path.split(".")
    obj = msg
    for key in parents:
        obj = obj[key]
    obj[last] = value
    return wire(msg)


def nested(depth: int) -> bytes:
    inner = "[" * depth + "]" * depth
    return wire(window(2)).replace(b'"boot": "b"', b'"boot": ' + inner.encode())


@pytest.fixture
def sqlite_store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/fleet.db")
    yield s
    s.close()


def refuse(db: Path, table: str, error: str) -> None:
    """Make SQLite refuse every insert into `table`, as a full disk or a dead server would."""
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON {table} BEGIN"
                     f" SELECT RAISE(ABORT, '{error}'); END")


def make_listener(into: Store) -> Listener:
    # a paho client that never connects: handle() is the whole message path but the ack
    return Listener(ListenerOptions(BrokerConfig.from_url("mqtt://127.0.0.1:1"), prefix=PREFIX,
                                    listener_id="test"), into, DEFAULT_RULES)


def seqs(s: Store, device: str = DEVICE) -> list[int]:
    return s.message_seqs(device)


POISON = [
    # (case, topic, payload, words the dead letter's reason must contain)
    ("bundle-a-string", TOPIC, changed("bundle", "demo@1"), "bundle is not a JSON object"),
    ("seq-2^70", TOPIC, changed("seq", 2**70), "seq 1180591620717411303424 is not a sequence"),
    ("seq-negative", TOPIC, changed("seq", -5), "seq -5 is not a sequence"),
    ("deep-nesting", TOPIC, nested(100_000), "nests 100002 levels deep, the limit is 32"),
    ("count-text", TOPIC, changed("body.count", "abc"),
     "body.count 'abc' is not a whole number"),
    ("errors-bool", TOPIC, changed("body.errors", True), "body.errors True is not a whole"),
    ("nan-token", TOPIC, wire(window(2)).replace(b'"score": 0.1', b'"score": NaN'),
     "payload has NaN, which is not a JSON number"),
    ("infinity-token", TOPIC, wire(window(2)).replace(b'"p95": 2.0', b'"p95": -Infinity'),
     "payload has -Infinity"),
    ("float-overflow", TOPIC, wire(window(2)).replace(b'"p95": 2.0', b'"p95": 1e999'),
     "the number 1e999, beyond a double's range"),
    ("int-5000-digits", TOPIC, wire(window(2)).replace(b'"mono": 2.0', b'"mono": ' + b"9" * 5000),
     "an integer of 5000 digits (at most 40)"),
    ("oversize", TOPIC, changed("body.pad", "x" * 300_000),
     "payload is 30", ),
    ("not-utf8", TOPIC, b'{"schema": 1, "kind": "\xff"}', "not UTF-8"),
    ("not-json", TOPIC, b'{"schema": 1,', "payload is not JSON"),
    ("json-array", TOPIC, b"[1, 2, 3]", "payload is not a JSON object"),
    ("model-a-list", TOPIC, changed("bundle.model", ["demo"]), "bundle.model ['demo'] is not text"),
    ("version-nul", TOPIC, changed("bundle.version", "1\x00"), "bundle.version '1\\x00' is not"),
    ("profile-surrogate", TOPIC, changed("bundle.profile", "\ud800"), "bundle.profile"),
    ("backend-huge", TOPIC, changed("bundle.backend", "b" * 5000), "bundle.backend 'bbbb"),
    ("wall-text", TOPIC, changed("time.wall", "yesterday"), "time.wall 'yesterday' is not a"),
    ("latency-a-list", TOPIC, changed("body.latency_ms", [1, 2]),
     "body.latency_ms [1, 2] is not a JSON object"),
    ("ks-p-text", TOPIC, changed("body.drift.confidence_ks.p_value", "low"),
     "body.drift.confidence_ks.p_value 'low'"),
    ("dropped-negative", TOPIC, changed("body.spool.dropped_since_last", -1),
     "body.spool.dropped_since_last -1"),
    ("count-2^64", TOPIC, changed("body.count", 2**64), "body.count 18446744073709551616"),
    ("device-mismatch", TOPIC, wire(window(2, device="spk-2")),
     "device_id 'spk-2' does not match"),
    ("device-bad-name", protocol.topic(PREFIX, "spk 1\x1b[31m", "telemetry"),
     wire(window(2, device="spk 1\x1b[31m")), "device id 'spk 1\\x1b[31m' is not valid"),
    ("status-state-number", protocol.topic(PREFIX, DEVICE, "status"),
     wire({**window(2), "kind": "status", "body": {"state": 5}}), "body.state 5 is not text"),
    ("schema-huge-text", TOPIC, changed("schema", "s" * 100_000), "schema 'sssss"),
]


def test_only_what_the_store_holds_is_acked_to_the_device(sqlite_store):
    """handle() returns the (device, seq) the listener acks: a record stored, found stored
    (a resend is acked again), or kept in the dead letters (the device would otherwise send
    it again after every timeout); never a status, nor a dead letter without a seq."""
    listener = make_listener(sqlite_store)
    assert listener.handle(TOPIC, wire(window(1))) == (DEVICE, 1)
    assert listener.handle(TOPIC, wire(window(1))) == (DEVICE, 1)
    assert listener.handle(TOPIC, changed("body.count", "abc")) == (DEVICE, 2)
    assert listener.handle(TOPIC, b'{"schema": 1, "kind": "window"') is None
    status = {**window(2), "kind": "status", "body": {"state": "online"}}
    assert listener.handle(protocol.topic(PREFIX, DEVICE, "status"), wire(status)) is None


def test_an_ack_batch_groups_seqs_per_device_in_ranges():
    batch = AckBatch()
    for seq in (5, 1, 2, 3, 9, 2):
        batch.add("spk-1", seq)
    apart = range(1, 2 * protocol.MAX_ACK_RANGES + 3, 2)  # 1001 ranges: two messages
    for seq in apart:
        batch.add("spk-2", seq)
    assert len(batch) == 5 + len(apart)
    msgs = batch.messages(PREFIX, "L1")
    assert [t for t, _ in msgs] == [protocol.topic(PREFIX, d, protocol.ACKS)
                                    for d in ("spk-1", "spk-2", "spk-2")]
    assert protocol.parse_ack(msgs[0][1]) == [(1, 3), (5, 5), (9, 9)]
    assert json.loads(msgs[0][1])["listener"] == "L1"
    got = protocol.parse_ack(msgs[1][1]) + protocol.parse_ack(msgs[2][1])
    assert got == [(s, s) for s in apart]


@pytest.mark.parametrize("case,topic,payload,reason", POISON, ids=[p[0] for p in POISON])
def test_a_poison_message_is_dead_lettered_and_the_fleet_goes_on(sqlite_store, case, topic, payload,
                                                                 reason):
    listener = make_listener(sqlite_store)
    listener.handle(TOPIC, wire(window(1)))
    listener.handle(topic, payload)  # returns: acknowledged, not redelivered
    listener.handle(TOPIC, wire(window(3)))
    assert seqs(sqlite_store) == [1, 3]
    assert sqlite_store.counts() == {"messages": 2, "windows": 2}
    (dead,) = sqlite_store.dead_letters(10)
    assert reason in dead["reason"], dead["reason"]
    assert len(dead["reason"]) <= 1000 and "\x1b" not in dead["reason"] + str(dead["device_id"])
    assert dead["topic"] == topic.replace("\x1b", "\\x1b")
    assert dead["payload_bytes"] == len(payload)
    assert len(dead["payload_prefix"]) <= 4 * 1024
    assert listener.stats["rejected"] == 1 and listener.stats["store_errors"] == 0
    assert listener.stats["stored"] == 2


def test_a_foreign_topic_is_dead_lettered_without_a_device(sqlite_store):
    listener = make_listener(sqlite_store)
    listener.handle("other/spk-1/telemetry", wire(window(1)))
    (dead,) = sqlite_store.dead_letters(1)
    assert dead["device_id"] is None and "is not under edgepack/<device>/<kind>" in dead["reason"]
    assert sqlite_store.counts()["messages"] == 0


def test_the_store_refusing_a_write_leaves_the_message_for_redelivery(sqlite_store, tmp_path):
    listener = make_listener(sqlite_store)
    refuse(tmp_path / "fleet.db", "messages", "refused by the test")
    with pytest.raises(StoreError, match="refused by the test"):
        listener.handle(TOPIC, wire(window(1)))
    assert sqlite_store.dead_letter_count() == 0 and seqs(sqlite_store) == []
    # as a batch off the connection: counted as a store error, not acknowledged, reconnects
    listener._commit([Message(TOPIC, wire(window(1)), 7), Message(TOPIC, wire(window(2)), 8)])
    assert listener.stats["store_errors"] == 1 and listener.stats["rejected"] == 0
    assert listener.stats["batches"] == 0 and not listener.conn._out  # no PUBACK queued
    with sqlite3.connect(tmp_path / "fleet.db") as db:
        db.execute("DROP TRIGGER refuse")
    listener.handle(TOPIC, wire(window(1)))  # the redelivery
    assert seqs(sqlite_store) == [1] and sqlite_store.dead_letter_count() == 0


def test_a_dead_letter_the_store_refuses_is_redelivered_too(sqlite_store, tmp_path):
    listener = make_listener(sqlite_store)
    refuse(tmp_path / "fleet.db", "dead_letters", "disk full")
    with pytest.raises(StoreError, match="disk full"):
        listener.handle(TOPIC, changed("body.count", "abc"))
    assert listener.stats["rejected"] == 0


def test_row_building_refuses_what_a_column_cannot_hold_before_any_sql(sqlite_store):
    """The store on its own (without validation in front of it): content errors are
    MessageRejected, nothing is written half-way."""
    for msg in (dict(window(1), seq=2**70), {**window(1), "body": {"count": "abc"}},
                {**window(1), "bundle": {"model": ["x"]}}, {"kind": "window"},
                {**window(1), "time": None, "body": {"error_rate": float("nan")}}):
        with pytest.raises(MessageRejected):
            sqlite_store.ingest(msg, 1.0, DEFAULT_RULES)
    assert sqlite_store.counts() == {"messages": 0, "windows": 0} and sqlite_store.devices() == []
    with pytest.raises(MessageRejected, match="status row"):
        sqlite_store.set_status({"device_id": DEVICE, "body": "online"})


def test_dead_letters_on_sqlite_and_postgresql(store):  # noqa: F811 - the fixture
    """The same SQL on both stores; on PostgreSQL a NUL in a text column would be a
    database error: validation keeps it out, and the dead letter's own texts are made safe."""
    listener = make_listener(store)
    listener.handle(TOPIC, wire(window(1)))
    listener.handle(TOPIC, changed("bundle.version", "1\x00"))
    listener.handle(protocol.topic(PREFIX, "x\x00\ud800", "telemetry"), b"\x00\xff" * 900)
    listener.handle(TOPIC, wire(window(3)))
    assert seqs(store) == [1, 3] and store.dead_letter_count() == 2
    newest, oldest = store.dead_letters(5)
    assert "bundle.version '1\\x00' is not text" in oldest["reason"]
    assert newest["device_id"] == "x\\x00\\ud800" and "device id" in newest["reason"]
    assert newest["payload_bytes"] == 1800 and "\x00" not in newest["payload_prefix"]
    assert listener.stats["store_errors"] == 0


def test_old_stores_get_the_new_columns_and_tables(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE listener_stats (listener_id TEXT PRIMARY KEY, received BIGINT,"
                   " stored BIGINT, duplicates BIGINT, rejected BIGINT,"
                   " started_at DOUBLE PRECISION, updated_at DOUBLE PRECISION)")
    s = open_store(str(path))
    s.save_listener_stats("L", {"received": 3, "stored": 1, "duplicates": 0, "rejected": 2,
                                "store_errors": 0, "connects": 1, "started_at": 1.0})
    (row,) = s.listener_stats()
    assert (row["rejected"], row["store_errors"], row["connects"]) == (2, 0, 1)
    assert s.dead_letter_count() == 0
    s.close()


def test_fleet_report_shows_the_dead_letters(sqlite_store, tmp_path):
    listener = make_listener(sqlite_store)
    listener.handle(TOPIC, wire(window(1)))
    listener.handle(TOPIC, changed("body.count", "abc"))
    listener.handle(TOPIC, changed("seq", 2**70))
    sqlite_store.save_listener_stats("test", listener.stats)
    url = f"sqlite:///{tmp_path}/fleet.db"
    text = toolchain("fleet", "--store", url)
    assert text.returncode == 0, text.stderr
    assert "dead letters: 2 (newest first):" in text.stdout
    assert "body.count 'abc' is not a whole number" in text.stdout
    assert "seq 1180591620717411303424 is not a sequence number" in text.stdout
    assert "2 dead letters, 0 store errors" in text.stdout
    as_json = toolchain("fleet", "--store", url, "--json", "--html", tmp_path / "r.html")
    assert as_json.returncode == 0, as_json.stderr
    page = (tmp_path / "r.html").read_text()
    assert "<p>2 message(s) that could not be stored" in page
    assert "body.count &#x27;abc&#x27; is not a whole number" in page
    dead = json.loads(as_json.stdout)["dead_letters"]
    assert dead["count"] == 2 and len(dead["latest"]) == 2
    assert "seq 1180591620717411303424" in dead["latest"][0]["reason"]  # newest first


# -- fuzzing ------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)
FIELDS = [f"bundle.{k}" for k in ("sha256", "model", "version", "profile", "backend")] + [
    "seq", "schema", "kind", "device_id", "time", "time.wall", "body", "bundle",
    *(f"body.{p}" for p in protocol.BODY_FIELDS["telemetry"])]


def mutated(path: str, value, seq: int) -> bytes:
    """A valid window with the field at `path` (one of FIELDS) replaced by `value`."""
    if "." in path or path not in ("body", "time", "bundle"):
        return changed(path, value, seq)
    return wire({**window(seq), path: value})


def _settle(topic: str, payload: bytes) -> dict | None:
    """validate, and for what passes, build the rows: only MessageRejected may escape, and
    what validation lets through must build."""
    try:
        _, msg = protocol.validate(topic, payload, PREFIX)
    except MessageRejected:
        return None
    message_rows(msg, 1.0)
    return msg


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_validate_takes_any_payload(payload):
    _settle(TOPIC, payload)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FIELDS), JSON, st.integers(min_value=1, max_value=2**40))
def test_fuzz_mutated_windows_are_stored_or_rejected(path, value, seq):
    """What validation lets through, a real store takes: no database error from content."""
    msg = _settle(TOPIC, mutated(path, value, seq))
    if msg is not None:
        MEMORY_STORE.ingest(msg, 1.0, DEFAULT_RULES)


MEMORY_STORE = open_store(":memory:")


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["device_id", "seq", "kind", "bundle", "time", "body"]),
                       JSON, max_size=6))
def test_fuzz_row_building_rejects_or_builds(msg):
    try:
        message_rows(msg, 1.0)
    except MessageRejected:
        pass


@settings(max_examples=100, deadline=None)
@given(JSON)
def test_json_depth_counts_nesting_like_the_parser(value):
    def depth(v) -> int:
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        return 0

    assert protocol.json_depth(json.dumps(value)) == depth(value)


# -- a real broker ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_poison_among_10000_good_never_stops_the_fleet(tmp_path):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from tests.fleet_helpers import query, start_listener, wait_until
    from tests.mqtt_broker import Broker

    broker = Broker(tmp_path / "broker").start()
    db, prefix = tmp_path / "fleet.db", f"t{uuid.uuid4().hex[:8]}"
    listener = start_listener(broker.url, db, "--prefix", prefix)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fuzz-{uuid.uuid4().hex[:6]}")
    try:
        client.max_inflight_messages_set(100)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        infos = []
        for seq in range(1, 101):
            for d in range(100):
                device = f"spk-{d:03d}"
                msg = window(seq, device)
                del msg["body"]["drift"]  # lighter rules: the store is what is under test
                infos.append(client.publish(protocol.topic(prefix, device, "telemetry"),
                                            wire(msg), qos=1))
            if seq == 50:
                infos.append(client.publish(protocol.topic(prefix, "spk-007", "telemetry"),
                                            changed("body.count", "abc", 10_000, "spk-007"),
                                            qos=1))
        for info in infos:
            info.wait_for_publish(60)
        assert wait_until(lambda: query(db, "SELECT COUNT(*) FROM messages")[0][0] == 10_000
                          and query(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == 1,
                          timeout=180, interval=1), listener.text()
        time.sleep(1)
        assert listener.stop() == 0, listener.text()
    finally:
        client.loop_stop()
        client.disconnect()
        if listener.p.poll() is None:
            listener.stop()
        broker.stop()
    assert query(db, "SELECT COUNT(*) FROM windows")[0][0] == 10_000
    assert query(db, "SELECT COUNT(DISTINCT device_id) FROM messages")[0][0] == 100
    ((reason, device),) = query(db, "SELECT reason, device_id FROM dead_letters")
    assert device == "spk-007" and "body.count 'abc' is not a whole number" in reason
    (stats,) = query(db, "SELECT received, stored, rejected, store_errors, connects"
                         " FROM listener_stats")
    assert stats == (10_001, 10_000, 1, 0, 1)  # never reconnected, nothing redelivered
    assert "reconnecting" not in listener.text()
