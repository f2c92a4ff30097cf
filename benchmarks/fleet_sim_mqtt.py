"""How the simulator's publishers talk to the broker. Two ways, the same interface:

- `RawPublisher` (the default): a minimal MQTT 5 client that only publishes at QoS 1 over
  one socket, writing a batch of PUBLISH packets per send and counting PUBACKs on a reader
  thread. paho spends tens of microseconds of Python per QoS 1 message (a measured ~80 us
  on a loaded 2-core machine): at 20,000 messages/s that alone would take most of a core
  from the listener being measured. No reconnect, no TLS: a benchmark's tool, and a broker
  that refuses or drops the connection ends the run with the reason.
- `PahoPublisher`: the runtime's own runtime.mqtt.Connection (paho), as a device publishes.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

CONNECT, CONNACK, PUBLISH_QOS1, PUBACK, PINGRESP, DISCONNECT = 0x10, 0x20, 0x32, 0x40, 0xD0, 0xE0


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


class RawPublisher:
    def __init__(self, host: str, port: int, client_id: str, timeout: float = 10.0) -> None:
        self.acked = 0  # PUBACKs, counted by the reader thread
        self.failed = 0  # PUBACKs with a reason code >= 0x80: the broker refused the message
        self.error: str | None = None
        self._mid = 0
        self._closing = False
        self._buf = bytearray()
        self._topics: dict[str, bytes] = {}
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # protocol name, version 5, clean start, keepalive 0 (none), no properties
        header = _string("MQTT") + bytes([5, 0x02]) + (0).to_bytes(2, "big") + b"\x00"
        body = header + _string(client_id)
        self.sock.sendall(bytes([CONNECT]) + varint(len(body)) + body)
        kind, packet = self._read_packet()
        if kind != CONNACK or len(packet) < 2 or packet[1] != 0:
            reason = f"reason code {packet[1]:#x}" if len(packet) >= 2 else "no CONNACK"
            raise ConnectionError(f"broker {host}:{port} refused the connection: {reason}")
        self.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            data += chunk
        return data

    def _read_packet(self) -> tuple[int, bytes]:
        kind = self._read_exact(1)[0] & 0xF0
        length, shift = 0, 0
        while True:
            b = self._read_exact(1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return kind, self._read_exact(length)

    def _read_loop(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    if not self._closing:
                        self.error = self.error or "the broker closed the connection"
                    return
                buf += data
                pos = 0
                while pos + 2 <= len(buf):
                    kind, length, i, shift = buf[pos] & 0xF0, 0, pos + 1, 0
                    while i < len(buf):
                        b = buf[i]
                        length |= (b & 0x7F) << shift
                        shift += 7
                        i += 1
                        if not b & 0x80:
                            break
                    else:
                        break  # the length itself is not all here yet
                    if i + length > len(buf):
                        break
                    self._handle(kind, buf[i:i + length])
                    pos = i + length
                buf = buf[pos:]
        except OSError as exc:
            if not self._closing:
                self.error = self.error or f"connection lost: {exc}"

    def _handle(self, kind: int, packet: bytes) -> None:
        if kind == PUBACK:
            self.acked += 1
            if len(packet) >= 3 and packet[2] >= 0x80:
                self.failed += 1
                self.error = f"the broker refused a message: PUBACK reason {packet[2]:#x}"
        elif kind == DISCONNECT:
            self.error = (f"the broker disconnected: reason "
                          f"{packet[0] if packet else 0:#x}")

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue one QoS 1 PUBLISH; `flush` sends what is queued."""
        field = self._topics.get(topic)
        if field is None:
            field = self._topics[topic] = _string(topic)
        self._mid = self._mid % 0xFFFF + 1
        # topic, packet id, properties length 0, payload
        self._buf += (bytes([PUBLISH_QOS1]) + varint(len(field) + 3 + len(payload)) + field
                      + self._mid.to_bytes(2, "big") + b"\x00")
        self._buf += payload

    def flush(self) -> None:
        if self._buf:
            self.sock.sendall(self._buf)
            self._buf.clear()

    def close(self) -> None:
        self._closing = True
        try:
            self.flush()
            self.sock.sendall(bytes([DISCONNECT, 0]))
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(5)
        self.sock.close()


class PahoPublisher:
    """runtime.mqtt.Connection, as the device uses it."""

    def __init__(self, url: str, client_id: str, inflight: int) -> None:
        from runtime.mqtt import BrokerConfig, Connection

        self.acked = 0
        self.failed = 0
        self.error: str | None = None
        self.conn = Connection(BrokerConfig.from_url(url), client_id, on_publish=self._acked,
                               max_inflight=inflight).start()
        if not self.conn.wait_connected(30):
            raise ConnectionError(f"no connection to {url}: {self.conn.last_error}")

    def _acked(self, _mid: Any) -> None:
        self.acked += 1

    def publish(self, topic: str, payload: bytes) -> None:
        self.conn.publish(topic, payload)

    def flush(self) -> None:
        pass  # paho writes as it publishes

    def close(self) -> None:
        self.conn.stop()
