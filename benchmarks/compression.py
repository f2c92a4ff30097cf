"""Compression, side by side: for the demo and each architecture in the model zoo, build
three bundles for a target from the same trained model (same seed):

  fp32      the model as trained, exported to the target's backend
  ptq-int8  plain post-training int8 of that model (what the converter alone gives)
  pipeline  our full pipeline (the profile's pruning, distillation, quantization)

then time all three bundles back to back, interleaved over several rounds, in fresh
torch-free runtime processes with the profile's thread count, and print one table.

    .venv/bin/python benchmarks/compression.py [--target smart-speaker] [--models demo,residual]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from toolchain.build.model_zoo import ARCHITECTURES
from toolchain.build.pipeline import BuildOptions, build
from toolchain.progress import Progress

BIN = Path(sys.executable).parent
VARIANTS = {
    "fp32": ("quantize.precision=fp32", "prune.enabled=false", "distill.enabled=false"),
    "ptq-int8": ("quantize.precision=int8", "prune.enabled=false", "distill.enabled=false",
                 "quantize.fallback=false"),
    "pipeline": (),
}


def bench_p50(bundle: str, runs: int) -> float:
    proc = subprocess.run([BIN / "edge-runtime", "bench", bundle, "--runs", str(runs),
                           "--warmup", "50", "--json"], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout)["latency_ms"]["p50"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="smart-speaker")
    parser.add_argument("--models", default=",".join(["demo", *[a for a in ARCHITECTURES
                                                                if a != "plain-cnn"]]))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            ref = None if name == "demo" else f"toolchain.build.model_zoo:{name.replace('-', '_')}"
            built = {}
            for variant, overrides in VARIANTS.items():
                print(f"building {name} {variant} ...", file=sys.stderr, flush=True)
                opts = BuildOptions(target=args.target, model=ref, out_dir=Path(tmp) / name /
                                    variant, overrides=overrides, bench_runs=50)
                built[variant] = build(opts, Progress(quiet=True))
            p50s: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):  # interleaved: load drifts hit all three alike
                for variant, report in built.items():
                    p50s[variant].append(bench_p50(report["bundle"], args.runs))
            for variant, report in built.items():
                fin = report["final"]
                rows.append((name, variant, report["precision"], fin["accuracy"],
                             fin["size_bytes"], fin["macs"], statistics.median(p50s[variant])))
    print_table(rows, args.target)


def print_table(rows: list[tuple], target: str) -> None:
    header = ("model", "variant", "prec", "test acc", "size KiB", "MACs M", "p50 ms",
              "vs fp32 size", "vs fp32 speed", "vs best(fp32,ptq) speed")
    lines = [header]
    by_model: dict[str, dict[str, tuple]] = {}
    for r in rows:
        by_model.setdefault(r[0], {})[r[1]] = r
    for model, variants in by_model.items():
        fp32, ptq = variants["fp32"], variants["ptq-int8"]
        best_baseline = min(fp32[6], ptq[6])
        for r in variants.values():
            lines.append((model, r[1], r[2], f"{r[3]:.2%}", f"{r[4] / 1024:.1f}",
                          f"{r[5] / 1e6:.2f}", f"{r[6]:.4f}", f"{fp32[4] / r[4]:.1f}x",
                          f"{fp32[6] / r[6]:.2f}x", f"{best_baseline / r[6]:.2f}x"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
    print(f"target {target}; latency: median over rounds of the p50 of edge-runtime bench "
          "(batch 1, profile threads), measured on this host")


if __name__ == "__main__":
    main()
