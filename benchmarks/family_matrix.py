"""The architecture-family matrix of tests/test_families.py as a table: each family
(torchvision's model code at tiny sizes, tests/families.py) built for each target, with its
exit code, params/MACs and test accuracy before (reference) and after (final), what the prune
stage kept whole, and the wall time of each build.

    PYTHONPATH=. .venv/bin/python benchmarks/family_matrix.py [--families resnet,vit]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    from tests.families import FAMILIES, TARGETS, build_family, write_digits_rgb

    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args()
    print("| family | target | exit | params before -> after | MACs before -> after | "
          "accuracy before -> after | kept whole | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits_rgb(Path(tmp) / "digits-rgb.npz")
        for family in args.families.split(","):
            for target in args.targets.split(","):
                start = time.perf_counter()
                code, output, report_path = build_family(family, target, data,
                                                         Path(tmp) / f"{family}-{target}")
                seconds = time.perf_counter() - start
                if not report_path.exists():
                    print(f"| {family} | {target} | {code} | | | | | {seconds:.0f} |")
                    print(output[-2000:])
                    continue
                r = json.loads(report_path.read_text())
                ref, fin = r["reference"], r["final"]
                kept = next((n.split("kept whole: ", 1)[1] for n in r["notes"]
                             if n.startswith("pruning: kept whole")), "")
                skipped = next((n for n in r["notes"] if n.startswith("pruning skipped")), "")
                print(f"| {family} | {target} | {code} | {ref['params']:,} -> "
                      f"{fin['params']:,} | {ref['macs']:,} -> {fin['macs']:,} | "
                      f"{ref['accuracy']:.1%} -> {fin['accuracy']:.1%} | "
                      f"{(kept or skipped)[:90]} | {seconds:.0f} |", flush=True)
    print(f"total: {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
