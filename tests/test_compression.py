"""Compression end to end: every architecture prunes, distills, quantizes, exports and
verifies; pruning really removes channels; the accuracy gate and budgets exit 3 with a
report that says why; the quantization fallback keeps sensitive layers in float."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from runtime import load
from tests.conftest import assert_exit, run_cmd
from toolchain.build.model_zoo import ARCHITECTURES
from toolchain.build.prune import Pruner
from toolchain.build.stats import torch_stats
from toolchain.cli import cli

FAST = ["--set", "train.epochs=3", "--set", "prune.steps=1", "--set", "prune.finetune_epochs=1",
        "--set", "distill.epochs=2", "--set", "quantize.calibration_samples=64",
        "--bench-runs", "10", "--quiet"]
# a few epochs do not train every architecture well: these tests are about the mechanics
NO_GATE = ["--set", "gate.max_accuracy_drop_points=100"]


def _build(tmp_path, *args, expect=0):
    result = CliRunner().invoke(cli, ["build", *args, "--out", str(tmp_path / "out"), "--json",
                                      str(tmp_path / "r.json"), *FAST])
    assert_exit(result.exit_code, expect, tmp_path / "r.json",
                result.output + repr(result.exception))
    return json.loads((tmp_path / "r.json").read_text()), result.output


def _stage(report, name):
    return next(s for s in report["stages"] if s["name"] == name)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_prunes_distills_quantizes_and_verifies(arch, tmp_path, runtime_venv):
    report, _ = _build(tmp_path, "--target", "smart-speaker", "--model",
                       f"tests.zoo_small:{arch.replace('-', '_')}",
                       "--set", "prune.ratio=0.5", *NO_GATE)
    ref, pruned, quant = (_stage(report, s) for s in ("reference", "prune", "quantize"))
    # pruning removed channels: the exported file, parameters and MACs are all smaller
    assert pruned["size_bytes"] < ref["size_bytes"]
    assert pruned["params"] < ref["params"]
    assert pruned["macs"] < ref["macs"]
    assert "distillation" in pruned["did"]
    assert quant["precision"] == "int8" and report["precision"] == "int8"
    proc = run_cmd(runtime_venv / "bin" / "edge-runtime", "verify", report["bundle"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with load(report["bundle"]) as model:
        assert model.session.input.dtype == "int8"  # full-integer: the runtime quantizes


@pytest.mark.parametrize("arch", ["plain_cnn", "attention"])
def test_onnxruntime_static_int8(arch, tmp_path):
    report, _ = _build(tmp_path, "--target", "host-cpu", "--model", f"tests.zoo_small:{arch}",
                       "--set", "quantize.precision=int8", "--set", "prune.enabled=true",
                       "--set", "prune.ratio=0.3", *NO_GATE)
    assert report["backend"] == "onnxruntime" and report["precision"] == "int8"
    quant = _stage(report, "quantize")
    assert quant["precision"] == "int8" and "post-training int8" in quant["did"]
    with load(report["bundle"]) as model:
        assert model.self_test().ok


@pytest.mark.parametrize("criterion", ["l2", "taylor", "bn-scale"])
@pytest.mark.parametrize("scope", ["global", "uniform"])
def test_pruning_criteria_remove_channels(criterion, scope):
    torch.manual_seed(0)
    model = ARCHITECTURES["residual"](width=8).eval()
    for m in model.modules():  # trained-looking BatchNorm scales, so bn-scale can rank
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
    x = np.random.default_rng(0).standard_normal((64, 1, 32, 32)).astype(np.float32)
    y = np.arange(64) % 10
    before = torch_stats(model, x)
    pruner = Pruner(model, torch.from_numpy(x[:1]), criterion=criterion, scope=scope,
                    ratio=0.5, steps=2, keep=("1.conv1.0",))
    pruner.step(x, y)
    middle = torch_stats(model, x)
    pruner.step(x, y)
    after = torch_stats(model, x)
    assert pruner.finished
    assert before[0] > middle[0] > after[0] and before[1] > middle[1] > after[1]
    assert model[-1][-1].out_features == 10  # the classifier is whole
    assert model[1].conv1[0].out_channels == 8  # the kept layer is whole
    assert model(torch.from_numpy(x[:3])).shape == (3, 10)


def _usage_error(tmp_path, override):
    """Build the small plain CNN with one recipe override; return the output of exit 2."""
    result = CliRunner().invoke(cli, ["build", "--target", "smart-speaker", "--model",
                                      "tests.zoo_small:plain_cnn", "--set", override,
                                      "--out", str(tmp_path / "usage"), *FAST])
    assert result.exit_code == 2, result.output
    return result.output


def test_unknown_layer_to_keep_is_a_usage_error(tmp_path):
    assert "layers to keep not found: nope" in _usage_error(tmp_path,
                                                            'prune.keep_layers=["nope"]')


def test_named_student_is_distilled(tmp_path):
    report, _ = _build(tmp_path, "--target", "smart-speaker", "--model",
                       "tests.zoo_small:plain_cnn", "--set",
                       'distill.student="tests.zoo_small:depthwise"', "--set",
                       "prune.enabled=false", "--set", "distill.epochs=3", "--set",
                       "gate.max_accuracy_drop_points=100")
    names = [s["name"] for s in report["stages"]]
    assert names == ["ingest", "train", "reference", "distill", "quantize", "package"]
    distill = _stage(report, "distill")
    assert "student tests.zoo_small:depthwise" in distill["did"]
    assert distill["params"] != _stage(report, "reference")["params"]


def test_unreachable_latency_target_exits_3_and_stops(tmp_path):
    report, output = _build(tmp_path, "--target", "smart-speaker", "--model",
                            "tests.zoo_small:plain_cnn", "--set", "prune.target=latency",
                            "--set", "prune.latency_ms=0.000001", "--set", "prune.max_ratio=0.3",
                            "--set", "prune.search_step=0.1", expect=3)
    row = next(b for b in report["budgets"] if b["name"] == "prune_target_latency_ms")
    assert row["ok"] is False and row["value"] > row["limit"]
    assert "prune_target_latency_ms" in output and "over its limit" in output
    assert any("without meeting latency_ms" in n for n in report["notes"])
    assert (tmp_path / "out").exists()  # exit 3 still writes the artifacts


def test_accuracy_gate_failure_exits_3_and_names_best_model(tmp_path):
    report, output = _build(tmp_path, "--target", "smart-speaker", "--model",
                            "tests.zoo_small:plain_cnn", "--set", "prune.ratio=0.9",
                            "--set", "prune.finetune_epochs=0", "--set", "distill.epochs=0",
                            "--set", "gate.max_accuracy_drop_points=0.1",
                            "--set", "quantize.fallback=false", expect=3)
    gate = next(b for b in report["budgets"] if b["name"] == "max_accuracy_drop_points")
    assert gate["ok"] is False
    assert report["best_within_gate"]["stage"] == "reference"
    assert "best model within the accuracy gate: after stage reference" in output
    with load(report["bundle"]) as model:
        assert model.manifest.metrics.gate.passed is False


@pytest.mark.parametrize("target", ["smart-speaker", "host-cpu"])
def test_quantization_fallback_keeps_sensitive_layers_in_float(target, tmp_path):
    report, _ = _build(tmp_path, "--target", target, "--model", "tests.zoo_small:offset_logits",
                       "--set", "prune.enabled=false", "--set", "quantize.precision=int8",
                       "--set", "train.epochs=4", "--set", "quantize.qat_epochs=0")
    quant = _stage(report, "quantize")
    assert "post-training int8 dropped" in quant["did"]
    assert "most sensitive layer(s) in float" in quant["did"]
    assert quant["float_layers"], quant
    drop = (_stage(report, "reference")["accuracy"] - quant["accuracy"]) * 100
    assert drop <= 1.0, quant


def test_explicit_float_layers(tmp_path):
    report, _ = _build(tmp_path, "--target", "smart-speaker", "--model",
                       "tests.zoo_small:plain_cnn", "--set", "prune.enabled=false",
                       "--set", 'quantize.float_layers=["0"]', *NO_GATE)
    with load(report["bundle"]) as model:
        assert model.session.input.dtype == "float32"  # the first conv stayed float
    assert "zz not found" in _usage_error(tmp_path, 'quantize.float_layers=["zz"]')


def test_quantization_aware_training_gives_a_full_int8_model(tmp_path):
    from torchao.quantization.pt2e import (
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    import targets
    from targets.base import QuantizeJob
    from tests.zoo_small import plain_cnn
    from toolchain.build.train import train

    qat_backends = [b for b in targets.BACKENDS.values() if b.capabilities.qat]
    assert qat_backends, "no registered backend declares quantization-aware training"
    backend = qat_backends[0]

    x = np.random.default_rng(0).standard_normal((64, 1, 32, 32)).astype(np.float32)
    y = np.arange(64) % 10
    trained = []

    def set_mode(graph, training):
        (move_exported_model_to_train if training else move_exported_model_to_eval)(graph)

    def qat_train(graph):
        train(graph, x, y, x[:16], y[:16], epochs=1, seed=0, set_mode=set_mode,
              log=trained.append)

    path = backend.quantize_qat(QuantizeJob("int8", tmp_path / "unused", plain_cnn(), x[:1], x,
                                            tmp_path), qat_train)
    assert trained and "epoch 1/1" in trained[0]
    session = backend.open_session(path, 1)
    assert session.input.dtype == "int8" and session.output.dtype == "int8"
    assert session.run(x[:3]).shape == (3, 10)
