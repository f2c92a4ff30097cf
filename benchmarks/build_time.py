"""Time the smartphone build of torchvision's resnet18 at a real size: 3x64x64 inputs, 1,200
samples (scikit-learn's digits upsampled to 64x64 and repeated over three channels), 2 training
epochs, the profile's default compression (pruning with distillation fine-tuning, LiteRT int8).
Prints the time of each stage from the build's report, and the total.

    PYTHONPATH=. .venv/bin/python benchmarks/build_time.py [--epochs 2] [--profile out.prof]

This file is also the model factory the build takes (`benchmarks/build_time.py:resnet18`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

SAMPLES = 1200
SIDE = 64


def resnet18(num_classes: int = 10) -> Any:
    from toolchain.build.torchvision_compat import import_torchvision

    return import_torchvision().models.resnet18(num_classes=num_classes)


def write_data(path: Path, samples: int = SAMPLES, side: int = SIDE) -> Path:
    """Digits (8x8) upsampled by pixel repetition to side x side, three channels."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images[:samples].astype(np.float32) / 16.0
    x = np.kron(x, np.ones((side // 8, side // 8), np.float32))
    x = np.repeat(x[:, None], 3, axis=1)
    np.savez(path, x=np.ascontiguousarray(x), y=digits.target[:samples].astype(np.int64))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--target", default="smartphone")
    parser.add_argument("--bench-runs", type=int, default=200)
    parser.add_argument("--profile", type=Path, default=None,
                        help="write a cProfile of the build to this file")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from click.testing import CliRunner

    from toolchain.cli import cli

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_data(work / "digits64.npz")
        cmd = ["build", "--target", args.target, "--model", f"{__file__}:resnet18",
               "--data", str(data), "--epochs", str(args.epochs), "--bench-runs",
               str(args.bench_runs), "--out", str(work / "out"), "--json",
               str(work / "r.json"), *[a for s in args.overrides for a in ("--set", s)]]
        start = time.perf_counter()
        if args.profile:
            import cProfile

            with cProfile.Profile() as prof:
                result = CliRunner().invoke(cli, cmd)
            prof.dump_stats(args.profile)
        else:
            result = CliRunner().invoke(cli, cmd)
        wall = time.perf_counter() - start
        if result.exit_code not in (0, 3):
            raise SystemExit(f"build failed (exit {result.exit_code}):\n{result.output[-3000:]}"
                             f"\n{result.exception!r}")
        report = json.loads((work / "r.json").read_text())
    print(f"resnet18, 3x{SIDE}x{SIDE}, {SAMPLES} samples, --target {args.target}, "
          f"--epochs {args.epochs}: exit {result.exit_code}")
    print(f"{'stage':<12}{'seconds':>9}  {'accuracy':>9}  {'params':>10}  {'MACs':>12}")
    for s in report["stages"]:
        acc = f"{s['accuracy']:.2%}" if "accuracy" in s else ""
        print(f"{s['name']:<12}{s['seconds']:>9.1f}  {acc:>9}  {s.get('params', ''):>10}  "
              f"{s.get('macs', ''):>12}")
    print(f"{'total':<12}{wall:>9.1f}")
    for note in report["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
