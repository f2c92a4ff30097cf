from pathlib import Path

import pytest
from click.testing import CliRunner

from targets import BACKENDS, known_backends
from tests.conftest import ALL_PROFILES, toolchain
from toolchain.cli import cli
from toolchain.errors import UsageError
from toolchain.profiles import (
    BUILTIN_DIR,
    PRECISIONS,
    ProfileSearch,
    load_profile,
    load_profile_file,
)

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
    """A complete profile with every number written down (host-cpu's detected fields filled
    in), under another name."""
    text = (BUILTIN_DIR / "host-cpu.toml").read_text().replace('name = "host-cpu"',
                                                                f'name = "{name}"')
    text = text.replace('detect = "host"', 'device = "a test board"\ncores = 2')
    return text.replace("[budgets]", """[hardware.peak_gmacs_per_core]
fp32 = 10.0
fp16 = 10.0
int8 = 20.0

[budgets]""") + """"hardware.cores" = "the test's board"
"hardware.peak_gmacs_per_core.fp32" = "the test's board"
"hardware.peak_gmacs_per_core.fp16" = "the test's board"
"hardware.peak_gmacs_per_core.int8" = "the test's board"
"""


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


def test_user_profile_folders_are_searched_and_passed_not_read_from_the_environment(
        tmp_path, monkeypatch):
    _write_profile(tmp_path, "my-board", _valid_text("my-board"))
    monkeypatch.setenv("EDGEPACK_PROFILES_DIR", str(tmp_path))
    with pytest.raises(UsageError):  # the library reads no environment variable ...
        load_profile("my-board")
    assert ProfileSearch((tmp_path,)).load("my-board").name == "my-board"  # ... it is told
    result = CliRunner().invoke(cli, ["profiles"])  # the command line reads the variable
    assert result.exit_code == 0 and "my-board" in result.output
    monkeypatch.delenv("EDGEPACK_PROFILES_DIR")
    dropped = ProfileSearch().data_dir / "profiles"  # the user's data folder (XDG)
    dropped.mkdir(parents=True, exist_ok=True)
    _write_profile(dropped, "dropped-in", _valid_text("dropped-in"))
    try:
        assert load_profile("dropped-in").path.parent == dropped
    finally:
        (dropped / "dropped-in.toml").unlink()


def test_the_host_profile_describes_this_machine():
    """host-cpu is detected, not written down: it names this CPU, its flags and cores."""
    from toolchain.host import detect

    cpu = detect()
    p = load_profile("host-cpu")
    assert p.device == cpu.description and p.cores == cpu.cores
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                      if line.startswith("model name")), None)
        if model:
            assert model in p.device
        flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                          if line.startswith("flags")), []))
        for flag in ("avx2", "avx512f", "avx512_vnni"):
            assert (flag in p.device) == (flag in flags)
        vnni = bool({"avx512_vnni", "avx_vnni"} & flags)
        assert p.peak_gmacs_per_core["int8"] == pytest.approx(
            p.peak_gmacs_per_core["fp32"] * (4 if vnni else 2))
    assert all(p.sources[f"hardware.peak_gmacs_per_core.{k}"].startswith("detected")
               for k in PRECISIONS)


def test_a_detected_profile_reports_another_cpu_as_that_cpu(monkeypatch):
    """On an AVX2-only CPU without VNNI the host profile must say so, and cost int8 at
    twice the fp32 rate, not four times."""
    from toolchain import host

    fake = host.HostCPU("AMD EPYC 7B12", 2, frozenset({"avx2", "fma"}), 2.25, "test", "x86_64")
    monkeypatch.setattr(host, "detect", lambda: fake)
    p = load_profile("host-cpu")
    assert "AMD EPYC 7B12" in p.device and "avx512" not in p.device and "vnni" not in p.device
    assert p.peak_gmacs_per_core["fp32"] == pytest.approx(2 * 8 * 2.25, rel=0.01)
    assert p.peak_gmacs_per_core["int8"] == pytest.approx(2 * p.peak_gmacs_per_core["fp32"])


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


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda t: t.replace("per_kernel_us = 0.25", "per_kernel_us = -1.0"),
         "latency.per_kernel_us"),
        (lambda t: t.replace("per_kernel_us = 0.25", "per_kernel_us = nan"),
         "latency.per_kernel_us"),
        (lambda t: t.replace("per_inference_us = 3.0", "per_inference_us = inf"),
         "latency.per_inference_us"),
        (lambda t: t.replace("per_inference_us = 3.0", 'per_inference_us = "3"'),
         "latency.per_inference_us"),
        (lambda t: t.replace("tail_ratio_p95 = 1.2", "tail_ratio_p95 = 81.0"),
         "latency.tail_ratio_p95"),
        (lambda t: t.replace("tail_ratio_p95 = 1.2", "tail_ratio_p95 = 0.5"),
         "latency.tail_ratio_p95"),
        (lambda t: t.replace('executor = "cpu"', 'executor = "fpga"'), "latency.executor"),
        (lambda t: t.replace('executor = "cpu"', 'executor = "gpu"'),
         "latency.compute_efficiency"),
        (lambda t: t.replace('"latency.tail_ratio_p95" =', '"latency.tail" ='),
         "latency.tail_ratio_p95"),
    ],
)
def test_hostile_fixed_costs_are_refused_with_the_field(tmp_path, edit, field):
    """The [latency] table sets floors and tails of every estimate: a negative, infinite,
    absurd or unsourced value is refused, naming the file and the field."""
    path = _write_profile(tmp_path, "bad", edit(_valid_text("bad")))
    with pytest.raises(UsageError) as err:
        load_profile_file(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_a_profile_without_a_latency_table_loads_with_stated_defaults(tmp_path):
    """Profiles users wrote before [latency] existed keep working; the estimate says its
    fixed costs were assumed."""
    import re

    from toolchain.latency.floors import floor_note

    text = re.sub(r"\[latency\][^\[]*", "", _valid_text("old"))
    text = "\n".join(line for line in text.splitlines() if not line.startswith('"latency.'))
    profile = load_profile_file(_write_profile(tmp_path, "old", text))
    assert profile.fixed.assumed and profile.fixed.executor == "cpu"
    assert profile.fixed.per_kernel_us > 0 and profile.fixed.tail_ratio_p95 >= 1
    assert "assumed" in floor_note([], profile)
