"""The command lines: help on every subcommand, and bad input exits 2 with a message that
names the problem, leaving nothing half-written in --out."""

import numpy as np
import pytest
from click.testing import CliRunner

from runtime.cli import cli as runtime_cli
from tests.conftest import BIN, toolchain
from toolchain.cli import cli as toolchain_cli


def _command_paths(group, path=()):
    """Every command under `group`, subgroups walked: [(group, ["fleet", "retain"]), ...]."""
    for name, cmd in group.commands.items():
        yield [*path, name]
        if hasattr(cmd, "commands"):
            yield from _command_paths(cmd, (*path, name))


@pytest.mark.parametrize("group, path", [(toolchain_cli, p) for p in _command_paths(toolchain_cli)]
                         + [(runtime_cli, p) for p in _command_paths(runtime_cli)],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_help_on_every_subcommand(group, path):
    result = CliRunner().invoke(group, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_console_scripts_are_installed():
    for script in ("toolchain", "edge-runtime"):
        proc = toolchain("--help") if script == "toolchain" else None
        if proc is None:
            from tests.conftest import run_cmd

            proc = run_cmd(BIN / script, "--help")
        assert proc.returncode == 0 and "Usage:" in proc.stdout


FIXED_INPUT_MODEL = """
import torch.nn as nn

def make(num_classes=10):
    # takes exactly 1x32x32 inputs
    return nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, num_classes))

def not_a_model():
    return 42
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(FIXED_INPUT_MODEL)
    return path


@pytest.fixture
def small_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "small16.npz"
    np.savez(path, x=rng.random((60, 1, 16, 16), dtype=np.float32),
             y=np.repeat(np.arange(3), 20))
    return path


def _bad_inputs(tmp_path, model_file, small_npz):
    return {
        "unknown target": (["--target", "toaster"], "unknown target 'toaster'"),
        "missing model file": (["--target", "host-cpu", "--model", str(tmp_path / "nope.onnx")],
                               "not found"),
        "missing factory file": (["--target", "host-cpu", "--model", "gone.py:make"],
                                 "model file 'gone.py' not found"),
        "unresolvable module": (["--target", "host-cpu", "--model", "no_such_pkg.mod:make"],
                                "cannot be imported"),
        "missing factory": (["--target", "host-cpu", "--model", f"{model_file}:nothing"],
                            "has no callable 'nothing'"),
        "factory returns no module": (["--target", "host-cpu", "--model",
                                       f"{model_file}:not_a_model"], "not an nn.Module"),
        "not understood": (["--target", "host-cpu", "--model", "weights.bin"], "not understood"),
        "data does not fit model": (["--target", "host-cpu", "--model", f"{model_file}:make",
                                     "--data", str(small_npz)],
                                    "does not accept data samples of shape (1, 16, 16)"),
        "missing data": (["--target", "host-cpu", "--data", str(tmp_path / "none.npz")],
                         "not found"),
        "pickle without trust": (["--target", "host-cpu", "--model",
                                  str(tmp_path / "m.pt")], "--trust-pickle"),
    }


def test_bad_build_input_exits_2_and_writes_nothing(tmp_path, model_file, small_npz):
    (tmp_path / "m.pt").write_bytes(b"not really a pickle")
    out = tmp_path / "out"
    for label, (args, message) in _bad_inputs(tmp_path, model_file, small_npz).items():
        result = CliRunner().invoke(toolchain_cli, ["build", *args, "--out", str(out),
                                                    "--json", str(tmp_path / "r.json")])
        assert result.exit_code == 2, (label, result.output)
        assert message in result.output, (label, result.output)
        assert not out.exists(), label
        assert not (tmp_path / "r.json").exists(), label


def test_bad_npz_contents_are_named(tmp_path):
    cases = {
        "no_y.npz": ({"x": np.zeros((9, 1, 8, 8), np.float32)}, "no array 'y'"),
        "flat.npz": ({"x": np.zeros((9, 64), np.float32), "y": np.zeros(9, np.int64)},
                     "expected 4 dimensions"),
        "count.npz": ({"x": np.zeros((9, 1, 8, 8), np.float32), "y": np.zeros(8, np.int64)},
                      "9 samples but y has 8"),
        "few.npz": ({"x": np.zeros((4, 1, 8, 8), np.float32), "y": np.array([0, 0, 1, 1])},
                    "fewer than 3 samples"),
        "nan.npz": ({"x": np.full((9, 1, 8, 8), np.nan, np.float32),
                     "y": np.repeat(np.arange(3), 3)}, "NaN"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        result = CliRunner().invoke(toolchain_cli, ["build", "--target", "host-cpu", "--data",
                                                    str(tmp_path / name), "--out",
                                                    str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output, (name, result.output)
        assert not (tmp_path / "out").exists()


def test_inspect_summarizes_a_bundle(build_demo):
    built = build_demo("smart-speaker")
    proc = toolchain("inspect", built.bundle)
    assert proc.returncode == 0, proc.stderr
    for text in ("demo-cnn", "smart-speaker: litert, int8, 1 thread(s)", "measured-host",
                 "golden      8 inputs", "model/model.tflite"):
        assert text in proc.stdout
    proc = toolchain("inspect", built.bundle, "--json")
    import json

    assert json.loads(proc.stdout)["target"]["backend"] == "litert"


def test_inspect_refuses_a_non_bundle(tmp_path):
    (tmp_path / "x.edgepack").write_text("hello")
    proc = toolchain("inspect", tmp_path / "x.edgepack")
    assert proc.returncode == 1 and "not an edgepack bundle" in proc.stderr
