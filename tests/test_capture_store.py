"""Captured inputs, cloud side: capture messages (made here as a device's spool makes them:
the envelope of runtime.protocol with a seq) go through a real Mosquitto to a real listener
process, which writes them to its data dir and acknowledges them to the device; `toolchain
dataset export` joins them with their labels into what `toolchain build --data` takes.
Hostile messages go to the dead letters with nothing written; the disk cap holds."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from runtime import protocol
from runtime.mqtt import BrokerConfig, Connection
from tests.conftest import toolchain
from tests.fleet_helpers import query, start_listener, wait_until
from toolchain.build.data_files import read_npz

pytestmark = pytest.mark.timeout(300)


def body(x: np.ndarray, ids: list[str], predictions: list[int], labels: list,
         late: list | None = None) -> dict:
    return {"format": 1, "dtype": "float32", "shape": list(x.shape),
            "data": base64.b64encode(x.astype("<f4").tobytes()).decode(),
            "inference_ids": ids, "predictions": predictions,
            "confidence": [0.5] * len(ids), "labels": labels, "late_labels": late or []}


def samples(n: int, start: float = 0.0) -> np.ndarray:
    return (start + np.arange(n * 32 * 32, dtype=np.float32).reshape(n, 1, 32, 32) / 1e4)


def message(device: str, seq: int, b: dict, version: str = "1") -> bytes:
    bundle = {"sha256": "ab" * 32, "model": "demo", "version": version,
              "profile": "smart-speaker", "backend": "litert"}
    msg = protocol.envelope("capture", device, bundle, b, boot="b")
    msg["seq"] = seq  # last, as the device's spool writes it
    return json.dumps(msg, separators=(",", ":")).encode()


class Device:
    """A device's MQTT side as far as capture goes: publishes at QoS 1, collects acks."""

    def __init__(self, url: str, prefix: str, device: str) -> None:
        self.prefix, self.device, self.acked = prefix, device, set()
        self.conn = Connection(BrokerConfig.from_url(url), f"dev-{uuid.uuid4().hex[:6]}",
                               on_message=self._ack)
        self.conn._on_connect_cb = lambda _present: self.conn.subscribe(
            [protocol.topic(prefix, device, protocol.ACKS)])
        self.conn.start()
        assert self.conn.wait_connected(10)
        time.sleep(0.3)

    def _ack(self, m) -> None:
        for lo, hi in protocol.parse_ack(m.payload):
            self.acked.update(range(lo, hi + 1))

    def send(self, seq: int, b: dict, version: str = "1") -> None:
        self.conn.publish(protocol.topic(self.prefix, self.device, "capture"),
                          message(self.device, seq, b, version))

    def close(self) -> None:
        self.conn.stop()


