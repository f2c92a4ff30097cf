"""The device runtime, in an environment with only the base dependencies and the onnx and
tflite extras: no torch installed at all."""

import json
import subprocess
import sys

import numpy as np
import pytest

import runtime
from tests.conftest import ALL_PROFILES, REPO, run_cmd


def test_import_runtime_does_not_import_torch_even_where_torch_is_installed():
    code = ("import importlib, sys, runtime, runtime.cli, runtime.bench, runtime.device, "
            "runtime.serve, runtime.telemetry, runtime.spool, runtime.mqtt, targets; "
            "[importlib.import_module(b.run_module) for b in targets.BACKENDS.values() "
            "if not b.capabilities.run_needs_torch]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_runtime_venv_has_no_torch(runtime_venv):
    code = ("import importlib.util, sys, runtime; "
            "assert importlib.util.find_spec('torch') is None, 'torch is installed'; "
            "assert 'torch' not in sys.modules")
    proc = run_cmd(runtime_venv / "bin" / "python", "-c", code)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_verify_and_run_without_torch(build_demo, digits_test_npz, runtime_venv, profile):
    built = build_demo(profile)
    edge = runtime_venv / "bin" / "edge-runtime"
    proc = run_cmd(edge, "verify", built.bundle)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "golden self-test passed" in proc.stdout
    proc = run_cmd(edge, "run", built.bundle, "--input", digits_test_npz, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["count"] == len(np.load(digits_test_npz)["y"])
    assert abs(result["accuracy"] - built.report["final"]["accuracy"]) <= 0.005


def test_bench_without_torch(build_demo, runtime_venv):
    built = build_demo("smart-speaker")
    proc = run_cmd(runtime_venv / "bin" / "edge-runtime", "bench", built.bundle, "--runs", "50",
                   "--warmup", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    lat = result["latency_ms"]
    assert result["threads"] == 1 and result["backend"] == "litert"
    assert lat["runs"] >= 50 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert result["cold_start_ms"] > 0 and result["peak_rss_mb"] > 10


def test_python_api(build_demo, digits_test_npz, tmp_path):
    built = build_demo("host-cpu")
    data = np.load(digits_test_npz)
    with runtime.load(built.bundle, workdir=tmp_path / "model") as model:
        assert model.backend == "onnxruntime" and model.threads == 2
        ids, confidence = model.classify(data["x"])
        assert np.mean(ids == data["y"]) == pytest.approx(built.report["final"]["accuracy"],
                                                          abs=0.005)
        assert ((confidence > 0) & (confidence <= 1)).all()
        # one sample without a batch axis works too
        assert model.predict(data["x"][0]).shape == (1, 10)
        with pytest.raises(ValueError, match="does not fit this model"):
            model.predict(np.zeros((2, 3, 32, 32), np.float32))
        assert model.self_test().ok
        m = model.manifest
        assert m.provenance.data_sha256 and m.provenance.seed == 0
        assert m.output.labels == tuple(str(i) for i in range(10))
        dist = json.loads((tmp_path / "model" / m.reference_distributions).read_text())
        assert abs(sum(dist["output"]["predicted_class"]["proportions"]) - 1) < 1e-6
        assert abs(sum(dist["output"]["confidence"]["proportions"]) - 1) < 1e-6


def test_run_reports_bad_input_as_usage_error(build_demo, tmp_path):
    built = build_demo("host-cpu")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3, 8, 8), np.float32))
    proc = run_cmd(sys.executable, "-m", "runtime", "run", built.bundle, "--input", bad)
    assert proc.returncode == 2 and "does not fit this model" in proc.stderr
