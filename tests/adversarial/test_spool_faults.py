"""Faults on the device: a full disk under the spool, a damaged spool folder, reloads that
fail half-way, a server that dribbles, a process killed mid-run. Real files, a real small
filesystem (tmpfs, where this machine lets the test mount one), real bundles."""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import spool as spool_mod
from runtime.spool import (
    ACK,
    MAX_SEQ,
    QUARANTINE,
    SEQ_SAFETY_MARGIN,
    Spool,
    SpoolError,
    _encode,
)
from runtime.telemetry import Telemetry, TelemetryOptions


# -- a small filesystem that can be filled and emptied ---------------------------------------
class Disk:
    """A folder on a 1-4 MiB tmpfs (mounted here when allowed), or, where mounting is not
    allowed, a plain folder whose spool writes are refused with ENOSPC by a patch."""

    def __init__(self, folder: Path, monkeypatch, size: str = "1m") -> None:
        self.folder = folder
        self.monkeypatch = monkeypatch
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(folder)], capture_output=True, text=True)
        self.real = proc.returncode == 0
        self.filler = folder / "filler"

    def fill(self) -> None:
        if not self.real:
            def refuse(fh, data):
                raise OSError(errno.ENOSPC, "No space left on device (faked)")
            self.monkeypatch.setattr(spool_mod, "_write_all", refuse)
            return
        with self.filler.open("ab", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        # even the smallest write is refused now
        with pytest.raises(OSError), (self.folder / "probe").open("wb", buffering=0) as fh:
            fh.write(b"x")
        (self.folder / "probe").unlink(missing_ok=True)

    def free(self) -> None:
        if not self.real:
            self.monkeypatch.undo()
            return
        self.filler.unlink()

    def close(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


def _exhaust(spool: Spool) -> None:
    """A full filesystem still takes writes into a file's last, partly used block: use it
    up with the smallest records there are until the spool loses one."""
    lost = spool.lost
    for _ in range(10_000):
        spool.append("", {})
        if spool.lost > lost:
            return
    raise AssertionError("the disk never filled up")


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(tmp_path / "small", monkeypatch)
    print(f"full-disk mode: {'real tmpfs' if d.real else 'faked ENOSPC at the write call'}")
    yield d
    d.close()


def _append(spool: Spool, n: int, start: int = 0) -> list[int]:
    return [spool.append("t", {"i": i}) for i in range(start, start + n)]


def _read_back(spool: Spool) -> list[int | None]:
    return [json.loads(r.payload).get("i") for r in spool.pending(limit=10_000)]


# -- 1. full disk ----------------------------------------------------------------------------
def test_full_disk_append_is_counted_not_raised_and_resumes(disk):
    spool = Spool(disk.folder / "spool", fsync="always")
    _append(spool, 20)
    for s in range(1, 6):
        spool.ack(s)
    disk.fill()
    _exhaust(spool)
    lost = spool.lost
    seqs = _append(spool, 30, start=20)  # no exception
    assert seqs == list(range(seqs[0], seqs[0] + 30))  # numbers used up: a gap, no reuse
    stats = spool.stats()
    assert stats["lost"] == lost + 30 and stats["write_errors"] >= lost + 30
    disk.free()
    assert _append(spool, 5, start=50) == list(range(seqs[-1] + 1, seqs[-1] + 6))
    assert spool.lost == lost + 30
    ours = [i for i in _read_back(spool) if i is not None]
    assert ours == [*range(5, 20), *range(50, 55)]
    spool.close()
    again = Spool(disk.folder / "spool")
    assert again.corrupt == 0 and again.acked == 5
    assert [i for i in _read_back(again) if i is not None] == [*range(5, 20), *range(50, 55)]
    assert again.append("t", {"i": 99}) == seqs[-1] + 6


def test_full_disk_acks_state_and_close_do_not_raise(disk):
    spool = Spool(disk.folder / "spool", max_bytes=64 * 1024, segment_bytes=16 * 1024)
    _append(spool, 10)
    disk.fill()
    _exhaust(spool)
    for s in range(1, 11):
        spool.ack(s)  # the ack log may not grow: remembered in memory at least
    _append(spool, 400, start=10)  # the cap and roll paths on a full disk
    # dropping the oldest segments frees room: some go through, the rest are counted
    assert spool.acked == 10 and spool.lost > 1
    spool.close()  # state.json cannot be written: no exception
    disk.free()
    again = Spool(disk.folder / "spool")
    # at worst acknowledged records come again (a duplicate), never a reused number
    pending = again.pending(limit=10_000)
    assert again.next_seq > max([10, *(r.seq for r in pending)])
    assert again.append("t", {"i": 0}) == again.next_seq - 1


def test_torn_record_from_a_refused_write_is_cut_off(tmp_path, monkeypatch):
    spool = Spool(tmp_path, fsync="never")
    _append(spool, 3)
    real = spool_mod._write_all

    def half_then_enospc(fh, data):
        fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(spool_mod, "_write_all", half_then_enospc)
    spool.append("t", {"i": 3})
    monkeypatch.setattr(spool_mod, "_write_all", real)
    _append(spool, 2, start=4)
    assert _read_back(spool) == [0, 1, 2, 4, 5]
    spool.close()
    again = Spool(tmp_path)
    assert again.corrupt == 0 and _read_back(again) == [0, 1, 2, 4, 5]


def _telemetry(folder: Path, **kw) -> Telemetry:
    opts = TelemetryOptions(device_id="dev-1", spool_dir=folder, window_inferences=50, **kw)
    return Telemetry(opts, {"model": "m", "version": "1"}, None, 3, {})


def _windows(spool: Spool) -> list[dict]:
    return [json.loads(r.payload)["body"] for r in spool.pending(limit=10_000)
            if r.topic.endswith("/telemetry")]


def test_lost_records_are_reported_in_the_next_window_written(disk):
    tel = _telemetry(disk.folder / "spool")
    x = np.zeros((1, 3, 4), np.float32)

    def infer(n: int) -> None:
        for _ in range(n):
            tel.record(x, np.array([1]), np.array([0.9]), 0.001)
    infer(120)  # two windows written
    disk.fill()
    _exhaust(tel.spool)  # one record lost
    infer(80)  # two windows lost
    for _ in range(7):
        tel.event("note")  # seven events lost
    disk.free()
    infer(60)
    assert tel.flush() is not None
    windows = _windows(tel.spool)
    assert [w["count"] for w in windows] == [50, 50, 50, 10]
    assert [w["spool"]["lost_since_last"] for w in windows] == [0, 0, 1 + 2 + 7, 0]
    assert windows[2]["spool"]["lost_total"] == 10
    assert sum(w["spool"]["lost_since_last"] for w in windows) == tel.spool.lost
    assert all(w["errors"] == 0 for w in windows)
    tel.close(0)


# -- 2. a damaged spool folder ---------------------------------------------------------------
def _used(folder: Path, n: int = 5, ack: bool = True) -> None:
    """A spool that handed out 1..n, everything acknowledged and removed if `ack`."""
    spool = Spool(folder)
    _append(spool, n)
    if ack:
        for s in range(1, n + 1):
            spool.ack(s)
    spool.close()


def _quarantined(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / QUARANTINE).iterdir())


@pytest.mark.parametrize("state", [b"", b"{", b"[]", b'{"next_seq": "7", "dropped": 0}',
                                   b'{"next_seq": -3, "dropped": 0}', b'{"dropped": 0}',
                                   b'{"next_seq": true, "dropped": 0}', b"\xff\xfe\x00",
                                   b'{"next_seq": 1.5e3, "dropped": 0}'])
def test_bad_state_file_is_quarantined_and_numbers_stay_monotonic(tmp_path, state, caplog):
    _used(tmp_path, 5)
    (tmp_path / "state.json").write_bytes(state)
    spool = Spool(tmp_path)
    assert _quarantined(tmp_path)[0].endswith("state.json")
    assert "state.json is damaged" in caplog.text
    # 1..5 may have reached the broker: never again, and a margin for what no file shows
    assert spool.next_seq >= 6 + SEQ_SAFETY_MARGIN
    seq = spool.append("t", {"i": 1})
    assert [r.seq for r in spool.pending()] == [seq]
    spool.close()
    assert Spool(tmp_path).next_seq == seq + 1  # the rewritten state is good


def test_absurd_state_number_is_clamped_and_nothing_past_it_is_written(tmp_path):
    (tmp_path / "state.json").write_text('{"next_seq": 99999999999999999999999, "dropped": 0}')
    spool = Spool(tmp_path)
    assert spool.next_seq == MAX_SEQ
    assert spool.append("t", {"i": 0}) == MAX_SEQ and spool.lost == 1  # counted, no crash
    spool.close()
    assert Spool(tmp_path).next_seq == MAX_SEQ  # never lower: nothing is reused


def test_state_file_that_is_a_folder(tmp_path):
    _used(tmp_path, 3)
    (tmp_path / "state.json").unlink()
    (tmp_path / "state.json").mkdir()
    spool = Spool(tmp_path)
    assert spool.next_seq >= 4 + SEQ_SAFETY_MARGIN and (tmp_path / "state.json").is_file()


@pytest.mark.parametrize("log", [ACK.pack(9) + ACK.pack(3), ACK.pack(MAX_SEQ + 5), "folder"])
def test_corrupt_ack_log_is_quarantined_and_records_come_again(tmp_path, log):
    _used(tmp_path, 6, ack=False)
    path = tmp_path / "acked"
    if log == "folder":
        path.mkdir()
    else:
        path.write_bytes(log)
    spool = Spool(tmp_path)
    assert any(n.endswith("acked") for n in _quarantined(tmp_path))
    assert spool.acked == 0 and _read_back(spool) == list(range(6))  # resent, not lost
    assert spool.append("t", {"i": 6}) == 7
    spool.ack(1)
    assert Spool(tmp_path).acked == 1


def test_torn_ack_log_keeps_the_last_whole_mark(tmp_path):
    spool = Spool(tmp_path)
    _append(spool, 4)
    spool.ack(1)
    spool.ack(2)
    with (tmp_path / "acked").open("ab") as fh:
        fh.write(b"\x07\x00\x00")  # power lost mid-write: normal, not damage
    again = Spool(tmp_path)
    assert again.acked == 2 and not (tmp_path / QUARANTINE).exists()


def test_stray_files_and_folders_in_the_segments_folder(tmp_path, caplog):
    _used(tmp_path, 4, ack=False)
    seg = tmp_path / "segments"
    (seg / "notes.txt").write_text("hello")
    (seg / "0000000000000100.seg").mkdir()
    (seg / "12.seg").write_bytes(b"")
    (seg / "0000000000000200.seg").symlink_to("/etc/hostname")
    (tmp_path / "something-else").write_text("left alone")  # the device's own files live here
    spool = Spool(tmp_path)
    assert len(_quarantined(tmp_path)) == 4 and "not a spool segment" in caplog.text
    assert _read_back(spool) == [0, 1, 2, 3] and spool.append("t", {"i": 4}) == 5
    assert (tmp_path / "something-else").read_text() == "left alone"
    assert Path("/etc/hostname").exists()


def test_segments_path_that_is_a_file(tmp_path):
    tmp_path.joinpath("segments").write_bytes(b"not a folder")
    spool = Spool(tmp_path)
    assert spool.append("t", {"i": 0}) == 1 and _read_back(spool) == [0]
    assert _quarantined(tmp_path)[0].endswith("segments")


def test_foreign_segment_is_quarantined_and_ours_still_read(tmp_path):
    _used(tmp_path, 3, ack=False)
    (tmp_path / "segments" / "0000000000000002.seg").write_bytes(os.urandom(5000))
    (tmp_path / "segments" / "0000000000000500.seg").write_bytes(
        _encode(7, "t", b'{"i": 7}'))  # ours in form, but numbered below its name
    spool = Spool(tmp_path)
    assert len(_quarantined(tmp_path)) == 2
    assert _read_back(spool) == [0, 1, 2]
    assert spool.append("t", {"i": 3}) >= 4


def test_garbage_in_the_middle_of_a_segment_is_skipped(tmp_path):
    spool = Spool(tmp_path)
    _append(spool, 3)
    spool.close()
    seg = next(tmp_path.glob("segments/*.seg"))
    data = seg.read_bytes()
    one = len(_encode(1, "t", b'{"i":0,"seq":1}'))
    seg.write_bytes(data[:one] + b"EPS1" + os.urandom(300) + data[one:])
    again = Spool(tmp_path)
    assert _read_back(again) == [0, 1, 2] and again.corrupt >= 1
    assert not (tmp_path / QUARANTINE).exists()
    assert again.append("t", {"i": 3}) == 4


def _raw_record(seq: int, topic: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    body = struct.pack("<H", len(topic)) + topic + payload
    return spool_mod.HEADER.pack(b"EPS1", len(body), zlib.crc32(ACK.pack(seq) + body),
                                 seq) + body


def test_records_with_valid_checksums_but_impossible_contents(tmp_path):
    seg = tmp_path / "segments"
    seg.mkdir()
    recs = [_encode(1, "t", b'{"i":0}'), _encode(MAX_SEQ + 1, "t", b"{}"),
            _encode(1, "t", b"{}"),  # a repeated number
            _encode(2, "t", b'{"i":1}'),
            _raw_record(3, b"\xff\xfe", b"{}"),  # a topic that is not UTF-8
            _raw_record(4, b"t", b"")[:-0 or None].replace(b"\x01\x00t", b"\xff\x00t"),
            _encode(5, "t", b'{"i":2}')]
    (seg / "0000000000000001.seg").write_bytes(b"".join(recs))
    spool = Spool(tmp_path)
    assert [r.seq for r in spool.pending()] == [1, 2, 5]
    assert _read_back(spool) == [0, 1, 2]
    assert spool.corrupt >= 3 and spool.next_seq == 6


def test_two_damaged_opens_in_one_second_keep_both_copies(tmp_path):
    for content in (b"", b"{"):
        (tmp_path / "state.json").write_bytes(content)
        Spool(tmp_path).close()
        (tmp_path / "state.json").write_bytes(content)
    Spool(tmp_path)
    assert len(_quarantined(tmp_path)) == 3


def test_unwritable_spool_folder_is_a_spool_error(tmp_path):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(SpoolError, match="cannot create spool folder"):
        Spool(tmp_path / "f")


# -- 4. fuzzing the reader -------------------------------------------------------------------
def _open_any(folder: Path, seg: bytes, ack: bytes, state: bytes, name: str) -> None:
    (folder / "segments").mkdir(parents=True)
    (folder / "segments" / name).write_bytes(seg)
    (folder / "acked").write_bytes(ack)
    (folder / "state.json").write_bytes(state)
    try:
        spool = Spool(folder)
    except SpoolError:
        return
    before = spool.next_seq
    seq = spool.append("t", {"i": 1})
    assert seq == before
    if seq < MAX_SEQ:
        assert spool.pending(limit=100_000)[-1].seq == seq and spool.lost == 0
    else:  # hostile files used up the numbers: counted as lost, never reused
        assert spool.lost == 1
    spool.close()
    assert Spool(folder).next_seq > min(seq, MAX_SEQ - 1)


def _records() -> st.SearchStrategy[bytes]:
    rec = st.builds(lambda s, t, p: _encode(s, t, p), st.integers(0, 2**64 - 1),
                    st.text(max_size=8), st.binary(max_size=30))
    return st.lists(st.one_of(rec, st.binary(max_size=40)), max_size=8).map(b"".join)


STATES = st.one_of(st.binary(max_size=40), st.builds(
    lambda a, b: json.dumps({"next_seq": a, "dropped": b}).encode(), st.integers(),
    st.integers()))
SEGMENT_NAMES = st.sampled_from(["0000000000000001.seg", "0000000000000000.seg",
                                 "9999999999999999.seg", "x.seg"])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seg=_records(), ack=st.binary(max_size=40), state=STATES, name=SEGMENT_NAMES)
def test_fuzzed_spool_folder_opens_appends_and_reads(tmp_path_factory, seg, ack, state, name):
    _open_any(tmp_path_factory.mktemp("fuzz"), seg, ack, state, name)


# -- 3. fetching bundles ---------------------------------------------------------------------
@contextlib.contextmanager
def _server(handler_body):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            handler_body(self)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/b.edgepack"
    finally:
        srv.shutdown()
        srv.server_close()


def test_dribbling_server_hits_the_overall_deadline(tmp_path, monkeypatch):
    from runtime import device

    stop = threading.Event()

    def dribble(h):
        h.send_response(200)
        h.end_headers()
        with contextlib.suppress(OSError):
            while not stop.wait(0.05):
                h.wfile.write(b"x")
                h.wfile.flush()
    monkeypatch.setattr(device, "FETCH_DEADLINE_S", 1)
    with _server(dribble) as url:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="took longer than 1 s"):
            device.fetch_bundle(url, tmp_path)
        stop.set()
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("declared", [True, False])
def test_oversized_download_is_refused(tmp_path, monkeypatch, declared):
    from runtime import device

    def big(h):
        h.send_response(200)
        if declared:
            h.send_header("Content-Length", str(10 << 20))
        h.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(40):
                h.wfile.write(b"y" * 65536)
    monkeypatch.setattr(device, "FETCH_MAX_BYTES", 1 << 20)
    with _server(big) as url, pytest.raises(ValueError, match="larger than 1 MiB"):
        device.fetch_bundle(url, tmp_path)


