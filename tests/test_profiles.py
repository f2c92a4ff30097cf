from pathlib import Path

import pytest
from click.testing import CliRunner

from targets import BACKENDS, known_backends
from tests.conftest import ALL_PROFILES, toolchain
from toolchain.cli import cli
from toolchain.errors import UsageError
from toolchain.profiles import BUILTIN_DIR, PRECISIONS, load_profile, load_profile_file

REQUIRED = {"cloud-gpu", "smartphone", "smart-speaker", "host-cpu", "edge-x86",
            "raspberry-pi-4"}


def test_required_profiles_exist():
    assert REQUIRED <= set(ALL_PROFILES)


@pytest.mark.parametrize("name", ALL_PROFILES)
def test_profile_is_complete(name):
    p = load_profile(name)
    assert p.name == name and p.description
    assert p.precision in PRECISIONS and p.threads >= 1
    assert set(p.backends) <= known_backends()
    assert any(b in BACKENDS for b in p.backends), "no buildable backend in the preference list"
    assert set(p.peak_gmacs_per_core) == set(PRECISIONS)
    assert all(v > 0 for v in p.peak_gmacs_per_core.values())
    assert p.memory_bandwidth_gbps > 0 and p.memory_for_model_mb > 0
    assert 0 < p.budgets.max_accuracy_drop_points <= 100
    # every stated number says where it comes from
    assert all(note.strip() for note in p.sources.values())
    from toolchain.profiles import _SOURCED_FIELDS

    assert set(_SOURCED_FIELDS) <= set(p.sources)


def _write_profile(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def _valid_text(name: str) -> str:
    return (BUILTIN_DIR / "host-cpu.toml").read_text().replace('name = "host-cpu"',
                                                                f'name = "{name}"')


def test_profiles_dir_option(tmp_path, monkeypatch):
    # the option sets the variable in this process: monkeypatch puts it back afterwards
    monkeypatch.setenv("EDGEPACK_PROFILES_DIR", "")
    _write_profile(tmp_path, "desk-board", _valid_text("desk-board"))
    result = CliRunner().invoke(cli, ["--profiles-dir", str(tmp_path), "profiles"])
    assert result.exit_code == 0 and "desk-board" in result.output
    bad = tmp_path / "broken"
    bad.mkdir()
    _write_profile(bad, "broken", _valid_text("broken").replace("cores = 2", 'cores = "x"'))
    result = CliRunner().invoke(cli, ["--profiles-dir", str(bad), "profiles"])
    assert result.exit_code == 2 and "broken.toml" in result.output
    assert "hardware.cores" in result.output


def test_user_profile_folder_is_searched(tmp_path, monkeypatch):
    _write_profile(tmp_path, "my-board", _valid_text("my-board"))
    monkeypatch.setenv("EDGEPACK_PROFILES_DIR", str(tmp_path))
    assert load_profile("my-board").name == "my-board"
    result = CliRunner().invoke(cli, ["profiles"])
    assert result.exit_code == 0 and "my-board" in result.output


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda t: t.replace("threads = 2", 'threads = "two"'), "deployment.threads"),
        (lambda t: t.replace('precision = "fp32"', 'precision = "fp8"'), "deployment.precision"),
        (lambda t: t.replace('"onnxruntime", "litert"', '"onnxruntime", "coreml"'),
         "deployment.backends"),
        (lambda t: t.replace("p95_latency_ms = 5.0", ""), "budgets.p95_latency_ms"),
        (lambda t: t.replace('"hardware.cores" =', '"hardware.corez" ='), "hardware.cores"),
        (lambda t: t.replace("[budgets]", "[budgets"), "TOML"),
    ],
)
def test_malformed_profile_names_file_and_field(tmp_path, edit, field):
    path = _write_profile(tmp_path, "bad", edit(_valid_text("bad")))
    with pytest.raises(UsageError) as err:
        load_profile_file(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_profiles_command_lists_every_profile():
    proc = toolchain("profiles")
    assert proc.returncode == 0, proc.stderr
    for name in ALL_PROFILES:
        assert name in proc.stdout


def test_unknown_target_exits_2_and_lists_valid_names(tmp_path):
    proc = toolchain("build", "--target", "toaster", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "toaster" in proc.stderr
    for name in REQUIRED:
        assert name in proc.stderr
    assert not (tmp_path / "out").exists()
