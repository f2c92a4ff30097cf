"""Every architecture family users bring (torchvision's model code at tiny sizes, see
tests/families.py) builds for a phone (LiteRT int8 with pruning) and an x86 edge box
(OpenVINO int8): exit 0, or exit 3 with the missed budget named in the report, never a
crash; the bundle verifies torch-free; pruning removes channels, and what torch-pruning
cannot handle is kept whole and said so."""

import json
import os
import time

import pytest

from tests.conftest import missed_budgets, run_cmd
from tests.families import FAMILIES, TARGETS, build_family, table_row, write_digits_rgb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_rgb(tmp_path_factory):
    return write_digits_rgb(tmp_path_factory.mktemp("families") / "digits-rgb.npz")


def _stage(report, name):
    return next((s for s in report["stages"] if s["name"] == name and "params" in s), None)


# Every family builds for the phone (LiteRT, pruning: where families differ most); for the x86
# box (OpenVINO, no pruning) four families with distinct op mixes stand in for the rest, to keep
# the suite's time down. EDGEPACK_FULL_MATRIX=1 (and benchmarks/family_matrix.py) runs all 24.
X86_SUBSET = ("mobilenet_v3", "resnet", "swin", "vit")
CASES = [(family, target) for family in sorted(FAMILIES) for target in TARGETS
         if target != "edge-x86" or family in X86_SUBSET
         or os.environ.get("EDGEPACK_FULL_MATRIX") == "1"]


@pytest.mark.parametrize(("family", "target"), CASES)
def test_family_builds(family, target, digits_rgb, tmp_path, runtime_venv):
    start = time.perf_counter()
    code, output, report_path = build_family(family, target, digits_rgb, tmp_path)
    if table := os.environ.get("EDGEPACK_FAMILY_TABLE"):  # the matrix's table, as a by-product
        with open(table, "a") as f:
            f.write(table_row(family, target, code, report_path,
                              time.perf_counter() - start) + "\n")
    assert code in (0, 3), output[-5000:]
    report = json.loads(report_path.read_text())
    if code == 3:  # a gate or budget miss, named in the report
        assert missed_budgets(report), output[-3000:]
    proc = run_cmd(runtime_venv / "bin" / "edge-runtime", "verify", report["bundle"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["precision"] == "int8"
    ref = _stage(report, "reference")
    if target == "edge-x86":
        assert report["backend"] == "openvino"
        return
    assert report["backend"] == "litert"
    pruned = _stage(report, "prune")
    assert pruned is not None, report["notes"]  # every family here has layers that prune
    assert pruned["params"] < ref["params"] and pruned["macs"] < ref["macs"], pruned["did"]
    kept = [n for n in report["notes"] if n.startswith("pruning: kept whole")]
    assert ("kept whole" in pruned["did"]) == bool(kept), (pruned["did"], report["notes"])