def test_server_that_does_not_speak_http(tmp_path):
    import socket

    from runtime import device

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def garbage():
        conn, _ = srv.accept()
        conn.recv(1000)
        conn.sendall(b"\x00\x01 not http at all\r\n\r\n")
        conn.close()
    threading.Thread(target=garbage, daemon=True).start()
    with pytest.raises(ValueError, match="bad HTTP response"):
        device.fetch_bundle(f"http://127.0.0.1:{srv.getsockname()[1]}/x", tmp_path)
    srv.close()


def test_a_slow_command_does_not_hold_up_the_others(tmp_path):
    from types import SimpleNamespace

    release = threading.Event()

    def on_command(cmd: dict) -> dict:
        if cmd["command"] == "reload":  # a download from a server that dribbles
            release.wait(30)
        return {"done": cmd["command"]}
    opts = TelemetryOptions(device_id="dev-1", spool_dir=tmp_path)
    tel = Telemetry(opts, {"model": "m", "version": "1"}, None, 3, {},
                    on_command=on_command).start()
    topic = tel.topic("commands")
    try:
        for name in ("reload", "ping"):
            tel._message(SimpleNamespace(topic=topic, payload=json.dumps(
                {"id": name, "command": name}).encode()))

        def answered() -> list[str]:
            return [json.loads(r.payload)["body"]["id"] for r in tel.spool.pending()
                    if r.topic.endswith("/results")]
        deadline = time.monotonic() + 20
        while answered() != ["ping"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert answered() == ["ping"]  # answered while the reload is still running
        release.set()
        while len(answered()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert answered() == ["ping", "reload"]
    finally:
        release.set()
        tel.close(0)


# -- the device on a real bundle (slow) ------------------------------------------------------
@pytest.fixture(scope="module")
def good(build_demo) -> Path:
    return build_demo("host-cpu").bundle


def _variant(good: Path, folder: Path, version: str, reference: bytes | None = None) -> Path:
    """The good bundle as another version, its reference distributions swapped if given:
    every hash and check in the archive is right."""
    from runtime.bundle import MANIFEST, extract_bundle, write_bundle

    src = folder / f"src-{version}"
    manifest = extract_bundle(good, src)
    raw = json.loads((src / MANIFEST).read_bytes())
    raw["model"]["version"] = version
    raw.pop("files", None)
    if reference is not None:
        (src / manifest.reference_distributions).write_bytes(reference)
    return write_bundle(folder / f"{version}.edgepack", raw,
                        {rel: src / rel for rel in manifest.files})


def _open(bundle: Path, spool: Path, **kw):
    from runtime.device import Device

    return Device.open(bundle, device_id="dev-1", spool_dir=spool, **kw)


def _x(dev, n: int = 1) -> np.ndarray:
    return np.random.default_rng(0).random((n, *dev.model.raw_shape), dtype=np.float32)


def test_device_starts_on_a_damaged_spool_folder(good, tmp_path):
    spool = tmp_path / "spool"
    _used(spool, 5, ack=False)
    (spool / "state.json").write_bytes(b"")
    (spool / "acked").write_bytes(ACK.pack(4) + ACK.pack(2))
    (spool / "segments" / "0000000000000003.seg").write_bytes(b"junk" * 100)
    with _open(good, spool) as dev:
        dev.classify(_x(dev))
        assert dev.telemetry.flush() is not None
        assert len(_quarantined(spool)) == 3
        seqs = [r.seq for r in dev.telemetry.spool.pending(limit=1000)]
        assert seqs[:5] == [1, 2, 3, 4, 5] and seqs[5] > 5 + SEQ_SAFETY_MARGIN


def test_full_disk_replay_keeps_inferring_and_reports_what_was_lost(good, tmp_path,
                                                                    monkeypatch):
    from runtime.serve import replay

    disk = Disk(tmp_path / "small", monkeypatch, size="64m")
    try:
        with _open(good, disk.folder / "spool", window_inferences=50) as dev:
            x = _x(dev, 100)
            assert replay(dev, x) == 100
            spool = dev.telemetry.spool
            first = spool.pending(limit=2)  # the start-up events: acknowledged
            assert all(r.topic.endswith("/events") for r in first)
            acked = [r.seq for r in first]
            for s in acked:
                spool.ack(s)
            disk.fill()
            _exhaust(spool)
            assert replay(dev, x, repeat=2) == 200  # never raises
            lost = spool.lost
            assert lost == 1 + 4  # the filler record and four windows
            disk.free()
            assert replay(dev, x) == 100
            dev.telemetry.flush()
            windows = _windows(spool)
            assert sum(w["count"] for w in windows) + 50 * 4 == 400
            assert sum(w["errors"] for w in windows) == 0
            assert sum(w["spool"]["lost_since_last"] for w in windows) == lost
        again = Spool(disk.folder / "spool")
        assert again.acked == acked[-1]
        assert all(r.seq > acked[-1] for r in again.pending(limit=10_000))
    finally:
        disk.close()


def _tmp_leftovers() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("edgepack-*")}


@pytest.mark.parametrize("reference", [b"{not json", b"[1, 2]", b'{"output": 5}',
                                       b'{"samples": {"confidence": "abc"}}'])
def test_reload_with_bad_reference_distributions_changes_nothing(good, tmp_path, reference):
    bad = _variant(good, tmp_path, "9.9.9-bad", reference=reference)
    spool = tmp_path / "spool"
    before = _tmp_leftovers()
    with _open(good, spool) as dev:
        old = dict(dev.info)
        dev.classify(_x(dev))
        from runtime.telemetry import CommandError

        with pytest.raises(CommandError,
                           match="failed, still serving .*reference/distributions.json"):
            dev.reload(str(bad))
        assert dev.info == old
        assert dev.handle_command({"command": "ping", "args": {}})["bundle"] == old
        dev.classify(_x(dev))
        dev.telemetry.flush()
        assert all(w["bundle"]["version"] == old["version"] for w in
                   (json.loads(r.payload) for r in dev.telemetry.spool.pending(limit=1000)
                    if r.topic.endswith("/telemetry")))
        assert not (spool / "reloaded-bundle.json").exists()
        assert not (spool / "bundles").exists() or not any((spool / "bundles").iterdir())
        assert len(list((spool / "extracted").iterdir())) == 1  # the serving model only
    assert _tmp_leftovers() <= before
    with _open(good, spool) as dev:  # the same command line starts again
        assert dev.info == old


def test_bundle_with_bad_reference_is_refused_at_start_up_in_one_line(good, tmp_path):
    from runtime.bundle import BundleError

    bad = _variant(good, tmp_path, "9.9.9-bad", reference=b'{"output": 5}')
    with pytest.raises(BundleError, match="reference/distributions.json"):
        _open(bad, tmp_path / "spool")
    assert not any((tmp_path / "spool" / "extracted").iterdir())


def test_reloads_keep_two_copies_and_a_broken_copy_falls_back(good, tmp_path, caplog):
    spool = tmp_path / "spool"
    v = [_variant(good, tmp_path, f"2.0.{i}") for i in range(3)]
    with _open(good, spool) as dev:
        for b in v:
            assert dev.reload(str(b))["serving"]["version"] == b.stem
        kept = sorted((spool / "bundles").iterdir())
        assert len(kept) == 2 and dev.bundle_path in kept
        assert len(list((spool / "extracted").iterdir())) == 1
    with _open(good, spool) as dev:
        assert dev.info["version"] == "2.0.2"  # the reload is resumed
        path = dev.bundle_path
    with tarfile.open(path, "w:gz"):
        pass  # the kept copy is damaged on disk
    with _open(good, spool) as dev:
        assert dev.info["sha256"] != "" and dev.bundle_path == good
    assert "does not load" in caplog.text


def test_killed_device_leaves_no_extraction_folder_behind(good, tmp_path):
    spool = tmp_path / "spool"
    code = ("import sys, time; from runtime.device import Device; "
            "d = Device.open(sys.argv[1], device_id='dev-1', spool_dir=sys.argv[2]); "
            "print('up', flush=True); time.sleep(60)")
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", code, str(good), str(spool)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "up"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(list((spool / "extracted").iterdir())) == 1  # the killed one's
    with _open(good, spool):
        assert len(list((spool / "extracted").iterdir())) == 1  # ours only
    assert not list((spool / "extracted").iterdir())
