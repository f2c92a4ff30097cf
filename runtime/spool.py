"""The device's on-disk outbox. Every message that must not be lost is appended here first,
with the next per-device sequence number, and leaves only when the broker has acknowledged
it. Sequence numbers survive restarts because they live here too.

Layout of a spool folder:
  segments/<first seq, 16 digits>.seg   append-only records:
      magic "EPS1" | u32 body length | u32 crc32(seq + body) | u64 seq | body
      body = u16 topic length | topic (utf-8) | payload
  acked                                 u64 records, each "everything <= this seq is acked";
                                        only the last whole one counts
  state.json                            next sequence number and the dropped count, for when
                                        every segment has been acknowledged and removed

A torn record at the end of the newest segment (power loss mid-write) is cut off when the
spool opens; a record whose checksum fails anywhere else is skipped and counted as corrupt.
When the spool outgrows `max_bytes`, whole oldest segments are dropped, acknowledged or not:
the dropped records are counted, reported in the next telemetry window, and show up as a
sequence gap at the listener, never as silent loss.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"EPS1"
HEADER = struct.Struct("<4sIIQ")
ACK = struct.Struct("<Q")
FSYNC_POLICIES = ("always", "interval", "never")
ACK_LOG_MAX = 64 * 1024


class SpoolError(RuntimeError):
    """The spool folder cannot be used (wrong permissions, not a spool, bad settings)."""


@dataclass(frozen=True)
class Record:
    seq: int
    topic: str
    payload: bytes


@dataclass
class _Entry:
    seq: int
    segment: int  # the segment's first seq, its file name
    offset: int
    size: int


def _encode(seq: int, topic: str, payload: bytes) -> bytes:
    t = topic.encode()
    body = struct.pack("<H", len(t)) + t + payload
    crc = zlib.crc32(ACK.pack(seq) + body)
    return HEADER.pack(MAGIC, len(body), crc, seq) + body


class Spool:
    def __init__(self, folder: Path | str, *, max_bytes: int = 64 * 1024 * 1024,
                 segment_bytes: int | None = None, fsync: str = "interval",
                 fsync_interval_s: float = 1.0) -> None:
        if fsync not in FSYNC_POLICIES:
            raise SpoolError(f"fsync policy {fsync!r} is not one of {', '.join(FSYNC_POLICIES)}")
        if max_bytes < 64 * 1024:
            raise SpoolError(f"spool size cap {max_bytes} B is below the 64 KiB minimum")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        # Several segments fit under the cap, so dropping the oldest loses a small share.
        self.segment_bytes = segment_bytes or max(16 * 1024, min(4 * 1024 * 1024,
                                                                 max_bytes // 8))
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._lock = threading.Lock()
        self._entries: deque[_Entry] = deque()  # unacknowledged and not dropped, in order
        self._segments: dict[int, int] = {}     # first seq -> bytes on disk
        self._acked_out_of_order: set[int] = set()
        self.corrupt = 0
        self.dropped = 0
        self._last_sync = time.monotonic()
        self._dirty = False
        try:
            (self.folder / "segments").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {self.folder}: {exc}") from exc
        self._open()

    # -- opening: recover state from disk ---------------------------------------------------
    def _open(self) -> None:
        state_path = self.folder / "state.json"
        state = {"next_seq": 1, "dropped": 0}
        if state_path.exists():
            try:
                state.update(json.loads(state_path.read_text()))
            except (OSError, ValueError) as exc:
                raise SpoolError(f"{state_path} is not a spool state file: {exc}") from exc
        self.dropped = int(state["dropped"])
        self.acked = self._read_ack_log()
        next_seq = max(int(state["next_seq"]), self.acked + 1)
        names = sorted(self.folder.glob("segments/*.seg"))
        for i, path in enumerate(names):
            first = int(path.stem)
            last_seg = i == len(names) - 1
            self._segments[first] = self._scan(path, first, truncate_tail=last_seg)
        if self._entries:
            next_seq = max(next_seq, max(e.seq for e in self._entries) + 1)
        self.next_seq = next_seq
        self._current = max(self._segments) if self._segments else None
        self._fh = None
        self._remove_acked_segments()

    def _scan(self, path: Path, first: int, truncate_tail: bool) -> int:
        data = path.read_bytes()
        pos, good_end = 0, 0
        while pos + HEADER.size <= len(data):
            magic, length, crc, seq = HEADER.unpack_from(data, pos)
            end = pos + HEADER.size + length
            if magic == MAGIC and end <= len(data) and \
                    zlib.crc32(ACK.pack(seq) + data[pos + HEADER.size:end]) == crc:
                if seq > self.acked:
                    self._entries.append(_Entry(seq, first, pos, end - pos))
                pos = good_end = end
                continue
            # A damaged record: resynchronise on the next magic. With no whole record after
            # it, it is a torn write at the end.
            nxt = data.find(MAGIC, pos + 1)
            if nxt < 0:
                break
            self.corrupt += 1
            pos = nxt
        if good_end < len(data):
            if truncate_tail:  # a torn write at the very end: cut it off
                with path.open("r+b") as fh:
                    fh.truncate(good_end)
            else:
                self.corrupt += 1
        return good_end

    def _read_ack_log(self) -> int:
        path = self.folder / "acked"
        if not path.exists():
            return 0
        data = path.read_bytes()
        whole = len(data) - len(data) % ACK.size
        return ACK.unpack_from(data, whole - ACK.size)[0] if whole else 0

    # -- writing ------------------------------------------------------------------------------
    def append(self, topic: str, message: dict) -> int:
        """Give `message` the next sequence number (as message["seq"]), serialise it and
        append it. Returns the sequence number."""
        with self._lock:
            seq = self.next_seq
            message["seq"] = seq
            record = _encode(seq, topic, json.dumps(message, separators=(",", ":")).encode())
            if self._current is None or self._segments[self._current] + len(record) > \
                    self.segment_bytes and self._segments[self._current] > 0:
                self._roll(seq)
            fh = self._fh or self._open_current()
            offset = self._segments[self._current]
            fh.write(record)
            fh.flush()
            self._segments[self._current] = offset + len(record)
            self._entries.append(_Entry(seq, self._current, offset, len(record)))
            self.next_seq = seq + 1
            self._dirty = True
            self._sync_if_due(fh)
            self._enforce_cap()
            return seq

    def _open_current(self):
        self._fh = (self.folder / "segments" / f"{self._current:016d}.seg").open("ab")
        return self._fh

    def _roll(self, first_seq: int) -> None:
        if self._fh is not None:
            if self.fsync != "never":
                self._sync(self._fh)
            self._fh.close()
            self._fh = None
        self._current = first_seq
        self._segments[first_seq] = 0
        self._open_current()
        if self.fsync != "never":
            _fsync_dir(self.folder / "segments")

    def _sync_if_due(self, fh) -> None:
        if self.fsync == "always" or (
                self.fsync == "interval"
                and time.monotonic() - self._last_sync >= self.fsync_interval_s):
            self._sync(fh)

    def _sync(self, fh) -> None:
        os.fsync(fh.fileno())
        self._last_sync = time.monotonic()
        self._dirty = False

    def _enforce_cap(self) -> None:
        while sum(self._segments.values()) > self.max_bytes and len(self._segments) > 1:
            oldest = min(self._segments)
            lost = 0
            while self._entries and self._entries[0].segment == oldest:
                self._entries.popleft()
                lost += 1
            self.dropped += lost
            del self._segments[oldest]
            (self.folder / "segments" / f"{oldest:016d}.seg").unlink(missing_ok=True)
            self._write_state()

    # -- acknowledging -----------------------------------------------------------------------
    def ack(self, seq: int) -> None:
        """The broker has the record `seq`. Acks may arrive out of order; the persisted mark
        only moves over a contiguous run."""
        with self._lock:
            if seq <= self.acked:
                return
            self._acked_out_of_order.add(seq)
            moved = False
            while self._entries and self._entries[0].seq in self._acked_out_of_order:
                self.acked = self._entries.popleft().seq
                moved = True
            # Acks for records the size cap dropped while in flight can never be used.
            first_pending = self._entries[0].seq if self._entries else self.next_seq
            self._acked_out_of_order = {s for s in self._acked_out_of_order
                                        if s >= first_pending}
            if moved:
                self._append_ack(self.acked)
                self._remove_acked_segments()

    def _append_ack(self, seq: int) -> None:
        path = self.folder / "acked"
        if path.exists() and path.stat().st_size >= ACK_LOG_MAX:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(ACK.pack(seq))
            os.replace(tmp, path)
            return
        with path.open("ab") as fh:
            fh.write(ACK.pack(seq))

    def _remove_acked_segments(self) -> None:
        pending = {e.segment for e in self._entries}
        removed = False
        for first in sorted(self._segments):
            if first == self._current or first in pending:
                continue
            if first <= self.acked:
                del self._segments[first]
                (self.folder / "segments" / f"{first:016d}.seg").unlink(missing_ok=True)
                removed = True
        if removed:
            self._write_state()

    def _write_state(self) -> None:
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps({"next_seq": self.next_seq, "dropped": self.dropped}))
        os.replace(tmp, self.folder / "state.json")

    # -- reading -----------------------------------------------------------------------------
    def pending(self, after: int = 0, limit: int = 100) -> list[Record]:
        """Up to `limit` unacknowledged records with seq > after, oldest first."""
        with self._lock:
            chosen = [e for e in self._entries if e.seq > after][:limit]
            if self._fh is not None:
                self._fh.flush()
            out = []
            handles: dict[int, object] = {}
            try:
                for e in chosen:
                    if e.segment not in handles:
                        path = self.folder / "segments" / f"{e.segment:016d}.seg"
                        handles[e.segment] = path.open("rb")
                    fh = handles[e.segment]
                    fh.seek(e.offset)
                    body = fh.read(e.size)[HEADER.size:]
                    (tlen,) = struct.unpack_from("<H", body)
                    out.append(Record(e.seq, body[2:2 + tlen].decode(), body[2 + tlen:]))
            finally:
                for fh in handles.values():
                    fh.close()
            return out

    @property
    def pending_count(self) -> int:
        return len(self._entries)

    @property
    def bytes_on_disk(self) -> int:
        return sum(self._segments.values())

    def stats(self) -> dict:
        with self._lock:
            return {"pending": len(self._entries), "bytes": self.bytes_on_disk,
                    "dropped": self.dropped, "corrupt": self.corrupt,
                    "next_seq": self.next_seq, "acked": self.acked,
                    "max_bytes": self.max_bytes, "fsync": self.fsync}

    def flush(self) -> None:
        with self._lock:
            if self._fh is not None and self._dirty and self.fsync != "never":
                self._sync(self._fh)

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._write_state()
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
