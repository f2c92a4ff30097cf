"""Simulated devices for benchmarks/fleet_sim.py: window messages built as the runtime builds
them (runtime.protocol.envelope around a runtime.window.Window body), and the publisher
process that sends them for many devices over one MQTT connection.

Ten thousand MQTT connections from Python do not fit on two cores beside a broker and a
listener, so one publisher process speaks for many devices over one connection
(benchmarks/fleet_sim_mqtt.py): each device still has its own topic
`<prefix>/<device>/telemetry` and its own increasing seq, as a real one would.

    python benchmarks/fleet_sim_devices.py CONFIG.json     (started by fleet_sim.py)

Its stdin takes `go`, `allow N` (publish at most N messages in all: the --max mode's
backlog cap) and `stop`; its stdout says `ready`, `sent N acked M` every half second and,
last, `result {json}`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.fleet_sim_mqtt import PahoPublisher, RawPublisher  # noqa: E402
from runtime import protocol  # noqa: E402
from runtime.mqtt import BrokerConfig  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# JSON integers that stand in for the fields each message varies; replaced by %-format fields
_SENTINELS = {"seq": (987654321001, "%(seq)d"), "wall": (987654321002, "%(wall).6f"),
              "mono": (987654321003, "%(mono).6f"), "start_wall": (987654321004,
                                                                  "%(start_wall).6f"),
              "start_mono": (987654321005, "%(start_mono).6f"),
              "index": (987654321006, "%(index)d")}
SIM_BUNDLE = {"sha256": hashlib.sha256(b"edgepack fleet_sim").hexdigest(), "model": "kws-sim",
              "version": "1.0.0", "profile": "smart-speaker", "backend": "litert",
              "precision": "int8"}
PROFILE = REPO / "hardware-profiles" / "smart-speaker.toml"
BATCH = 200  # messages written per send at most


def proc_cpu_s(pid: int | str = "self") -> float | None:
    """CPU seconds (user + system) a process has used, from /proc/<pid>/stat; None once it
    is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15


