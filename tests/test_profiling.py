"""Latency profiling: operator extraction per backend, the cost model's fit and calibration,
and `toolchain profile` on bundles and models (measured on this host, estimated for targets)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import targets
from targets.base import KINDS
from targets.export_log import converter_output_to
from tests.conftest import assert_exit
from toolchain.build.model_zoo import ARCHITECTURES
from toolchain.build.stats import torch_stats
from toolchain.cli import cli
from toolchain.latency import costmodel
from toolchain.profiles import BUILTIN_DIR, load_profile


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(b for b, plugin in targets.BACKENDS.items()
                                            if plugin.graph_module))
@pytest.mark.parametrize("arch", ["plain-cnn", "depthwise", "attention"])
def test_graph_ops_count_the_models_macs(backend, arch, tmp_path):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch](width=8).eval()
    x = np.zeros((1, 1, 32, 32), np.float32)
    with converter_output_to(tmp_path / "log"):
        path = targets.get(backend).export(model, torch.from_numpy(x), tmp_path)
    ops = targets.get(backend).graph_ops(path)
    assert ops and {op.kind for op in ops} <= set(KINDS)
    macs = sum(op.macs for op in ops if op.kind in ("conv", "depthwise", "matmul"))
    _, want = torch_stats(model, x)
    assert abs(macs - want) / want < 0.15, (macs, want)
    if arch == "depthwise":
        assert any(op.kind == "depthwise" for op in ops)
    assert all(op.dtype == "fp32" and op.bytes >= 0 for op in ops)


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    truth = np.array([2.0, 3.0, 1.5, 4.0, 2.5, 1.0, 0.5, 0.004, 0.002, 0.003, 0.001, 0.001,
                      0.002, 0.02])
    rows = []
    for _ in range(60):
        f = np.concatenate([rng.uniform(0, 0.05, 7), rng.integers(0, 20, 6), [1.0]])
        rows.append((f, float(f @ truth)))
    fitted = costmodel.fit(rows, "onnxruntime", "fp32")
    predicted = np.array([f @ fitted.vector() for f, _ in rows])
    measured = np.array([y for _, y in rows])
    assert np.max(np.abs(predicted - measured) / measured) < 0.01
    assert fitted.train_mape < 0.01


def test_a_reference_fit_ships_with_edgepack():
    from toolchain.latency import fitstore
    from toolchain.profiles import ProfileSearch

    fits = fitstore.reference_fits(ProfileSearch())
    assert "onnxruntime/fp32" in fits, "run `toolchain profiles fit` and commit the file"
    f = fits["onnxruntime/fp32"]
    assert f.models >= 20 and f.fit_date and f.host_profile == "host-cpu"
    assert f.cpu.get("description")  # the CPU it was measured on, named


def _write_bench(path, bundle, p50):
    path.write_text(json.dumps({"bundle": str(bundle), "latency_ms": {"p50": p50, "p95": p50},
                                "backend": "litert", "threads": 4}))
    return path


def test_calibration_moves_the_estimate_to_device_measurements(build_demo, tmp_path,
                                                               monkeypatch):
    # a data folder of its own: the calibration is written there, not beside the profile
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    bundle = build_demo("smartphone").bundle
    from toolchain.latency.calibrate import bundle_ops

    ops, backend, precision = bundle_ops(bundle)
    profile, host = load_profile("smartphone"), load_profile("host-cpu")
    before = costmodel.estimate(ops, profile, backend, precision, host)
    assert before["source"] == "estimated"
    device = 2.0 * before["p50"]
    files = [_write_bench(tmp_path / f"m{i}.json", bundle, device * f)
             for i, f in enumerate((0.95, 1.0, 1.05))]
    result = CliRunner().invoke(cli, ["profiles", "calibrate", "smartphone",
                                      *map(str, files)])
    assert result.exit_code == 0, result.output
    after = costmodel.estimate(ops, load_profile("smartphone"), backend, precision, host)
    assert after["source"] == "estimated (calibrated on 3 measurements)"
    assert abs(after["p50"] - device) / device < 0.10
    assert (tmp_path / "edgepack" / "calibration" / "smartphone.json").exists()
    assert not (BUILTIN_DIR / "calibration" / "smartphone.json").exists()


def test_calibrate_rejects_files_that_are_not_bench_output(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    result = CliRunner().invoke(cli, ["profiles", "calibrate", "smartphone", str(bad)])
    assert result.exit_code == 2 and "edge-runtime bench --json" in result.output


def test_profile_a_bundle_for_a_phone_side_by_side(build_demo, tmp_path):
    bundle = build_demo("smartphone").bundle
    args = ["profile", str(bundle), "--target", "smartphone", "--runs", "50",
            "--min-seconds", "0.3"]
    first = CliRunner().invoke(cli, [*args, "--json", str(tmp_path / "a.json"),
                                     "--plot", str(tmp_path / "p.png")])
    assert_exit(first.exit_code, 0, tmp_path / "a.json", first.output)
    assert "this host (measured-host)" in first.output
    assert "smartphone (estimated" in first.output
    r = json.loads((tmp_path / "a.json").read_text())
    assert r["measured_host"]["source"] == "measured-host"
    assert r["estimated_target"]["source"].startswith("estimated")
    assert r["estimated_target"]["p50"] > 0 and r["measured_host"]["size_bytes"] > 0
    lat = r["measured_host"]["latency_ms"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"] and lat["iqr"] >= 0
    assert r["measured_host"]["cold_start_ms"] > 0 and r["measured_host"]["peak_rss_mb"] > 10
    assert (tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("target, source", [("host-cpu", "ONNX Runtime profiler"),
                                            ("edge-x86", "OpenVINO performance counters")])
def test_profile_a_model_with_per_layer_times(target, source, tmp_path):
    result = CliRunner().invoke(cli, ["profile", "toolchain.build.model_zoo:residual", "--target",
                                      target, "--input-shape", "1,3,32,32", "--runs", "30",
                                      "--min-seconds", "0.2", "--json",
                                      str(tmp_path / "r.json")])
    assert_exit(result.exit_code, 0, tmp_path / "r.json", result.output)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["layers_source"] == source and len(r["layers"]) >= 3
    assert r["layers"][0]["ms"] >= r["layers"][-1]["ms"]
    assert f"slowest layers ({source})" in result.output


@pytest.mark.slow
def test_profile_misses_a_budget_with_exit_3(tmp_path, monkeypatch):
    text = (BUILTIN_DIR / "host-cpu.toml").read_text()
    text = text.replace('name = "host-cpu"', 'name = "strict"')
    text = text.replace("p95_latency_ms = 5.0", "p95_latency_ms = 0.000001")
    (tmp_path / "strict.toml").write_text(text)
    monkeypatch.setenv("EDGEPACK_PROFILES_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["profile", "toolchain.build.model_zoo:plain_cnn", "--target",
                                      "strict", "--input-shape", "1,1,32,32", "--runs", "20",
                                      "--min-seconds", "0.1"])
    assert result.exit_code == 3, result.output
    assert "p95_latency_ms" in result.output and "over its limit" in result.output


def test_profile_needs_an_input_shape_for_a_factory():
    result = CliRunner().invoke(cli, ["profile", "toolchain.build.model_zoo:plain_cnn", "--target",
                                      "host-cpu"])
    assert result.exit_code == 2 and "--input-shape" in result.output
