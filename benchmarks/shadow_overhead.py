"""What a shadow run costs the served answer, measured in one run on this machine.

The demo bundle serves at batch 1 through `Device.classify` (telemetry on, spool, no broker)
while a candidate (a second copy of the same bundle, so both do the same work) runs in
shadow on a share of the inputs with a CPU budget (`reload` with mode "shadow"). Rounds of
shadow off and shadow on alternate; per round, the median and p99 of the served call's wall
time and the candidate's runs. The served path only copies the sampled input into a
bounded queue; what it pays beyond that is the candidate thread's share of the cores (and
Python's GIL, which the backends release while they run).

    .venv/bin/python benchmarks/shadow_overhead.py [--bundle B.edgepack] [--runs 3000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.telemetry import demo_bundle  # noqa: E402
from runtime.device import Device  # noqa: E402


def served_round(dev: Device, x: np.ndarray, runs: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for i in range(runs):
        t0 = clock()
        dev.classify(x[i % len(x)][None])
        out.append(clock() - t0)
    return out


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=3000, help="served calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sample", type=float, default=0.25)
    ap.add_argument("--cpu-share", type=float, default=0.25)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bundle = args.bundle or demo_bundle(folder / "build")
        candidate = folder / "candidate.edgepack"
        shutil.copyfile(bundle, candidate)
        from toolchain.build.data import load_data

        x = load_data("digits", seed=0).x_test
        dev = Device.open(bundle, device_id="bench", spool_dir=folder / "spool",
                          window_seconds=3600, window_inferences=100_000)
        served_round(dev, x, 500)  # warm up
        rows: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        shadow_runs = []
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                if mode == "on":
                    dev.handle_command({"command": "reload", "args": {
                        "bundle": str(candidate), "mode": "shadow", "sample": args.sample,
                        "cpu_share": args.cpu_share}})
                lat = served_round(dev, x, args.runs)
                rows[mode].append((p(lat, 50), p(lat, 99)))
                if mode == "on":
                    totals = dev.handle_command({"command": "shadow_stop",
                                                 "args": {}})["totals"]
                    shadow_runs.append((totals["count"], totals["dropped"]))
        dev.close(0)
    print(f"bundle {bundle.name}, {args.runs} served calls per round, {args.rounds} rounds "
          f"each, interleaved; shadow: sample {args.sample:g}, cpu_share {args.cpu_share:g}")
    print(f"{'shadow':<8} {'p50 us (median of rounds)':>26} {'p99 us':>10}  per-round p50s")
    for mode in ("off", "on"):
        p50s = [r[0] for r in rows[mode]]
        p99s = [r[1] for r in rows[mode]]
        print(f"{mode:<8} {statistics.median(p50s):>26.1f} {statistics.median(p99s):>10.1f}  "
              + ", ".join(f"{v:.1f}" for v in p50s))
    ratio = statistics.median([on[0] / off[0] for on, off in zip(rows["on"], rows["off"],
                                                                  strict=True)])
    print(f"served p50 with the shadow on / off, median of the rounds' ratios: {ratio:.3f}")
    runs = ", ".join(f"{c} run + {d} dropped" for c, d in shadow_runs)
    print(f"candidate per round: {runs} (of {args.runs * args.sample:.0f} sampled)")


if __name__ == "__main__":
    main()
