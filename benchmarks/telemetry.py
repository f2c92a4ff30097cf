"""Telemetry figures, measured in one run on this machine:

1. How many messages per second one listener ingests into SQLite from a local Mosquitto
   (real window messages, default rules evaluated on each). The messages are queued at the
   broker first, for the listener's persistent session, so the figure is the listener's own
   rate, not the publisher's.
2. What telemetry adds to one inference on the serving path: the demo bundle at batch 1,
   `Model.classify` alone versus `Device.classify` with telemetry on (windows of 1000
   inferences, spool, connected broker), interleaved rounds, medians; in wall time and in
   the process's CPU time (every thread), the steadier of the two on a shared machine.

    .venv/bin/python benchmarks/telemetry.py [--bundle B.edgepack] [--messages 20000]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.device import Device  # noqa: E402
from runtime.model import load  # noqa: E402
from runtime.mqtt import BrokerConfig, Connection  # noqa: E402
from runtime.protocol import DEFAULT_PREFIX, topic  # noqa: E402
from tests.mqtt_broker import Broker  # noqa: E402  (the test suite's Mosquitto launcher)
from toolchain.fleet.listener import Listener, ListenerOptions  # noqa: E402
from toolchain.fleet.rules import DEFAULT_RULES  # noqa: E402
from toolchain.fleet.store import open_store  # noqa: E402

BIN = Path(sys.executable).parent


def demo_bundle(folder: Path) -> Path:
    proc = subprocess.run([BIN / "toolchain", "build", "--target", "smart-speaker", "--out",
                           folder, "--quiet"], capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        sys.exit(f"demo build failed:\n{proc.stderr[-2000:]}")
    return next(folder.glob("*.edgepack"))


def sample_window(bundle: Path, x: np.ndarray, folder: Path) -> dict:
    """One real window message, as the runtime spools it."""
    dev = Device.open(bundle, device_id="bench", spool_dir=folder / "spool",
                      window_inferences=len(x))
    for i in range(len(x)):
        dev.classify(x[i:i + 1])
    recs = [json.loads(r.payload) for r in dev.telemetry.spool.pending(limit=100)]
    dev.close(0)
    return next(m for m in recs if m["kind"] == "window")


def ingest_rate(broker: Broker, window: dict, n: int, devices: int, folder: Path) -> dict:
    cfg = BrokerConfig.from_url(broker.url)
    store = open_store(f"sqlite:///{folder / 'fleet.db'}")
    listener = Listener(ListenerOptions(cfg, listener_id="bench", stats_every_s=3600), store,
                        DEFAULT_RULES)
    # Subscribe once so the broker keeps a session for the listener, then go away.
    stop = threading.Event()
    subscribed = threading.Event()
    listener.on_subscribed = lambda _p: subscribed.set()
    t = threading.Thread(target=listener.run, args=(stop,))
    t.start()
    subscribed.wait(10)
    time.sleep(0.5)
    stop.set()
    t.join()

    pub = Connection(cfg, "bench-publisher", max_inflight=1000).start()
    pub.wait_connected(10)
    infos = []
    for i in range(n):
        msg = copy.deepcopy(window)
        dev = f"dev-{i % devices:04d}"
        msg["device_id"], msg["seq"] = dev, i // devices + 1
        infos.append(pub.publish(topic(DEFAULT_PREFIX, dev, "telemetry"), json.dumps(msg).encode()))
    for info in infos:
        info.wait_for_publish(60)
    pub.stop()
    size = len(json.dumps(window))

    listener = Listener(ListenerOptions(cfg, listener_id="bench", stats_every_s=3600), store,
                        DEFAULT_RULES)
    stop = threading.Event()
    t = threading.Thread(target=listener.run, args=(stop,))
    start = time.perf_counter()
    t.start()
    while listener.stats["stored"] + listener.stats["duplicates"] < n:
        time.sleep(0.01)
        if time.perf_counter() - start > 600:
            break
    seconds = time.perf_counter() - start
    stop.set()
    t.join()
    stored = store.counts()["windows"]
    store.close()
    return {"messages": n, "devices": devices, "bytes_per_message": size,
            "seconds": seconds, "per_second": n / seconds, "stored": stored}


def inference_cost(bundle: Path, broker: Broker, x: np.ndarray, rounds: int, per_round: int,
                   folder: Path) -> dict:
    """Wall time per inference, and the process's CPU time per inference (every thread:
    the drain and MQTT threads' share of telemetry too), on a busy machine the steadier
    of the two."""
    model = load(bundle)
    dev = Device.open(bundle, device_id="bench-dev", spool_dir=folder / "cost-spool",
                      broker=BrokerConfig.from_url(broker.url),
                      ack="broker")  # no listener runs here: the broker's PUBACK releases
    dev.telemetry.conn.wait_connected(10)
    samples = [x[i % len(x):i % len(x) + 1] for i in range(per_round)]

    def timed(fn) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for s in samples:
            fn(s)
        return ((time.perf_counter() - t0) / per_round * 1e6,
                (time.process_time() - c0) / per_round * 1e6)

    for fn in (model.classify, dev.classify):  # warm up both
        timed(fn)
    plain, telemetry = [], []
    for r in range(rounds):  # interleaved, the order alternating
        for fn, out in ([(model.classify, plain), (dev.classify, telemetry)] if r % 2 == 0
                        else [(dev.classify, telemetry), (model.classify, plain)]):
            out.append(timed(fn))
    stats = dev.close(30)
    model.close()
    p, t = (statistics.median(v[0] for v in plain), statistics.median(v[0] for v in telemetry))
    pc, tc = (statistics.median(v[1] for v in plain),
              statistics.median(v[1] for v in telemetry))
    return {"plain_us": p, "telemetry_us": t, "added_us": t - p, "added_pct": (t - p) / p * 100,
            "plain_cpu_us": pc, "telemetry_cpu_us": tc, "added_cpu_us": tc - pc,
            "rounds": rounds, "per_round": per_round, "drained": stats["drained"],
            "windows": (rounds + 1) * per_round // 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=None, help="default: build the demo")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=3000)
    args = parser.parse_args()
    from toolchain.build.data import load_data

    x = load_data("digits", seed=0).x_test.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bundle = args.bundle or demo_bundle(folder / "build")
        broker = Broker(folder / "broker").start()
        try:
            window = sample_window(bundle, x, folder)
            rate = ingest_rate(broker, window, args.messages, args.devices, folder)
            cost = inference_cost(bundle, broker, x, args.rounds, args.per_round, folder)
        finally:
            broker.stop()
    print("listener ingest (one process, SQLite, default rules, local Mosquitto)")
    print(f"{'messages':>9} {'devices':>8} {'bytes/msg':>10} {'seconds':>8} {'msg/s':>8} "
          f"{'stored':>7}")
    print(f"{rate['messages']:>9} {rate['devices']:>8} {rate['bytes_per_message']:>10} "
          f"{rate['seconds']:>8.2f} {rate['per_second']:>8.0f} {rate['stored']:>7}")
    print()
    print(f"per-inference cost, {bundle.name}, batch 1, median of {cost['rounds']} interleaved "
          f"rounds x {cost['per_round']} inferences")
    print(f"{'':9} {'without telemetry us':>21} {'with telemetry us':>18} {'added us':>9} "
          f"{'added %':>8}")
    print(f"{'wall':9} {cost['plain_us']:>21.2f} {cost['telemetry_us']:>18.2f} "
          f"{cost['added_us']:>9.2f} {cost['added_pct']:>7.1f}%")
    print(f"{'CPU time':9} {cost['plain_cpu_us']:>21.2f} {cost['telemetry_cpu_us']:>18.2f} "
          f"{cost['added_cpu_us']:>9.2f}")
    print(f"(telemetry on: windows of 1000 inferences, spool fsync once a second, broker "
          f"connected; spool drained at the end: {cost['drained']})")


if __name__ == "__main__":
    main()
