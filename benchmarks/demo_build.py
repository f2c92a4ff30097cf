"""Time `toolchain build` on the built-in demo for each profile, then check each bundle with
the runtime. Prints one table row per profile.

    .venv/bin/python benchmarks/demo_build.py [--targets smart-speaker,host-cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", default="smart-speaker,host-cpu,smartphone,cloud-gpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            out, report_path = Path(tmp) / target, Path(tmp) / f"{target}.json"
            start = time.perf_counter()
            proc = subprocess.run([BIN / "toolchain", "build", "--target", target, "--out", out,
                                   "--json", report_path, "--quiet"], capture_output=True,
                                  text=True)
            wall = time.perf_counter() - start
            if proc.returncode not in (0, 3):
                sys.exit(f"{target}: build failed\n{proc.stderr[-2000:]}")
            r = json.loads(report_path.read_text())
            verify = subprocess.run([BIN / "edge-runtime", "verify", r["bundle"]],
                                    capture_output=True, text=True)
            fin = r["final"]
            rows.append((target, r["backend"], r["precision"], f"{wall:.1f}",
                         f"{fin['accuracy']:.2%}", str(Path(r["bundle"]).stat().st_size),
                         f"{fin['latency_ms']['p50']:.3f}", f"{fin['latency_ms']['p95']:.3f}",
                         "ok" if verify.returncode == 0 else "FAILED"))
    header = ("target", "backend", "precision", "wall s", "test acc", "bundle B", "p50 ms",
              "p95 ms", "verify")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print("latency: measured-host, batch 1, each profile's thread count")


if __name__ == "__main__":
    main()
