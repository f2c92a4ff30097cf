"""The listener's MQTT connection: a small MQTT 5 / 3.1.1 client written for throughput.

paho-mqtt reads a packet at a time (a system call for the header byte, one per length byte,
one for the rest), builds a message object and a properties object per PUBLISH, and sends
each acknowledgement on its own: about 25-55 us of CPU per message on this machine, more than
the listener's whole budget at 20,000 messages a second. This client reads whatever the
socket holds in one call, cuts PUBLISH packets out of the buffer, hands them over as
(topic, payload, packet id) tuples, and sends the PUBACKs of a committed batch in one write.

It does what a listener needs and nothing more: CONNECT with a persistent session
(clean start off, session expiry), username/password, TLS; SUBSCRIBE at QoS 1; incoming
PUBLISH at QoS 0/1 (no topic aliases: we never allow them); outgoing PUBLISH at QoS 1
(triggers, delivery acks to devices), kept until the broker's PUBACK and resent after a
reconnect; PINGREQ on keepalive; reconnects with the runtime's jittered backoff. Everything
the broker sends is length-checked before it is sliced: a broker (or whatever answers on
its port) is not trusted to be well formed.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import ssl
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from runtime.mqtt import BrokerConfig, backoff_delay

log = logging.getLogger("edgepack.subscriber")

READ_CHUNK = 1 << 20
MAX_PACKET = 2 * 1024 * 1024  # a window message is a few KiB; the protocol caps at 256 KiB
MAX_OUTGOING = 100_000  # unacknowledged publishes kept for a resend; older ones are dropped
SEND_TIMEOUT_S = 30.0
U16 = struct.Struct("!H")

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14


class ProtocolError(ConnectionError):
    """The broker sent something this client cannot read, or refused us."""


class Message(NamedTuple):  # a tuple: made for every message, cheaper than a dataclass
    topic: str
    payload: bytes
    packet_id: int  # 0 for QoS 0: nothing to acknowledge


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = divmod(n, 128)
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return U16.pack(len(raw)) + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _varint(len(body)) + body


def _read_varint(buf: bytes | bytearray | memoryview, pos: int,
                 end: int) -> tuple[int, int] | None:
    """(value, position after it), or None when the buffer ends first."""
    value, shift = 0, 0
    for i in range(4):
        if pos + i >= end:
            return None
        b = buf[pos + i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ProtocolError("a length field longer than 4 bytes")


def _skip_properties(body: bytes, pos: int, packet: str) -> int:
    """The position after an MQTT 5 properties block at `pos` (we read none of them)."""
    parsed = _read_varint(body, pos, len(body))
    if parsed is None:
        raise ProtocolError(f"a {packet} without its properties")
    plen, pos = parsed
    if pos + plen > len(body):
        raise ProtocolError(f"a {packet} whose properties overrun it")
    return pos + plen


class Subscriber:
    """One connection to the broker. Drive it from one thread: `poll()` returns the messages
    that arrived, `ack()` queues their acknowledgements, `flush()` sends them."""

    def __init__(self, cfg: BrokerConfig, client_id: str, topics: list[str], *,
                 on_connect: Callable[[bool], None] | None = None) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.topics = topics
        self.on_connect = on_connect
        self.v5 = cfg.protocol == "5"
        self.sock: socket.socket | None = None
        self.connected = False
        self.connects = 0
        self.last_error: str | None = None
        self._buf = bytearray()
        self._out = bytearray()  # bytes to send with the next flush
        self._next_id = 0
        self._outgoing: OrderedDict[int, bytes] = OrderedDict()  # id -> PUBLISH, until PUBACK
        self._last_sent = self._last_heard = 0.0
        self._attempt = 0
        self._retry_at = 0.0
        self._rng = random.Random()
        self._early: list[tuple[int, int, bytes]] = []  # packets that came before the SUBACK

    # -- connection ---------------------------------------------------------------------------
    def _open_socket(self) -> socket.socket:
        sock = socket.create_connection((self.cfg.host, self.cfg.port), timeout=10)
        if self.cfg.tls:
            ctx = ssl.create_default_context(cafile=self.cfg.ca_file)
            if self.cfg.cert_file:
                ctx.load_cert_chain(self.cfg.cert_file, self.cfg.key_file)
            sock = ctx.wrap_socket(sock, server_hostname=self.cfg.host)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _connect_packet(self) -> bytes:
        flags = 0  # clean session (3.1.1) / clean start (5) off: a persistent session
        payload = _utf8(self.client_id)
        if self.cfg.username:
            flags |= 0x80
            payload += _utf8(self.cfg.username)
            if self.cfg.password is not None:
                flags |= 0x40
                raw = self.cfg.password.encode("utf-8")
                payload += U16.pack(len(raw)) + raw
        body = _utf8("MQTT") + bytes([5 if self.v5 else 4, flags]) + U16.pack(
            self.cfg.keepalive)
        if self.v5:
            # session expiry (0x11) and receive maximum (0x21): let the broker keep as many
            # messages in flight as its own limit allows, since acks wait for a commit
            props = b"\x11" + struct.pack("!I", self.cfg.session_expiry_s) + b"\x21\xff\xff"
            body += _varint(len(props)) + props
        return _packet(CONNECT, 0, body + payload)

    def connect(self, timeout: float = 10.0) -> bool:
        """One attempt; False (with last_error set) when it failed."""
        self.close()
        try:
            sock = self._open_socket()
            sock.settimeout(timeout)
            sock.sendall(self._connect_packet())
            self.sock = sock
            self._buf.clear()
            self._early = []
            deadline = time.monotonic() + timeout
            connack = None
            while connack is None:
                if time.monotonic() > deadline:
                    raise ProtocolError("no CONNACK from the broker")
                chunk = sock.recv(65536)
                if not chunk:
                    raise ProtocolError("the broker closed the connection during CONNECT")
                self._buf += chunk
                for kind, _flags, body in self._packets():
                    if kind != CONNACK:
                        raise ProtocolError(f"expected CONNACK, got packet type {kind}")
                    connack = body
                    break
            if len(connack) < 2:
                raise ProtocolError("a CONNACK too short")
            if connack[1] != 0:
                raise ProtocolError(f"broker {self.cfg.url} refused the connection (reason "
                                    f"code {connack[1]})")
            session_present = bool(connack[0] & 1)
            sock.settimeout(SEND_TIMEOUT_S)
            self._subscribe(sock)
        except (OSError, ssl.SSLError, ProtocolError) as exc:
            self.last_error = f"cannot connect to broker {self.cfg.url}: {exc}"
            log.warning(self.last_error)
            self.close()
            return False
        self.connected = True
        self.connects += 1
        self.last_error = None
        self._attempt = 0
        self._last_sent = self._last_heard = time.monotonic()
        log.info("connected to %s as %s", self.cfg.url, self.client_id)
        # what the broker never acknowledged goes again, flagged as a duplicate
        for packet in self._outgoing.values():
            self._out += bytes([packet[0] | 0x08]) + packet[1:]
        if self.on_connect:
            self.on_connect(session_present)
        return True

    def _subscribe(self, sock: socket.socket) -> None:
        pid = self._packet_id()
        body = U16.pack(pid) + (b"\x00" if self.v5 else b"")
        for t in self.topics:
            body += _utf8(t) + b"\x01"
        sock.sendall(_packet(SUBSCRIBE, 2, body))
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while time.monotonic() < deadline:
            for kind, _flags, pbody in self._packets():
                if kind == SUBACK:
                    codes = self._suback_codes(pbody)
                    if any(c >= 0x80 for c in codes):
                        raise ProtocolError(f"the broker refused the subscription to "
                                            f"{', '.join(self.topics)} (codes {codes})")
                    return
                # messages can come before the SUBACK on a resumed session: keep them
                self._early.append((kind, _flags, pbody))
            chunk = sock.recv(READ_CHUNK)
            if not chunk:
                raise ProtocolError("the broker closed the connection during SUBSCRIBE")
            self._buf += chunk
        raise ProtocolError("no SUBACK from the broker")

    def _suback_codes(self, body: bytes) -> list[int]:
        pos = _skip_properties(body, 2, "SUBACK") if self.v5 else 2
        return list(body[pos:])

    def close(self) -> None:
        self.connected = False
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def disconnect(self) -> None:
        """A clean goodbye: the broker keeps the session and does not publish a will."""
        if self.sock is not None and self.connected:
            try:
                self.flush()
                self.sock.sendall(_packet(DISCONNECT, 0, b""))
            except (OSError, ssl.SSLError):
                pass
        self.close()

    def drop(self, why: str) -> None:
        """Close the connection without acknowledging what came in (the broker redelivers
        it to the resumed session) and reconnect after the backoff."""
        self._lost(why)

    def _lost(self, why: str) -> None:
        if self.connected:
            log.warning("lost the connection to %s: %s", self.cfg.url, why)
        self.last_error = f"connection to {self.cfg.url} lost: {why}"
        self.close()
        self._out.clear()  # PUBACKs of an uncommitted batch: the broker resends those messages
        self._retry_at = time.monotonic() + backoff_delay(
            self._attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
        self._attempt += 1

    def ensure_connected(self) -> bool:
        """Connect if it is time to try again; True when connected."""
        if self.connected:
            return True
        if time.monotonic() < self._retry_at:
            return False
        if not self.connect():
            self._retry_at = time.monotonic() + backoff_delay(
                self._attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
            self._attempt += 1
            return False
        return True

    # -- packets ------------------------------------------------------------------------------
    def _packets(self):
        """Whole packets cut from the front of the buffer: (type, flags, body)."""
        buf, pos, end = self._buf, 0, len(self._buf)
        try:
            while pos < end:
                parsed = _read_varint(buf, pos + 1, end)
                if parsed is None:
                    break
                length, start = parsed
                if length > MAX_PACKET:
                    raise ProtocolError(f"a packet of {length} bytes (at most {MAX_PACKET})")
                if start + length > end:
                    break
                head = buf[pos]
                pos = start + length
                yield head >> 4, head & 0x0F, bytes(buf[start:pos])
        finally:
            del buf[:pos]

    def _publish_in(self, flags: int, body: bytes) -> Message:
        qos = (flags >> 1) & 3
        if len(body) < 2:
            raise ProtocolError("a PUBLISH too short")
        tlen = U16.unpack_from(body)[0]
        pos = 2 + tlen
        if qos > 2 or pos + (2 if qos else 0) > len(body):
            raise ProtocolError("a malformed PUBLISH")
        topic = body[2:pos].decode("utf-8", "backslashreplace")
        pid = 0
        if qos:
            pid = U16.unpack_from(body, pos)[0]
            pos += 2
        if self.v5:
            pos = _skip_properties(body, pos, "PUBLISH")
        return Message(topic, body[pos:], pid)

    def poll(self, timeout: float, limit: int = 5000) -> list[Message]:
        """Messages that arrived within `timeout` seconds (at most about `limit`)."""
        if not self.ensure_connected():
            time.sleep(min(timeout, max(0.0, self._retry_at - time.monotonic())))
            return []
        assert self.sock is not None
        out: list[Message] = []
        try:
            if self._early:
                early, self._early = self._early, []
                for kind, flags, body in early:
                    self._handle(kind, flags, body, out)
            if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
                readable, _, _ = select.select([self.sock], [], [], timeout if not out else 0)
                if not readable:
                    self._keepalive()
                    return out
            while len(out) < limit:
                chunk = self.sock.recv(READ_CHUNK)
                if not chunk:
                    raise ConnectionError("the broker closed the connection")
                self._last_heard = time.monotonic()
                self._buf += chunk
                for kind, flags, body in self._packets():
                    self._handle(kind, flags, body, out)
                if len(chunk) < READ_CHUNK and not (isinstance(self.sock, ssl.SSLSocket)
                                                    and self.sock.pending()):
                    break
            self._keepalive()
        except (OSError, ssl.SSLError, ProtocolError, ConnectionError) as exc:
            self._lost(str(exc))
            return []  # not acknowledged: the broker delivers them again after the reconnect
        return out

    def _handle(self, kind: int, flags: int, body: bytes, out: list[Message]) -> None:
        if kind == PUBLISH:
            out.append(self._publish_in(flags, body))
        elif kind == PUBACK:
            if len(body) >= 2:
                self._outgoing.pop(U16.unpack_from(body)[0], None)
        elif kind == DISCONNECT:
            reason = body[0] if body else 0
            raise ConnectionError(f"the broker disconnected us (reason code {reason})")
        elif kind in (PINGRESP, SUBACK):
            pass
        else:
            raise ProtocolError(f"unexpected packet type {kind} from the broker")

    def _keepalive(self) -> None:
        now = time.monotonic()
        if now - self._last_heard > 1.5 * self.cfg.keepalive + 5:
            raise ConnectionError(f"nothing heard from the broker for "
                                  f"{now - self._last_heard:.0f} s")
        if now - self._last_sent > self.cfg.keepalive / 2:
            self._out += _packet(PINGREQ, 0, b"")
            self.flush()

    # -- sending ------------------------------------------------------------------------------
    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._outgoing:
                return self._next_id
        raise ProtocolError("65535 publishes in flight")

    def ack(self, packet_ids: list[int]) -> None:
        """Queue the PUBACKs of messages that are safely stored."""
        out = self._out
        for pid in packet_ids:
            if pid:
                out += b"\x40\x02" + U16.pack(pid)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """QoS 1: kept until the broker acknowledges it (resent after a reconnect); QoS 0:
        sent once, for what the receiver asks again for when it is lost."""
        if qos == 0:
            self._out += _packet(PUBLISH, 0, _utf8(topic) + (b"\x00" if self.v5 else b"")
                                 + payload)
            return
        if len(self._outgoing) >= MAX_OUTGOING:
            self._outgoing.popitem(last=False)  # the oldest: a delivery ack a device resends
        pid = self._packet_id()
        body = _utf8(topic) + U16.pack(pid) + (b"\x00" if self.v5 else b"") + payload
        packet = _packet(PUBLISH, 0x02, body)
        self._outgoing[pid] = packet
        self._out += packet

    def flush(self) -> bool:
        """Send what is queued; False when the connection is gone."""
        if not self._out:
            return True
        if self.sock is None or not self.connected:
            return False
        try:
            self.sock.sendall(self._out)
        except (OSError, ssl.SSLError) as exc:
            self._lost(str(exc))
            return False
        self._out.clear()
        self._last_sent = time.monotonic()
        return True