def window_bodies(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` window bodies as Telemetry._emit_locked builds them: a Window against reference
    distributions of the built-in digits, fed 100-1000 inferences of real digit images with
    random logits and latencies, closed; then the budgets and spool fields the device adds."""
    import numpy as np

    from runtime import preprocess
    from runtime.window import Window
    from toolchain.build.data import load_data
    from toolchain.build.package import reference_distributions

    rng = np.random.default_rng(seed)
    x = load_data("digits", seed=0).x_test.astype(np.float32)
    labels = [str(i) for i in range(10)]
    reference = reference_distributions(x, rng.normal(0, 3, (len(x), 10)), labels, "digits")
    budgets = {k: float(v) for k, v in
               tomllib.loads(PROFILE.read_text()).get("budgets", {}).items()}
    bodies = []
    for _ in range(n):
        window = Window(reference, len(labels))
        count = int(rng.integers(100, 1001))
        idx = rng.integers(0, len(x), count)
        probs = preprocess.softmax(rng.normal(0, 3, (count, len(labels))))
        for j in range(0, count, 16):  # batches of 16: a latency spread without 1000 calls
            ids = probs[j:j + 16].argmax(-1)
            window.record(x[idx[j:j + 16]], ids, probs[j:j + 16].max(-1),
                          float(rng.gamma(4.0, 0.0012)) * len(ids))
        for _ in range(int(rng.poisson(count * 0.002))):
            window.record_error("invoke")
        body = window.close()
        body["budgets"] = budgets
        body["spool"] = {"pending": 0, "bytes": 0, "dropped_total": 0, "dropped_since_last": 0,
                         "corrupt": 0, "lost_total": 0, "lost_since_last": 0,
                         "write_errors": 0}
        bodies.append(body)
    return bodies


def device_template(device_id: str, body: dict[str, Any], window_s: float) -> str:
    """One device's window message as a %-format string: seq, the publish times and the
    window's index are filled in per message (`render`)."""
    body = json.loads(json.dumps(body))
    w = body["window"]
    w["index"] = _SENTINELS["index"][0]
    w["start_wall"], w["end_wall"] = _SENTINELS["start_wall"][0], _SENTINELS["wall"][0]
    w["start_mono"], w["end_mono"] = _SENTINELS["start_mono"][0], _SENTINELS["mono"][0]
    w["duration_s"] = window_s
    body["throughput_per_s"] = round(body["count"] / window_s, 3)
    msg = protocol.envelope("window", device_id, SIM_BUNDLE, body,
                            boot=str(uuid.uuid4()), seq=_SENTINELS["seq"][0])
    msg["time"]["wall"], msg["time"]["mono"] = _SENTINELS["wall"][0], _SENTINELS["mono"][0]
    text = json.dumps(msg, separators=(",", ":")).replace("%", "%%")  # as the spool does
    for value, field in _SENTINELS.values():
        text = text.replace(str(value), field)
    return text


def render(template: str, seq: int, wall: float, mono: float, window_s: float) -> bytes:
    return (template % {"seq": seq, "wall": wall, "mono": mono, "start_wall": wall - window_s,
                        "start_mono": mono - window_s, "index": seq - 1}).encode()


class Publisher:
    """Many devices, one connection; devices take turns, so each publishes every
    len(devices) / rate seconds."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        bodies = json.loads(Path(cfg["bodies_file"]).read_text())
        self.devices: list[str] = cfg["devices"]
        self.topics = [protocol.topic(cfg["prefix"], d, "telemetry") for d in self.devices]
        self.templates = [device_template(d, bodies[i % len(bodies)], cfg["window_s"])
                          for d, i in zip(self.devices, cfg["body_index"], strict=True)]
        for t, tpl in zip(self.topics, self.templates, strict=True):  # the listener's check
            protocol.validate(t, render(tpl, 1, time.time(), 1.0, cfg["window_s"]),
                              cfg["prefix"])
        self.sent = 0
        self.allowed = 0 if cfg["rate"] is None else sys.maxsize
        self.go = threading.Event()
        self.stop = threading.Event()
        broker = BrokerConfig.from_url(cfg["broker"])
        self.mqtt = (PahoPublisher(cfg["broker"], cfg["client_id"], cfg["inflight"])
                     if cfg["client"] == "paho" else
                     RawPublisher(broker.host, broker.port, cfg["client_id"]))

    def _commands(self) -> None:
        for line in sys.stdin:
            word, _, arg = line.strip().partition(" ")
            if word == "go":
                self.go.set()
            elif word == "allow":
                self.allowed = int(arg)
            elif word == "stop":
                self.stop.set()
        self.stop.set()  # stdin closed: the orchestrator is gone
        self.go.set()

    def run(self) -> dict[str, Any]:
        cfg, mqtt = self.cfg, self.mqtt
        threading.Thread(target=self._commands, daemon=True).start()
        print("ready", flush=True)
        self.go.wait()
        cpu_go, t_go = proc_cpu_s(), time.time()
        start = time.monotonic()
        rate, duration, window_s = cfg["rate"], cfg["duration_s"], cfg["window_s"]
        total = round(rate * duration) if rate is not None else sys.maxsize
        n_dev, next_report = len(self.devices), start + 0.5
        while not self.stop.is_set() and self.sent < total:
            if mqtt.error:
                raise SystemExit(f"publisher {cfg['client_id']}: {mqtt.error}")
            now = time.monotonic()
            if now >= next_report:
                next_report += 0.5
                print(f"sent {self.sent} acked {mqtt.acked}", flush=True)
            if rate is None and now - start >= duration:
                break  # paced: every one of rate x duration messages goes out, even if late
            due = min(total, int((now - start) * rate) + 1) if rate is not None else total
            # the backlog cap (--max), at most `inflight` unacknowledged, and batches of
            # BATCH so that time.wall stays close to the moment a message leaves
            n = min(due, self.allowed, mqtt.acked + cfg["inflight"],
                    self.sent + BATCH) - self.sent
            if n <= 0:
                time.sleep(0.001)
                continue
            for _ in range(n):
                j, seq = self.sent % n_dev, self.sent // n_dev + 1
                mqtt.publish(self.topics[j], render(self.templates[j], seq, time.time(),
                                                    time.monotonic(), window_s))
                self.sent += 1
            mqtt.flush()
        t_sent = time.time()
        deadline = time.monotonic() + 60
        while mqtt.acked < self.sent and time.monotonic() < deadline and not mqtt.error:
            time.sleep(0.01)
        cpu_end = proc_cpu_s()
        mqtt.close()
        if mqtt.error:
            raise SystemExit(f"publisher {cfg['client_id']}: {mqtt.error}")
        last_seq = [self.sent // n_dev + (1 if j < self.sent % n_dev else 0)
                    for j in range(n_dev)]
        return {"published": self.sent, "acked": mqtt.acked, "t_go": t_go, "t_sent": t_sent,
                "cpu_s": (cpu_end or 0.0) - (cpu_go or 0.0),
                "last_seq": dict(zip(self.devices, last_seq, strict=True))}


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = Publisher(cfg).run()
    except OSError as exc:  # ConnectionError included: one line for the orchestrator
        raise SystemExit(f"publisher {cfg['client_id']}: {exc}") from None
    print("result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
