"""End-to-end acknowledgements from a listener to the devices: the seqs a committed batch
put in the store (stored, found there already, or kept in the dead letters), grouped per
device into the ack messages of runtime.protocol. Publish them only after the commit, not
retained, at QoS 0: a lost one costs a resend from the device's spool."""

from __future__ import annotations

from runtime import protocol


class AckBatch:
    def __init__(self) -> None:
        self._seqs: dict[str, set[int]] = {}

    def add(self, device_id: str, seq: int) -> None:
        self._seqs.setdefault(device_id, set()).add(seq)

    def merge(self, other: AckBatch) -> None:
        for device, seqs in other._seqs.items():
            self._seqs.setdefault(device, set()).update(seqs)

    def items(self) -> list[tuple[str, int]]:
        """Every (device, seq), in device then seq order."""
        return [(d, s) for d, seqs in self._seqs.items() for s in sorted(seqs)]

    def __len__(self) -> int:
        return sum(len(s) for s in self._seqs.values())

    def messages(self, prefix: str, listener_id: str) -> list[tuple[str, bytes]]:
        """(topic, payload) pairs: one or more per device (MAX_ACK_RANGES ranges each)."""
        return [(protocol.topic(prefix, device, protocol.ACKS), payload)
                for device, seqs in self._seqs.items()
                for payload in protocol.ack_payloads(protocol.seq_ranges(seqs), listener_id)]
