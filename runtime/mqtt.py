"""One MQTT connection, shared by the device runtime and the cloud listener: broker URLs,
TLS and credentials, MQTT 5 session expiry (3.1.1 selectable), and a network thread of our
own that reconnects with jittered, capped exponential backoff (paho's own loop does not
jitter, and a fleet that lost its broker must not come back all in the same second)."""

from __future__ import annotations

import logging
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("edgepack.mqtt")

SCHEMES = {"mqtt": (False, 1883), "tcp": (False, 1883), "mqtts": (True, 8883),
           "ssl": (True, 8883)}
PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


class BrokerConfigError(ValueError):
    """A broker address or TLS/credential option that cannot work."""


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    protocol: str = "5"
    keepalive: int = 30
    session_expiry_s: int = 24 * 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> BrokerConfig:
        """`mqtt://[user[:pass]@]host[:port]` or `mqtts://...` (TLS); options override."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise BrokerConfigError(
                f"broker {url!r} is not a broker URL: use mqtt://host[:port] or "
                f"mqtts://host[:port] (TLS), optionally with user:password@")
        tls, default_port = SCHEMES[parts.scheme]
        try:
            port = parts.port or default_port
        except ValueError as exc:
            raise BrokerConfigError(f"broker {url!r}: {exc}") from exc
        cfg = cls(host=parts.hostname, port=port, tls=tls,
                  username=unquote(parts.username) if parts.username else None,
                  password=unquote(parts.password) if parts.password else None)
        given = {k: v for k, v in options.items() if v is not None}
        cfg = replace(cfg, **given)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise BrokerConfigError(f"MQTT protocol {self.protocol!r} is not one of "
                                    f"{', '.join(PROTOCOLS)}")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise BrokerConfigError("TLS files were given for a plain mqtt:// broker; "
                                    "use mqtts://")
        if bool(self.cert_file) != bool(self.key_file):
            raise BrokerConfigError("a client certificate needs both --tls-cert and --tls-key")
        if self.password and not self.username:
            raise BrokerConfigError("a password was given without a username")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise BrokerConfigError("reconnect delays need 0 < min <= max")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Exponential backoff capped at `high`, with "equal jitter": half fixed, half random,
    so reconnecting clients spread out but none retries sooner than half its step."""
    step = min(high, low * (2 ** min(attempt, 30)))
    return step / 2 + rng.uniform(0, step / 2)


class Connection:
    """A paho client driven by our own network thread. `on_connect(session_present)` runs on
    every successful (re)connect, `on_message(message)` for every message. QoS 1 messages
    handed to `publish` while the broker is away stay queued in paho and go out, in order,
    after the reconnect."""

    def __init__(self, cfg: BrokerConfig, client_id: str, *,
                 on_connect: Callable[[bool], None] | None = None,
                 on_message: Callable[[paho.MQTTMessage], None] | None = None,
                 on_publish: Callable[[int], None] | None = None,
                 will: tuple[str, bytes] | None = None,
                 manual_ack: bool = False, max_inflight: int = 50) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self._on_connect_cb = on_connect
        self._on_publish_cb = on_publish
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.connects = 0
        self._stop = threading.Event()
        self._closing = False
        self._rng = random.Random()
        v5 = cfg.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=PROTOCOLS[cfg.protocol],
            clean_session=None if v5 else False,  # 3.1.1: a persistent session
            manual_ack=manual_ack,
        )
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        if on_message:
            client.on_message = lambda _c, _u, msg: on_message(msg)
        if on_publish:
            client.on_publish = lambda _c, _u, mid, _rc, _p: on_publish(mid)
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive,
                             clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                             properties=props)
        self.client = client
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{client_id}", daemon=True)

    # -- callbacks (network thread) -------------------------------------------------------
    def _handle_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self.last_error = f"broker {self.cfg.url} refused the connection: {reason}"
            log.error(self.last_error)
            return
        self.last_error = None
        self.connects += 1
        self.connected.set()
        log.info("connected to %s as %s", self.cfg.url, self.client_id)
        if self._on_connect_cb:
            self._on_connect_cb(bool(_flags.session_present))

    def _handle_disconnect(self, *_args: Any) -> None:
        if self.connected.is_set() and not self._closing:
            log.warning("lost the connection to %s", self.cfg.url)
        self.connected.clear()

    def _run(self) -> None:
        attempt = 0
        while not (self._stop.is_set() or self._closing):
            connects_before = self.connects
            try:
                self.client.reconnect()
            except (OSError, ssl.SSLError) as exc:
                self.last_error = f"cannot reach broker {self.cfg.url}: {exc}"
                log.warning(self.last_error)
            else:
                while not self._stop.is_set():
                    if self.client.loop(timeout=0.2) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
                self.connected.clear()
            if self.connects > connects_before:
                attempt = 0  # the broker was back: start the backoff again from the bottom
            if self._stop.is_set() or self._closing:
                break
            delay = backoff_delay(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s,
                                  self._rng)
            attempt += 1
            self._stop.wait(delay)

    # -- API ------------------------------------------------------------------------------
    def start(self) -> Connection:
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None) -> paho.MQTTMessageInfo:
        """`expiry_s`: MQTT 5's message expiry (the broker drops the message if it has not
        delivered it by then); ignored on MQTT 3.1.1, which has none."""
        props = None
        if expiry_s is not None and self.cfg.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry_s)
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        self.client.subscribe([(t, qos) for t in topics])

    def ack(self, mid: int, qos: int) -> None:
        self.client.ack(mid, qos)

    def stop(self, *, disconnect: bool = True, timeout: float = 5.0) -> None:
        """Stop the network thread. `disconnect=False` drops the socket without a DISCONNECT,
        as a crash would (the broker then publishes the last will)."""
        self._closing = True
        if disconnect and self.connected.is_set() and self._thread.is_alive():
            self.client.disconnect()  # the network thread sends it, then its loop ends
            self._thread.join(timeout)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        sock = self.client.socket()
        if sock is not None:
            sock.close()
