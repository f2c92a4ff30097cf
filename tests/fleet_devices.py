"""Many devices in one process, for the fleet tests: N `Device` instances on one bundle,
each with its own spool and broker connection, classifying recorded inputs round-robin at
a steady total rate until SIGTERM; then every window is flushed, every device closed (the
spools drained as far as `--drain-timeout` allows) and a JSON summary printed on stdout:
{device_id: {"window_seqs": [...], "next_seq": n, "pending": n, "drained": bool, ...}}.
Run it with the torch-free runtime's python (the repository on PYTHONPATH); cheaper on two
cores than N `edge-runtime replay` processes."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from runtime.device import Device
from runtime.mqtt import BrokerConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--spools", type=Path, required=True)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rate", type=float, default=100.0, help="inferences a second, in all")
    ap.add_argument("--window-inferences", type=int, default=10)
    ap.add_argument("--ack", default="listener")
    ap.add_argument("--ack-timeout", type=float, default=30.0)
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    args = ap.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with np.load(args.inputs) as d:
        x = d["x"]
    cfg = BrokerConfig.from_url(args.broker, reconnect_max_s=1.0, reconnect_min_s=0.5)
    devices = [Device.open(args.bundle, device_id=f"dev-{i:02d}", spool_dir=args.spools / str(i),
                           broker=cfg, prefix=args.prefix, window_seconds=3600,
                           window_inferences=args.window_inferences, ack=args.ack,
                           ack_timeout_s=args.ack_timeout)
               for i in range(args.devices)]
    print("started", file=sys.stderr, flush=True)
    start, done = time.monotonic(), 0
    while not stop.is_set():
        dev = devices[done % len(devices)]
        i = (done // len(devices)) % len(x)
        dev.classify(x[i:i + 1])
        done += 1
        ahead = start + done / args.rate - time.monotonic()
        if ahead > 0:
            stop.wait(ahead)
    for dev in devices:
        assert dev.telemetry is not None
        dev.telemetry.flush()
    summary: dict[str, dict] = {}

    def close(dev: Device) -> None:
        tel = dev.telemetry
        assert tel is not None
        seqs = list(tel.window_seqs)
        stats = dev.close(args.drain_timeout) or {}
        summary[tel.opts.device_id] = {"window_seqs": seqs, **stats}

    threads = [threading.Thread(target=close, args=(dev,)) for dev in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"inferences": done, "devices": summary}), flush=True)


if __name__ == "__main__":
    main()
