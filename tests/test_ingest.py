"""Every accepted --model form and --data form, through a real build."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from runtime import load
from tests.conftest import assert_exit
from toolchain.build.data import load_data
from toolchain.build.models import demo_cnn
from toolchain.cli import cli

FACTORY = """
import torch.nn as nn

def make(num_classes, in_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, num_classes))
"""


def _build(tmp_path, *args) -> tuple[dict, object]:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["build", *args, "--out", str(out), "--json",
                                      str(tmp_path / "r.json"), "--bench-runs", "10",
                                      "--quiet"])
    assert_exit(result.exit_code, 0, tmp_path / "r.json", result.output + repr(result.exception))
    report = json.loads((tmp_path / "r.json").read_text())
    with load(report["bundle"]) as model:  # verifies hashes and the golden self-test
        assert model.self_test().ok
    return report, result


@pytest.fixture(scope="module")
def trained_demo():
    data = load_data("digits", seed=0)
    from runtime.preprocess import apply, normalization
    from toolchain.build.train import train

    torch.manual_seed(0)
    model = demo_cnn()
    prep = normalization(data.mean, data.std)
    train(model, apply(prep, data.x_train), data.y_train, apply(prep, data.x_val), data.y_val,
          epochs=3, seed=0, log=lambda _: None)
    return model.eval()


def test_factory_from_a_file_is_trained(tmp_path):
    (tmp_path / "net.py").write_text(FACTORY)
    report, _ = _build(tmp_path, "--target", "host-cpu", "--model",
                       f"{tmp_path / 'net.py'}:make", "--epochs", "4")
    assert report["final"]["accuracy"] > 0.8
    assert [s["name"] for s in report["stages"]][:2] == ["ingest", "train"]


def test_factory_from_a_module(tmp_path):
    report, _ = _build(tmp_path, "--target", "smart-speaker", "--model",
                       "toolchain.build.models:demo_cnn", "--epochs", "2")
    assert report["backend"] == "litert" and report["final"]["accuracy"] > 0.8


def test_pretrained_factory_is_not_trained(tmp_path, trained_demo):
    torch.save(trained_demo.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "net.py").write_text(
        "import torch\nfrom toolchain.build.models import demo_cnn\n\n"
        "def make(num_classes):\n    net = demo_cnn(1, num_classes)\n"
        f"    net.load_state_dict(torch.load({str(tmp_path / 'weights.pt')!r}))\n"
        "    return net\n")
    report, _ = _build(tmp_path, "--target", "host-cpu", "--model",
                       f"{tmp_path / 'net.py'}:make", "--pretrained")
    assert "train" not in [s["name"] for s in report["stages"]]
    assert report["final"]["accuracy"] > 0.9


def test_an_untrained_model_taken_as_pretrained_is_named(tmp_path):
    """--pretrained on a factory that returns fresh weights: the reference is at chance, so
    the report says the model did not learn and the build exits 3."""
    (tmp_path / "net.py").write_text(FACTORY)
    result = CliRunner().invoke(cli, ["build", "--target", "host-cpu", "--model",
                                      f"{tmp_path / 'net.py'}:make", "--pretrained", "--out",
                                      str(tmp_path / "out"), "--bench-runs", "10", "--quiet"])
    assert result.exit_code == 3, result.output
    assert result.output.startswith("WARNING: the reference model did not learn")
    assert "it was taken as trained" in result.output


def test_onnx_model_is_taken_as_trained_and_litert_falls_back(tmp_path, trained_demo):
    from targets.export_log import converter_output_to
    from targets.onnxruntime.export import export

    (tmp_path / "src").mkdir()
    with converter_output_to(tmp_path / "log"):
        onnx_path = export(trained_demo, torch.zeros(1, 1, 32, 32), tmp_path / "src")
    report, _ = _build(tmp_path, "--target", "smart-speaker", "--model", str(onnx_path),
                       "--epochs", "3")
    assert report["backend"] == "onnxruntime"
    notes = " ".join(report["notes"])
    assert "litert (it is made from a PyTorch model, not an ONNX file)" in notes
    assert "ONNX graph" in notes and "--epochs ignored" in notes
    assert "train" not in [s["name"] for s in report["stages"]]
    assert report["final"]["accuracy"] > 0.9 and report["final"]["macs"] > 1_000_000


def test_exported_program_pt2(tmp_path, trained_demo):
    path = tmp_path / "demo.pt2"
    torch.export.save(torch.export.export(trained_demo, (torch.zeros(1, 1, 32, 32),)), path)
    report, _ = _build(tmp_path, "--target", "smart-speaker", "--model", str(path))
    assert report["backend"] == "litert" and report["final"]["accuracy"] > 0.9
    assert report["final"]["macs"] > 1_000_000 and report["precision"] == "int8"
    # a traced graph cannot be pruned or fine-tuned: the report says so instead of failing
    assert any("pruning skipped" in n and "ExportedProgram" in n for n in report["notes"])


def test_trusted_pickle(tmp_path, trained_demo):
    path = tmp_path / "demo.pt"
    torch.save(trained_demo, path)
    result = CliRunner().invoke(cli, ["build", "--target", "host-cpu", "--model", str(path),
                                      "--out", str(tmp_path / "refused")])
    assert result.exit_code == 2 and "--trust-pickle" in result.output
    report, _ = _build(tmp_path, "--target", "host-cpu", "--model", str(path), "--trust-pickle")
    assert report["final"]["accuracy"] > 0.9


def test_state_dict_pickle_is_explained(tmp_path, trained_demo):
    path = tmp_path / "weights.pt"
    torch.save(trained_demo.state_dict(), path)
    result = CliRunner().invoke(cli, ["build", "--target", "host-cpu", "--model", str(path),
                                      "--trust-pickle", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "state_dict" in result.output


def test_image_folder_data(tmp_path):
    rng = np.random.default_rng(0)
    for cls, value in (("dark", 40), ("light", 200), ("striped", None)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(12):
            if value is None:
                arr = np.zeros((20, 20, 3), np.uint8)
                arr[::4] = 255
            else:
                arr = np.clip(rng.normal(value, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dark" / "readme.txt").write_text("ignored: not an image")
    data = load_data(str(tmp_path / "imgs"), seed=0, image_size=16)
    assert data.labels == ["dark", "light", "striped"]
    assert data.sample_shape == (3, 16, 16)
    report, _ = _build(tmp_path, "--target", "host-cpu", "--data", str(tmp_path / "imgs"),
                       "--image-size", "16", "--epochs", "8")
    assert report["final"]["accuracy"] > 0.6


def test_digits_split_is_stratified_disjoint_and_seeded():
    a, b, c = load_data("digits", 0), load_data("digits", 0), load_data("digits", 1)
    assert len(a.x_train) + len(a.x_val) + len(a.x_test) == 1797
    assert a.sample_shape == (1, 32, 32) and a.num_classes == 10
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() >= 0.8 * counts.max()  # every class in proportion
    flat = {x.tobytes() for x in a.x_train}
    assert not any(x.tobytes() in flat for x in a.x_test[:50])
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0


def test_two_data_sources_and_a_mix_through_a_build(tmp_path):
    """The original data and an export of captured data (its extra arrays and all), mixed
    30/70: the bundle's provenance names both sources, the mix and the seed, and hashes
    them together."""
    from tests.test_data_sources import captured
    from toolchain.build.data import load_sources

    fresh = captured(tmp_path / "fresh.npz")
    report, result = _build(tmp_path, "--target", "host-cpu", "--data", "digits", "--data",
                            str(fresh), "--mix", "0.3", "--epochs", "1", "--seed", "2")
    with load(report["bundle"]) as model:
        prov = model.manifest.provenance
    assert prov.data == f"digits + {fresh} (mix 0.3, seed 2)"
    assert prov.data_sha256 == load_sources(["digits", str(fresh)], 2, mix=0.3).sha256
    assert report["final"]["accuracy"] > 0.5  # one epoch: trained, not tuned
    bad = CliRunner().invoke(cli, ["build", "--target", "host-cpu", "--mix", "0.3", "--out",
                                   str(tmp_path / "no")])
    assert bad.exit_code == 2 and "a second --data source" in bad.output
    assert not (tmp_path / "no").exists()
