"""Devices for the closing-the-loop tests: Device instances in one torch-free process, each
classifying samples of an .npz (x, y) at a steady rate and reporting the true label
(`Device.feedback`) for a share of its inferences, as an application that learns the truth
later would; they take commands (reload, shadow, rollback) like any device. The inputs
change while they run: each round, the file `--switch` (when it exists) names the .npz to
read from now on, so a test can make the fleet's data drift. On SIGTERM the devices close
and a JSON summary goes to stdout:
{"devices": {id: {"version": ..., "inferences": n, "feedback": n, "feedback_refused": n}}}
(a label for an inference that the bundle a reload replaced served is refused, and the
device goes on, as an application would).
Run it with the runtime's python and the repository on PYTHONPATH."""

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
from runtime.feedback import FeedbackError
from runtime.mqtt import BrokerConfig


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as d:
        return d["x"].astype(np.float32), d["y"].astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--device-id", action="append", required=True)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--switch", type=Path, default=None)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--spools", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=20.0, help="inferences a second, per device")
    ap.add_argument("--feedback-share", type=float, default=0.5)
    ap.add_argument("--capture-rate", type=float, default=0.0)
    ap.add_argument("--capture-max-mb", type=float, default=16.0)
    ap.add_argument("--window-seconds", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cfg = BrokerConfig.from_url(args.broker, reconnect_max_s=1.0, reconnect_min_s=0.5)
    devices = [Device.open(args.bundle, device_id=d, spool_dir=args.spools / d, broker=cfg,
                           prefix=args.prefix, window_seconds=args.window_seconds,
                           window_inferences=100_000, ack_timeout_s=5.0,
                           capture_rate=args.capture_rate, capture_max_mb=args.capture_max_mb)
               for d in args.device_id]
    rng = np.random.default_rng(args.seed)
    source, (x, y) = args.inputs, _load(args.inputs)
    counts = {d: [0, 0, 0] for d in args.device_id}  # inferences, labels given, refused
    print("started", file=sys.stderr, flush=True)
    start, done = time.monotonic(), 0
    while not stop.is_set():
        if args.switch is not None and args.switch.exists():
            wanted = Path(args.switch.read_text().strip())
            if wanted != source and wanted.is_file():
                source, (x, y) = wanted, _load(wanted)
                print(f"inputs {wanted.name}", file=sys.stderr, flush=True)
        for dev, name in zip(devices, args.device_id, strict=True):
            i = int(rng.integers(len(x)))
            _, _, ids = dev.classify(x[i:i + 1], with_ids=True)
            counts[name][0] += 1
            if rng.random() < args.feedback_share:
                try:
                    dev.feedback(ids[0], int(y[i]))
                    counts[name][1] += 1
                except FeedbackError as exc:  # served by a bundle a reload replaced since:
                    counts[name][2] += 1      # an application sees this too, and goes on
                    print(f"feedback refused: {exc}", file=sys.stderr, flush=True)
        done += 1
        ahead = start + done / args.rate - time.monotonic()
        if ahead > 0:
            stop.wait(ahead)
    summary = {}
    for dev, name in zip(devices, args.device_id, strict=True):
        summary[name] = {"version": dev.info["version"], "sha256": dev.info["sha256"],
                         "inferences": counts[name][0], "feedback": counts[name][1],
                         "feedback_refused": counts[name][2]}
        dev.close(30)
    print(json.dumps({"devices": summary}), flush=True)


if __name__ == "__main__":
    main()
