"""The architecture-family matrix of tests/test_families.py as a table: each family
(torchvision's model code at tiny sizes, tests/families.py) built for each target, with its
exit code, params/MACs and test accuracy before (reference) and after (final), what the prune
stage kept whole, and the wall time of each build.

    PYTHONPATH=. .venv/bin/python benchmarks/family_matrix.py [--families resnet,vit]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    from tests.families import (
        FAMILIES,
        TABLE_HEADER,
        TARGETS,
        build_family,
        table_row,
        write_digits_rgb,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args()
    print(TABLE_HEADER)
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits_rgb(Path(tmp) / "digits-rgb.npz")
        for family in args.families.split(","):
            for target in args.targets.split(","):
                start = time.perf_counter()
                code, output, report_path = build_family(family, target, data,
                                                         Path(tmp) / f"{family}-{target}")
                print(table_row(family, target, code, report_path, time.perf_counter() - start),
                      flush=True)
                if not report_path.exists():
                    print(output[-2000:])
    print(f"total: {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
