"""The device's on-disk outbox and the drift statistics, on real files and real numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime import drift
from runtime.spool import HEADER, Spool, SpoolError


def _append(spool: Spool, n: int, topic: str = "t") -> list[int]:
    return [spool.append(topic, {"i": i}) for i in range(n)]


def test_sequence_numbers_order_and_acks_survive_reopen(tmp_path):
    spool = Spool(tmp_path)
    assert _append(spool, 5) == [1, 2, 3, 4, 5]
    recs = spool.pending(limit=10)
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5]
    assert json.loads(recs[2].payload) == {"i": 2, "seq": 3}
    spool.ack(2)  # out of order: nothing moves until 1 is acked
    assert spool.acked == 0
    spool.ack(1)
    assert spool.acked == 2
    spool.close()

    again = Spool(tmp_path)
    assert [r.seq for r in again.pending()] == [3, 4, 5]
    assert again.append("t", {}) == 6  # numbering continues after a restart
    for s in (3, 4, 5, 6):
        again.ack(s)
    again.close()
    # Everything acknowledged: the segments go, the counter stays.
    assert not list(tmp_path.glob("segments/*.seg"))[1:]
    last = Spool(tmp_path)
    assert last.pending() == [] and last.append("t", {}) == 7


def test_unclosed_spool_loses_nothing_appended(tmp_path):
    """A process killed without close(): records and acks written so far are all there."""
    spool = Spool(tmp_path, fsync="never")
    _append(spool, 20)
    for s in range(1, 8):
        spool.ack(s)
    del spool  # no close, no state.json rewrite
    again = Spool(tmp_path)
    assert [r.seq for r in again.pending(limit=100)] == list(range(8, 21))
    assert again.next_seq == 21


def test_torn_tail_is_cut_and_corrupt_record_is_skipped(tmp_path):
    spool = Spool(tmp_path)
    _append(spool, 3)
    spool.close()
    seg = next(tmp_path.glob("segments/*.seg"))
    data = bytearray(seg.read_bytes())
    data[HEADER.size + 3] ^= 0xFF  # flip a byte inside record 1's body
    seg.write_bytes(bytes(data) + b"EPS1\x40\x00")  # and a torn half-header at the end
    again = Spool(tmp_path)
    assert [r.seq for r in again.pending()] == [2, 3]
    assert again.corrupt == 1
    assert seg.stat().st_size == len(data)  # the torn tail was cut off
    assert again.append("t", {}) == 4


def test_size_cap_drops_oldest_and_counts_them(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=16 * 1024)
    big = "x" * 1000
    for i in range(200):
        spool.append("t", {"i": i, "pad": big})
    stats = spool.stats()
    assert stats["bytes"] <= 64 * 1024
    assert stats["dropped"] > 0
    pending = spool.pending(limit=1000)
    assert pending[-1].seq == 200
    assert stats["dropped"] + len(pending) == 200  # nothing vanished uncounted
    assert [r.seq for r in pending] == list(range(201 - len(pending), 201))  # oldest went
    spool.close()
    assert Spool(tmp_path, max_bytes=64 * 1024).dropped == stats["dropped"]


def test_listener_acks_in_ranges_out_of_order(tmp_path):
    """Two listeners ack different seqs: each range releases what it covers, the mark moves
    over the contiguous run, and what was released stays released (not pending, not read)."""
    spool = Spool(tmp_path)
    _append(spool, 10)
    assert spool.ack_ranges([(4, 5), (8, 8)]) == [4, 5, 8]  # one listener
    assert spool.acked == 0 and spool.pending_count == 7
    assert spool.stats()["pending"] == 7
    assert [r.seq for r in spool.pending(limit=100)] == [1, 2, 3, 6, 7, 9, 10]
    assert [r.seq for r in spool.pending(after=3, limit=2)] == [6, 7]
    assert [r.seq for r in spool.read([8, 9, 4, 1])] == [9, 1]
    assert spool.is_pending(1) and not spool.is_pending(4) and not spool.is_pending(11)
    assert spool.ack_ranges([(4, 5)]) == []  # a repeat releases nothing
    assert spool.ack_ranges([(1, 3), (6, 6)]) == [1, 2, 3, 6]  # the other listener
    assert spool.acked == 6 and spool.pending_count == 3
    spool.close()
    again = Spool(tmp_path)  # the persisted mark; 8 comes again (a duplicate, not a loss)
    assert [r.seq for r in again.pending()] == [7, 8, 9, 10]


def test_listener_acks_for_what_the_spool_does_not_hold_are_ignored(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=16 * 1024)
    for i in range(200):
        spool.append("t", {"i": i, "pad": "x" * 1000})
    first = spool.pending()[0].seq
    assert first > 1 and spool.dropped == first - 1
    # dropped by the size cap, never issued, and a range wider than anything: only what is
    # pending counts, and a range costs what it covers of the pending (this one is 2^63 wide)
    assert spool.ack_ranges([(1, first - 1)]) == []
    assert spool.ack_ranges([(201, 10**6), (2**62, 2**63 - 1)]) == []
    assert spool.acked == 0 and spool.pending_count == 201 - first
    assert spool.ack_ranges([(0, 2**63 - 1)]) == list(range(first, 201))
    assert spool.pending_count == 0 and spool.acked == 200 and spool.pending() == []
    assert spool.append("t", {}) == 201  # nothing issued ahead was reused


def test_broker_and_listener_acks_mix(tmp_path):
    spool = Spool(tmp_path)
    _append(spool, 4)
    spool.ack(2)
    assert spool.ack_ranges([(1, 2)]) == [1]  # 2 was released already
    assert spool.acked == 2
    spool.ack(4)
    assert spool.ack_ranges([(3, 3)]) == [3] and spool.acked == 4


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(SpoolError, match="fsync policy"):
        Spool(tmp_path, fsync="sometimes")
    with pytest.raises(SpoolError, match="64 KiB"):
        Spool(tmp_path, max_bytes=1000)


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_every_fsync_policy_round_trips(tmp_path, fsync):
    spool = Spool(tmp_path, fsync=fsync)
    _append(spool, 3)
    spool.close()
    assert [r.seq for r in Spool(tmp_path).pending()] == [1, 2, 3]


def test_psi_small_for_same_distribution_large_for_shift():
    rng = np.random.default_rng(0)
    ref = np.histogram(rng.normal(size=5000), bins=20, range=(-4, 4))[0]
    same = np.histogram(rng.normal(size=500), bins=20, range=(-4, 4))[0]
    moved = np.histogram(rng.normal(1.0, size=500), bins=20, range=(-4, 4))[0]
    p_ref = ref / ref.sum()
    assert drift.psi(p_ref, same, 5000) < 0.05
    assert drift.psi(p_ref, moved, 5000) > 0.5


def test_ks_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.2, 0.5):
        a, b = rng.normal(size=300), rng.normal(shift, size=120)
        d, p = drift.ks_2samp(a, b)
        ref = stats.ks_2samp(a, b, method="asymp")
        assert d == pytest.approx(ref.statistic, abs=1e-12)
        assert p == pytest.approx(ref.pvalue, rel=0.1, abs=1e-3)