def export(store: Path, out: Path, *args) -> tuple[int, str, str]:
    proc = toolchain("dataset", "export", "--store", f"sqlite:///{store}", "--out", out, *args,
                     timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_captures_round_trip_through_the_listener_into_an_export_build_reads(broker, tmp_path):
    prefix, store = f"t{uuid.uuid4().hex[:8]}", tmp_path / "fleet.db"
    listener = start_listener(broker.url, store, "--prefix", prefix)
    d1, d2 = Device(broker.url, prefix, "cam-1"), Device(broker.url, prefix, "cam-2")
    try:
        # cam-1: 4 samples, two labelled on the spot; 2 more with late labels for earlier
        # ones (s1's label 3 is corrected to 5); a chunk of late labels only (s2: 7 then 8)
        d1.send(1, body(samples(4), ["s-1", "s-2", "s-3", "s-4"], [3, 4, 4, 0],
                        [3, None, None, 1]))
        d1.send(2, body(samples(2, 1.0), ["s-5", "s-6"], [9, 2], [None, None],
                        late=[["s-2", 7], ["s-1", 5]]))
        d1.send(3, body(samples(0).reshape(0, 1, 32, 32), [], [], [], late=[["s-2", 8]]))
        d2.send(1, body(samples(3, 2.0), ["t-1", "t-2", "t-3"], [6, 6, 6], [None] * 3),
                version="2")
        assert wait_until(lambda: d1.acked >= {1, 2, 3} and d2.acked >= {1}, 30), (
            d1.acked, d2.acked, listener.text())
    finally:
        d1.close()
        d2.close()
        listener.stop()
    # the files: one per message, whole; the database holds a descriptor, never the bytes
    data_dir = tmp_path / "fleet.data"
    assert sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")
                  if p.is_file()) == [f"cam-1/{s:020d}.npz" for s in (1, 2, 3)] + [
                      f"cam-2/{1:020d}.npz"]
    with np.load(data_dir / "cam-1" / f"{1:020d}.npz") as f:
        np.testing.assert_array_equal(f["x"], samples(4))
        assert f["labels"].tolist() == [3, -1, -1, 1] and str(f["version"]) == "1"
        assert f["inference_ids"].tolist() == ["s-1", "s-2", "s-3", "s-4"]
    rows = query(store, "SELECT device_id, seq, payload FROM messages WHERE kind = 'capture'"
                        " ORDER BY device_id, seq")
    assert [(r[0], r[1]) for r in rows] == [("cam-1", 1), ("cam-1", 2), ("cam-1", 3),
                                            ("cam-2", 1)]
    descriptor = json.loads(rows[0][2])
    assert descriptor["body"]["file"] == f"cam-1/{1:020d}.npz"
    assert descriptor["body"]["samples"] == 4 and descriptor["body"]["labelled"] == 2
    assert all(len(r[2]) < 1000 and '"data"' not in r[2] for r in rows)

    code, out, err = export(store, tmp_path / "all.npz")
    assert code == 0, err
    assert "9 samples of 1x32x32 from 2 device(s)" in out and "[export]" in err
    with np.load(tmp_path / "all.npz") as f:
        got = {i: (y, s, d) for i, y, s, d in zip(f["inference_id"].tolist(), f["y"].tolist(),
                                                   f["label_source"].tolist(),
                                                   f["device_id"].tolist(), strict=True)}
        assert f["x"].dtype == np.float32 and f["x"].shape == (9, 1, 32, 32)
        assert f["labels"].tolist() == [str(i) for i in range(10)]
    assert got == {"s-1": (5, 0, "cam-1"), "s-2": (8, 0, "cam-1"), "s-3": (4, 1, "cam-1"),
                   "s-4": (1, 0, "cam-1"), "s-5": (9, 1, "cam-1"), "s-6": (2, 1, "cam-1"),
                   "t-1": (6, 1, "cam-2"), "t-2": (6, 1, "cam-2"), "t-3": (6, 1, "cam-2")}
    x, y, labels = read_npz(tmp_path / "all.npz")  # what build --data reads
    assert x.shape == (9, 1, 32, 32) and len(labels) == 10

    code, out, _ = export(store, tmp_path / "labelled.npz", "--labelled-only", "--since", "1h")
    assert code == 0 and "3 samples" in out
    with np.load(tmp_path / "labelled.npz") as f:
        assert sorted(f["inference_id"].tolist()) == ["s-1", "s-2", "s-4"]
        assert set(f["label_source"].tolist()) == {0}
    code, out, _ = export(store, tmp_path / "v2.npz", "--model", "demo", "--version", "2")
    assert code == 0 and "3 samples" in out and "from 1 device(s)" in out


