"""Estimates that respect physics: every profile's estimate carries a lower bound from its
fixed costs and never goes below it; a GPU pays launches and a sync; no device beats its own
peak; a target's p95 comes from the target's tail model, never from this host's tail."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import targets
from targets.base import Op
from tests.conftest import ALL_PROFILES
from toolchain.latency import costmodel, floors
from toolchain.profiles import load_profile


def _demo_ops() -> list[Op]:
    """The demo CNN's operators as the ONNX graph reader gives them (1x28x28 input, width
    16): four convolutions each followed by ReLU, global pooling, the classifier."""
    ops, channels, size = [], 1, 28
    for i, (cout, stride) in enumerate([(16, 1), (32, 2), (32, 1), (64, 2)]):
        size //= stride
        out = cout * size * size
        ops.append(Op(f"node_Conv_{i}", "conv", "fp32", out * channels * 9,
                      4 * (out + channels * size * size * stride * stride + cout * channels * 9)))
        ops.append(Op(f"node_relu_{i}", "elementwise", "fp32", out, 8 * out))
        channels = cout
    ops.append(Op("node_mean", "pooling", "fp32", channels * size * size, 4 * channels * size**2))
    ops.append(Op("node_linear", "matmul", "fp32", channels * 10, 4 * (channels * 11 + 10)))
    return ops


def _estimate(name: str, ops: list[Op]) -> dict:
    profile = load_profile(name)
    backend = targets.get(next(b for b in profile.backends if b in targets.BACKENDS))
    return costmodel.estimate(ops, profile, backend, profile.precision,
                              load_profile(costmodel.HOST_PROFILE), use_calibration=False)


@pytest.mark.parametrize("name", ALL_PROFILES)
def test_every_estimate_stays_above_its_fixed_cost_floor(name):
    est = _estimate(name, _demo_ops())
    assert est["lower_bound_ms"] > 0 and est["lower_bound_note"]
    assert est["p50"] >= est["lower_bound_ms"]
    tailed = floors.with_target_tail(dict(est), load_profile(name))
    assert tailed["p95"] >= tailed["p50"] and name in tailed["p95_note"]


def test_the_demo_on_a_data_centre_gpu_costs_at_least_launches_and_a_sync():
    est = _estimate("cloud-gpu", _demo_ops())
    # 6 kernels (conv+relu fused x4, pooling, matmul) x 3 us + 20 us: tens of microseconds
    assert est["lower_bound_ms"] == pytest.approx((6 * 3.0 + 20.0) / 1e3)
    assert est["p50"] >= 0.02, est
    assert "GPU kernel model" in est["method"]


def test_a_big_model_on_the_gpu_is_bound_by_arithmetic_not_launches():
    big = [Op(f"c{i}", "conv", "fp32", 2 * 10**10, 10**6) for i in range(4)]
    est = _estimate("cloud-gpu", big)
    assert est["p50"] > 10 * est["lower_bound_ms"]


@pytest.mark.parametrize("name", [n for n in ALL_PROFILES if n != costmodel.HOST_PROFILE])
def test_no_device_runs_faster_than_its_peak(name):
    profile = load_profile(name)
    ops = _demo_ops()
    est = _estimate(name, ops)
    cores = profile.cores if profile.fixed.executor == "gpu" else min(profile.threads,
                                                                       profile.cores)
    best = max(profile.peak_gmacs_per_core.values()) * 1e9 * cores
    assert est["p50"] >= sum(op.work for op in ops) / best * 1e3


def test_fusion_groups_elementwise_ops_into_the_kernel_before_them():
    ops = _demo_ops()
    groups = floors.kernels(ops)
    assert [len(g) for g in groups] == [2, 2, 2, 2, 1, 1]
    alone = [Op("add", "elementwise", "fp32", 10, 80), *ops]
    assert len(floors.kernels(alone)) == 7
    bn = [Op("node_Conv_0", "conv", "fp32", 10, 80),
          Op("node_batch_norm", "other", "fp32", 10, 80),
          Op("node_softmax", "other", "fp32", 10, 80)]
    assert [len(g) for g in floors.kernels(bn)] == [2, 1]


def test_target_p95_comes_from_the_target_not_from_this_hosts_tail():
    from toolchain.build.pipeline import _target_latency
    from toolchain.profiles import ProfileSearch

    ops = _demo_ops()
    onnx = targets.get("onnxruntime")
    backend = SimpleNamespace(name=onnx.name, cost_fit_fallbacks=onnx.cost_fit_fallbacks,
                              graph_ops=lambda path: ops)
    profile = load_profile("smartphone")
    calm = SimpleNamespace(model_file="m", precision="int8",
                           latency={"p50": 1.0, "p95": 1.1, "source": "measured-host"})
    busy = SimpleNamespace(model_file="m", precision="int8",
                           latency={"p50": 1.0, "p95": 81.0, "source": "measured-host"})
    from toolchain.progress import Progress

    a = _target_latency(profile, backend, calm, ProfileSearch(), Progress(quiet=True))
    b = _target_latency(profile, backend, busy, ProfileSearch(), Progress(quiet=True))
    assert a["p95"] == b["p95"] == pytest.approx(a["p50"] * profile.fixed.tail_ratio_p95,
                                                 abs=1e-4)
    assert "host_note" not in a and "81.0x" in b["host_note"]
    assert "tail model" in a["why"]


def test_a_busy_host_measurement_is_named():
    assert floors.host_tail_note({"p50": 1.0, "p95": 1.2}) is None
    assert "busy" in floors.host_tail_note({"p50": 1.0, "p95": 12.0})


@pytest.mark.slow
def test_the_exported_demo_respects_every_profiles_floor(tmp_path):
    """The same checks on the demo exported for real and read by the ONNX graph reader."""
    from targets.export_log import converter_output_to
    from toolchain.build.models import demo_cnn

    torch.manual_seed(0)
    onnx = targets.get("onnxruntime")
    with converter_output_to(tmp_path / "log"):
        path = onnx.export(demo_cnn(1, 10, 16).eval(), torch.zeros(1, 1, 28, 28), tmp_path)
    ops = onnx.graph_ops(path)
    host = load_profile(costmodel.HOST_PROFILE)
    for name in ALL_PROFILES:
        profile = load_profile(name)
        est = costmodel.estimate(ops, profile, onnx, profile.precision, host)
        assert est["p50"] >= est["lower_bound_ms"] > 0, (name, est)
    gpu = costmodel.estimate(ops, load_profile("cloud-gpu"), onnx, "fp16", host)
    assert gpu["p50"] >= 0.02 and np.isfinite(gpu["p50"])
