"""The device's on-disk outbox. Every message that must not be lost is appended here first,
with the next per-device sequence number, and leaves only when it is acknowledged: by a
listener that stored it (`ack_ranges`, the default delivery) or by the broker (`ack`, for a
fleet without our listener). Acknowledgements may come in any order; the persisted mark
moves over a contiguous run, so after a restart the records acknowledged beyond it are sent
again (a duplicate the listener's (device, seq) key absorbs, never a loss). Sequence numbers
survive restarts because they live here too.

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

Faults never stop inference: an append that the disk refuses (full, I/O error) is counted
as lost (`lost`, `write_errors`) and reported in the next window that can be written; writing
resumes when space returns. A damaged spool folder (an unreadable state or ack log, a stray
or foreign file, a segment that is not ours) still opens: the damaged pieces are moved to
`quarantine/` with a logged warning, and sequence numbers stay monotonic (with a safety
margin when the state was lost, so that no number the broker may have seen is reused).
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"EPS1"
HEADER = struct.Struct("<4sIIQ")
ACK = struct.Struct("<Q")
FSYNC_POLICIES = ("always", "interval", "never")
ACK_LOG_MAX = 64 * 1024
# Sequence numbers stay far below u64's end: a bigger one on disk is damage, not a record,
# and a spool whose (hostile) files push the next number past it writes nothing more.
MAX_SEQ = 1 << 62
# When the state file is lost, the broker may have seen numbers no file still shows.
SEQ_SAFETY_MARGIN = 1000
SEGMENT_NAME = re.compile(r"\d{16}\.seg")
QUARANTINE = "quarantine"

log = logging.getLogger("edgepack.spool")


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
        self.lost = 0          # records the disk refused (never written)
        self.write_errors = 0  # failed writes of any kind: records, acks, state, fsync
        self.last_lost_seq = 0  # the newest record the disk refused
        self.quarantined: list[Path] = []
        self._roll_next = False  # the current segment's tail may be torn: start a new one
        self._last_sync = time.monotonic()
        self._dirty = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            segments = self.folder / "segments"
            if segments.exists() and not segments.is_dir() or segments.is_symlink():
                self._quarantine(segments, "not a folder")
            segments.mkdir(exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {self.folder}: {exc}") from exc
        self._open()

    # -- opening: recover state from disk ---------------------------------------------------
    def _open(self) -> None:
        state, state_lost = self._read_state()
        self.dropped = state["dropped"]
        self.acked = self._read_ack_log()
        next_seq = max(state["next_seq"], self.acked + 1)
        names = []
        for path in sorted((self.folder / "segments").iterdir()):
            if SEGMENT_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                names.append(path)
            else:
                self._quarantine(path, "not a spool segment")
        for i, path in enumerate(names):
            first = int(path.stem)
            size = self._scan(path, first, truncate_tail=i == len(names) - 1)
            if size is not None:
                self._segments[first] = size
                next_seq = max(next_seq, first)
        if self._entries:
            next_seq = max(next_seq, self._entries[-1].seq + 1)
        if state_lost:
            next_seq += SEQ_SAFETY_MARGIN
        self.next_seq = next_seq
        self._current = max(self._segments) if self._segments else None
        self._fh = None
        self._remove_acked_segments()
        if state_lost:
            self._write_state()

    def _read_state(self) -> tuple[dict[str, int], bool]:
        """The persisted counters and whether a state file was there but unusable."""
        path = self.folder / "state.json"
        if not path.exists() and not path.is_symlink():
            return {"next_seq": 1, "dropped": 0}, False
        try:
            raw = json.loads(path.read_bytes()[:4096])
            state = {k: raw[k] for k in ("next_seq", "dropped")}
            if not all(type(v) is int for v in state.values()) or state["next_seq"] < 1 or \
                    state["dropped"] < 0:
                raise ValueError("counters out of range")
            # no number past MAX_SEQ was ever written, so none was ever sent
            return {k: min(v, MAX_SEQ) for k, v in state.items()}, False
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self._quarantine(path, f"not a spool state file ({type(exc).__name__}: {exc})")
            return {"next_seq": 1, "dropped": 0}, True

    def _quarantine(self, path: Path, why: str) -> None:
        """Move a damaged piece aside (never delete it: someone may want to look at it)."""
        folder = self.folder / QUARANTINE
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        try:
            folder.mkdir(exist_ok=True)
            dest = folder / f"{stamp}-{path.parent.name}-{path.name}"
            n = 1
            while dest.exists() or dest.is_symlink():
                dest, n = folder / f"{stamp}-{n}-{path.parent.name}-{path.name}", n + 1
            shutil.move(str(path), str(dest))
        except OSError as exc:
            log.warning("spool %s: %s is damaged (%s) and cannot be moved aside: %s",
                        self.folder, path.name, why, exc)
            return
        self.quarantined.append(dest)
        log.warning("spool %s: %s is damaged (%s); moved to %s", self.folder, path.name, why,
                    dest)

    def _scan(self, path: Path, first: int, truncate_tail: bool) -> int | None:
        """Index a segment's records; None when it is not a segment of ours (quarantined)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            self._quarantine(path, f"unreadable: {exc}")
            return None
        pos, good_end, last_seq, found = 0, 0, first - 1, []
        while pos + HEADER.size <= len(data):
            magic, length, crc, seq = HEADER.unpack_from(data, pos)
            end = pos + HEADER.size + length
            if magic == MAGIC and end <= len(data) and \
                    zlib.crc32(ACK.pack(seq) + data[pos + HEADER.size:end]) == crc and \
                    last_seq < seq < MAX_SEQ and _topic_ok(data[pos + HEADER.size:end]):
                found.append(_Entry(seq, first, pos, end - pos))
                last_seq = seq
                pos = good_end = end
                continue
            # A damaged record: resynchronise on the next magic. With no whole record after
            # it, it is a torn write at the end.
            nxt = data.find(MAGIC, pos + 1)
            if nxt < 0:
                break
            self.corrupt += 1
            pos = nxt
        if data and not found:
            # Ours hold records numbered from their name on: this one is foreign or wrecked.
            self._quarantine(path, "no whole record numbered from its name on")
            return None
        # Entries stay in seq order (acks and reads bisect them): a record numbered at or
        # below one an earlier segment holds is damage (overlapping segments), not a record.
        floor = self._entries[-1].seq if self._entries else 0
        overlapping = sum(1 for e in found if self.acked < e.seq <= floor)
        self.corrupt += overlapping
        self._entries.extend(e for e in found if e.seq > max(self.acked, floor))
        if good_end < len(data):
            if truncate_tail:  # a torn write at the very end: cut it off
                try:
                    with path.open("r+b") as fh:
                        fh.truncate(good_end)
                except OSError as exc:
                    log.warning("spool %s: cannot cut the torn tail of %s: %s", self.folder,
                                path.name, exc)
                    self._roll_next = True
            else:
                self.corrupt += 1
        return good_end

    def _read_ack_log(self) -> int:
        path = self.folder / "acked"
        if not path.exists() and not path.is_symlink():
            return 0
        try:
            data = path.read_bytes() if path.is_file() else None
            if data is None or len(data) > 4 * ACK_LOG_MAX:
                raise ValueError("not a file of a sane size")
        except (OSError, ValueError) as exc:
            self._quarantine(path, str(exc))
            return 0
        whole = len(data) - len(data) % ACK.size
        marks = [m for (m,) in ACK.iter_unpack(data[:whole])]
        if marks != sorted(marks) or (marks and marks[-1] >= MAX_SEQ):
            # Not a log we wrote: forget it; unacknowledged records are sent again.
            self._quarantine(path, "acknowledgements out of order or out of range")
            return 0
        return marks[-1] if marks else 0

    # -- writing ------------------------------------------------------------------------------
    def append(self, topic: str, message: dict) -> int:
        """Give `message` the next sequence number (as message["seq"]), serialise it and
        append it. Returns the sequence number. A write the disk refuses is counted as lost
        (the number is used up: the listener sees a gap), never raised."""
        with self._lock:
            seq = self.next_seq
            message["seq"] = seq
            record = _encode(seq, topic, json.dumps(message, separators=(",", ":")).encode())
            try:
                if seq >= MAX_SEQ:  # only hostile files get here: the number is not used up
                    raise OSError(f"sequence number {seq} is past the last one ({MAX_SEQ - 1})")
                self.next_seq = seq + 1
                if self._roll_next or self._current is None or (
                        self._segments[self._current] + len(record) > self.segment_bytes
                        and self._segments[self._current] > 0):
                    self._roll(seq)
                fh = self._fh or self._open_current()
                offset = self._segments[self._current]
                _write_all(fh, record)
            except OSError as exc:
                self.last_lost_seq = seq
                self._write_failed(exc)
                return seq
            self._segments[self._current] = offset + len(record)
            self._entries.append(_Entry(seq, self._current, offset, len(record)))
            self._dirty = True
            self._sync_if_due(fh)
            self._enforce_cap()
            return seq

    def _write_failed(self, exc: OSError) -> None:
        self.lost += 1
        self.write_errors += 1
        if self.write_errors == 1 or self.write_errors % 1000 == 0:
            log.warning("spool %s: a record could not be written (%s); %d lost so far",
                        self.folder, exc, self.lost)
        # The failed write may have left part of a record: cut it off, or start afresh.
        if self._fh is not None and self._current is not None:
            try:
                self._fh.truncate(self._segments[self._current])
            except OSError:
                self._roll_next = True
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None

    def _open_current(self):
        self._fh = (self.folder / "segments" / f"{self._current:016d}.seg").open(
            "ab", buffering=0)  # unbuffered: a refused write fails here, not at a later flush
        return self._fh

    def _roll(self, first_seq: int) -> None:
        if self._fh is not None:
            if self.fsync != "never":
                self._sync(self._fh)
            self._fh.close()
            self._fh = None
        self._open_segment(first_seq)
        self._roll_next = False
        if self.fsync != "never":
            _fsync_dir(self.folder / "segments")

    def _open_segment(self, first_seq: int) -> None:
        # a fresh name: a torn segment left behind keeps its own
        self._fh = (self.folder / "segments" / f"{first_seq:016d}.seg").open("xb", buffering=0)
        self._current = first_seq
        self._segments[first_seq] = 0

    def _sync_if_due(self, fh) -> None:
        if self.fsync == "always" or (
                self.fsync == "interval"
                and time.monotonic() - self._last_sync >= self.fsync_interval_s):
            self._sync(fh)

    def _sync(self, fh) -> None:
        try:
            os.fsync(fh.fileno())
        except OSError as exc:  # EIO: the records stay counted as written; say so
            self.write_errors += 1
            log.warning("spool %s: fsync failed: %s", self.folder, exc)
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
            _unlink(self.folder / "segments" / f"{oldest:016d}.seg")
            self._write_state()

    # -- acknowledging -----------------------------------------------------------------------
    def ack(self, seq: int) -> None:
        """The record `seq` is delivered (the broker has it). Acks may arrive out of order;
        the persisted mark only moves over a contiguous run."""
        with self._lock:
            if seq <= self.acked:
                return
            self._acked_out_of_order.add(seq)
            self._advance()

    def ack_ranges(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """A listener stored every seq in these inclusive ranges (sorted and disjoint, as
        protocol.parse_ack returns them). Returns the seqs this released, oldest first.
        Only records the spool still holds count: seqs never issued, already acknowledged
        or dropped by the size cap are ignored, and a range costs what it covers of the
        pending records, however wide it is."""
        newly: list[int] = []
        with self._lock:
            for lo, hi in ranges:
                lo = max(lo, self.acked + 1)
                if lo > hi:
                    continue
                start = bisect.bisect_left(self._entries, lo, key=_seq_of)
                for e in itertools.islice(self._entries, start, None):
                    if e.seq > hi:
                        break
                    if e.seq not in self._acked_out_of_order:
                        self._acked_out_of_order.add(e.seq)
                        newly.append(e.seq)
            if newly:
                self._advance()
        return newly

    def _advance(self) -> None:
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

    def is_pending(self, seq: int) -> bool:
        """Whether `seq` is a record the spool holds and nobody has acknowledged."""
        with self._lock:
            return self._find(seq) is not None

    def _find(self, seq: int) -> _Entry | None:
        if seq <= self.acked or seq in self._acked_out_of_order:
            return None
        i = bisect.bisect_left(self._entries, seq, key=_seq_of)
        if i < len(self._entries) and self._entries[i].seq == seq:
            return self._entries[i]
        return None

    def _append_ack(self, seq: int) -> None:
        """Persist the ack mark. If the disk refuses, the mark lives in memory: after a
        restart those records are sent again (a duplicate, never a loss)."""
        path = self.folder / "acked"
        try:
            if path.exists() and path.stat().st_size >= ACK_LOG_MAX:
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(ACK.pack(seq))
                os.replace(tmp, path)
                return
            with path.open("ab", buffering=0) as fh:
                _write_all(fh, ACK.pack(seq))
        except OSError as exc:
            self.write_errors += 1
            log.warning("spool %s: cannot record the acknowledgement of %d: %s",
                        self.folder, seq, exc)

    def _remove_acked_segments(self) -> None:
        pending = {e.segment for e in self._entries}
        removed = False
        for first in sorted(self._segments):
            if first == self._current or first in pending:
                continue
            if first <= self.acked:
                del self._segments[first]
                _unlink(self.folder / "segments" / f"{first:016d}.seg")
                removed = True
        if removed:
            self._write_state()

    def _write_state(self) -> None:
        tmp = self.folder / "state.json.tmp"
        try:
            tmp.write_text(json.dumps({"next_seq": self.next_seq, "dropped": self.dropped}))
            os.replace(tmp, self.folder / "state.json")
        except OSError as exc:  # the segments and the ack log still carry the numbers
            self.write_errors += 1
            log.warning("spool %s: cannot write state.json: %s", self.folder, exc)
            tmp.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------
    def pending(self, after: int = 0, limit: int = 100) -> list[Record]:
        """Up to `limit` unacknowledged records with seq > after, oldest first."""
        with self._lock:
            start = bisect.bisect_right(self._entries, after, key=_seq_of)
            chosen = list(itertools.islice(
                (e for e in itertools.islice(self._entries, start, None)
                 if e.seq not in self._acked_out_of_order), limit))
            return self._read(chosen)

    def read(self, seqs: Iterable[int]) -> list[Record]:
        """The records of these seqs that are still unacknowledged, in the order given (to
        send again what no listener acknowledged in time)."""
        with self._lock:
            return self._read([e for e in map(self._find, seqs) if e is not None])

    def _read(self, chosen: list[_Entry]) -> list[Record]:
        """The records of these entries, read back from their segments (lock held)."""
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
        """Records held and not yet acknowledged (the out-of-order acknowledged are held
        until the mark passes them, but are not pending)."""
        return len(self._entries) - len(self._acked_out_of_order)

    @property
    def bytes_on_disk(self) -> int:
        return sum(self._segments.values())

    def stats(self) -> dict:
        with self._lock:
            return {"pending": self.pending_count, "bytes": self.bytes_on_disk,
                    "dropped": self.dropped, "corrupt": self.corrupt, "lost": self.lost,
                    "write_errors": self.write_errors,
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
                try:
                    self._fh.close()
                except OSError:
                    pass
                self._fh = None


def _seq_of(entry: _Entry) -> int:
    return entry.seq


def _write_all(fh, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[fh.write(view):]


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _topic_ok(body: bytes) -> bool:
    if len(body) < 2:
        return False
    (tlen,) = struct.unpack_from("<H", body)
    try:
        body[2:2 + tlen].decode()
    except UnicodeDecodeError:
        return False
    return 2 + tlen <= len(body)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