def test_hostile_capture_messages_go_to_the_dead_letters_and_nothing_is_written(broker,
                                                                                tmp_path):
    prefix, store = f"t{uuid.uuid4().hex[:8]}", tmp_path / "fleet.db"
    listener = start_listener(broker.url, store, "--prefix", prefix)
    dev = Device(broker.url, prefix, "cam-9")
    x2 = samples(2)
    ok = {"x": x2, "ids": ["a-1", "a-2"], "predictions": [1, 2], "labels": [None, 3]}

    def make(**changes) -> dict:
        return {**body(ok["x"], ok["ids"], ok["predictions"], ok["labels"]), **changes}

    cases = [
        (make(dtype="float64"), "only float32"),
        (make(shape=[2, 1, 32, 31]), "holds 8192 bytes; shape [2, 1, 32, 31] of float32 needs"),
        (make(shape=[5000, 1, 1, 1]), "5000 samples; 0 to 4096"),
        (make(shape=[2, 1, 32.0, 32]), "is not a list of 1 to 5 whole numbers"),
        (make(data="not base64!"), "not valid base64"),
        (make(data=base64.b64encode(np.full((2, 1, 32, 32), np.nan, "<f4").tobytes())
              .decode()), "NaN or infinite"),
        (make(inference_ids=["a-1"]), "inference_ids is a list of 1, expected a list of 2"),
        (make(inference_ids=["a-1", "x" * 65]), "is not text of 1 to 64 characters"),
        (make(labels=[None, 70000]), "is not a class index in 0..65535"),
        (make(predictions=[1, True]), "is not a class index"),
        (make(confidence=[0.5, 7]), "not a number in 0..1"),
        (make(confidence=[0.5, float("inf")]), "beyond a double's range"),
        (make(late_labels=[["a-1", 1]] * 10001), "at most 10000"),
        (make(late_labels=[["a-1"]]), "is not an [inference_id, label] pair"),
        (make(format=2), "reads capture format 1"),
    ]
    try:
        for seq, (b, _) in enumerate(cases, 1):
            if b.get("confidence") == [0.5, float("inf")]:  # JSON has no Infinity: 1e999
                payload = message("cam-9", seq, {**b, "confidence": [0.5, 7]})
                payload = payload.replace(b'"confidence":[0.5,7]', b'"confidence":[0.5,1e999]')
                dev.conn.publish(protocol.topic(prefix, "cam-9", "capture"), payload)
            else:
                dev.send(seq, b)
        assert wait_until(lambda: dev.acked >= set(range(1, len(cases) + 1)), 30), (
            dev.acked, listener.text())
    finally:
        dev.close()
        listener.stop()
    reasons = [r[0] for r in query(store, "SELECT reason FROM dead_letters ORDER BY rowid")]
    assert len(reasons) == len(cases), reasons
    for reason, (_, expected) in zip(reasons, cases, strict=True):
        assert expected in reason and "\n" not in reason and len(reason) < 400, reason
    assert query(store, "SELECT COUNT(*) FROM messages WHERE kind = 'capture'") == [(0,)]
    assert [p for p in (tmp_path / "fleet.data").rglob("*") if p.is_file()] == []


def test_the_data_dir_cap_refuses_whole_chunks_and_counts_after_a_restart(broker, tmp_path):
    """Two samples of 1x32x32 make a file of about 10 KiB: a 24 KiB cap takes two of them;
    the third is dead-lettered whole. A restarted listener counts what is there."""
    prefix, store, data = f"t{uuid.uuid4().hex[:8]}", tmp_path / "fleet.db", tmp_path / "caps"
    cap = ["--data-dir", data, "--data-max-mb", str(24 / 1024)]
    listener = start_listener(broker.url, store, "--prefix", prefix, *cap)
    dev = Device(broker.url, prefix, "cam-3")
    try:
        for seq in (1, 2, 3):
            dev.send(seq, body(samples(2), [f"c-{seq}-1", f"c-{seq}-2"], [1, 1], [None, 1]))
        assert wait_until(lambda: dev.acked >= {1, 2, 3}, 30), listener.text()
        listener.stop()
        listener = start_listener(broker.url, store, "--prefix", prefix, *cap)
        dev.send(4, body(samples(1), ["c-4-1"], [1], [None]))
        assert wait_until(lambda: 4 in dev.acked, 30), listener.text()
    finally:
        dev.close()
        listener.stop()
    files = sorted(p.name for p in data.rglob("*") if p.is_file())
    assert files == [f"{1:020d}.npz", f"{2:020d}.npz"]
    assert sum(p.stat().st_size for p in data.rglob("*.npz")) <= 24 * 1024
    reasons = [r[0] for r in query(store, "SELECT reason FROM dead_letters ORDER BY rowid")]
    assert len(reasons) == 2 and all("--data-max-mb" in r and "not written" in r
                                     for r in reasons), reasons
    assert [r[0] for r in query(store, "SELECT seq FROM messages WHERE kind = 'capture'"
                                       " ORDER BY seq")] == [1, 2]


