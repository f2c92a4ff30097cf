"""benchmarks/fleet_sim.py end to end, small: 20 simulated devices through a real Mosquitto
into a real `toolchain listen` on SQLite, paced and as fast as stored. What is asserted is
what the simulator counts in the store (every published window stored exactly once, no
gaps per device), never a rate or a latency."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("load", [["--rate", "100"], ["--max"], ["--rate", "100", "--client",
                                                                  "paho"]],
                         ids=["paced", "max", "paced-paho"])
def test_every_window_stored_exactly_once(tmp_path, load):
    out = tmp_path / "sim.json"
    proc = subprocess.run(
        [sys.executable, REPO / "benchmarks" / "fleet_sim.py", "--devices", "20", *load,
         "--duration", "3", "--bodies", "5", "--publishers", "2", "--json", out],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert r["published"] > 0
    if load[0] == "--rate":
        assert r["published"] == 300  # 100/s for 3 s, every one sent
    assert r["stored"] == r["windows"] == r["published"]
    assert (r["missing"], r["unexpected"], r["devices_with_gaps"]) == (0, 0, 0)
    assert r["exactly_once"] and r["dead_letters"] == 0
    assert "exactly once         yes" in proc.stdout
