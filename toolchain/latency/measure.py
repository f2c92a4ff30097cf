"""Latency as a device runtime would see it on this host: the model run by the torch-free
runtime in a fresh process (`python -m runtime.bench`), with the target's thread count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError


def measure_fresh(backend: str, model_file: Path, threads: int, shape: tuple[int, ...],
                  runs: int, *, min_seconds: float = 1.0, warmup: int = 20,
                  samples: bool = False) -> dict[str, Any]:
    """Time the model in a fresh process with only the runtime and the backend (no torch),
    with the target's thread count: the latency a device runtime would see on this host."""
    cmd = [sys.executable, "-m", "runtime.bench", str(model_file), "--backend", backend,
           "--threads", str(threads), "--input-shape", ",".join(map(str, shape)),
           "--runs", str(runs), "--min-seconds", str(min_seconds), "--warmup", str(warmup)]
    proc = subprocess.run(cmd + (["--samples"] if samples else []), capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise ToolchainError(f"latency measurement failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)