def test_export_errors_are_one_line_with_their_exit_codes(tmp_path):
    from toolchain.fleet.store import open_store

    missing = tmp_path / "none.db"
    code, _, err = export(missing, tmp_path / "o.npz")
    assert code == 2 and "does not exist" in err
    open_store(f"sqlite:///{tmp_path}/fleet.db").close()
    store = tmp_path / "fleet.db"
    for args, code_wanted, text in [
        (("--since", "soon"), 2, "--since 'soon': give a positive duration"),
        (("--data-dir", tmp_path / "nowhere"), 2, "does not exist"),
        ((), 1, "no captured data in the store"),
    ]:
        (tmp_path / "fleet.data").mkdir(exist_ok=True)
        code, _, err = export(store, tmp_path / "o.npz", *args)
        assert code == code_wanted and text in err and err.count("\n") <= 1, (args, err)
    code, _, err = export(store, tmp_path / "o.txt")
    assert code == 2 and "ending in .npz" in err
    proc = toolchain("dataset", "export", "--store", "postgresql://u@127.0.0.1:1/x", "--out",
                     tmp_path / "o.npz")
    assert proc.returncode == 2 and "--data-dir is needed" in proc.stderr
    assert not (tmp_path / "o.npz").exists()


def test_a_data_dir_that_fails_leaves_the_batch_unacknowledged_and_none_refuses(tmp_path):
    """The listener's own disk failing is not the message's fault: the batch is not stored
    (the broker redelivers it); a listener with no data dir dead-letters captures."""
    from toolchain.fleet.listener import Listener, ListenerOptions
    from toolchain.fleet.store import StoreError, open_store
    from toolchain.fleet.subscriber import Message

    nowhere = BrokerConfig.from_url("mqtt://127.0.0.1:1")
    db = open_store(f"sqlite:///{tmp_path}/f.db")
    lis = Listener(ListenerOptions(nowhere, listener_id="t", data_dir=tmp_path / "d"), db, ())
    (tmp_path / "d" / "cam-1").write_text("a file where the device's folder goes")
    batch = [Message(protocol.topic("edgepack", "cam-1", "capture"),
                     message("cam-1", 1, body(samples(1), ["i-1"], [0], [None])), 1)]
    with pytest.raises(StoreError, match="cannot write"):
        lis.process(batch)
    assert db.counts()["messages"] == 0 and db.dead_letter_count() == 0
    (tmp_path / "d" / "cam-1").unlink()
    assert lis.process(batch) == [1]  # the redelivery
    assert db.message_seqs("cam-1") == [1] and lis.stats["captures"] == 1
    # a disk that stays broken: after CAPTURE_WRITE_TRIES deliveries the capture alone goes
    # to the dead letters (acknowledged: it comes back no more)
    from toolchain.fleet.listener import CAPTURE_WRITE_TRIES

    (tmp_path / "d" / "cam-2").write_text("in the way")
    stuck = [Message(protocol.topic("edgepack", "cam-2", "capture"),
                     message("cam-2", 1, body(samples(1), ["j-1"], [0], [None])), 3)]
    for _ in range(CAPTURE_WRITE_TRIES - 1):
        with pytest.raises(StoreError, match="cannot write"):
            lis.process(stuck)
    lis.process(stuck)
    assert "given up after 3 tries" in db.dead_letters(1)[0]["reason"]
    bare = Listener(ListenerOptions(nowhere, listener_id="u"), db, ())
    batch[0] = Message(batch[0].topic, message("cam-1", 2, body(samples(1), ["i-2"], [0],
                                                               [None])), 2)
    bare.process(batch)
    assert "this listener keeps no captured data (start it with --data-dir)" in (
        db.dead_letters(1)[0]["reason"])
