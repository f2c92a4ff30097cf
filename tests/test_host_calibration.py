"""The latency cost model follows the CPU it runs on: fits are keyed by a CPU signature, a fit
from another CPU is never "this host", and a CPU without a fit calibrates itself on first use.

Fake CPUs are presented by pointing `toolchain.host.CPUINFO` at a /proc/cpuinfo of our own;
everything else (exports, sessions, measurements) is real."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import targets
from tests.conftest import toolchain
from toolchain import host as host_mod
from toolchain.cli import cli
from toolchain.latency import costmodel, fitstore, floors, selfcal
from toolchain.latency.calibrate import Measured
from toolchain.latency.micromodels import QUICK
from toolchain.profiles import ProfileSearch

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
cpu MHz\t\t: 2445.406
flags\t\t: fpu sse sse2 avx fma avx2

processor\t: 1
vendor_id\t: AuthenticAMD
"""

XEON_VNNI = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
stepping\t: 8
cpu MHz\t\t: 2700.000
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512_vnni avx512_bf16 amx_int8
"""


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """present(text) makes `toolchain.host.detect()` read `text` as /proc/cpuinfo."""

    def present(text: str) -> host_mod.HostCPU:
        path = tmp_path / f"cpuinfo-{abs(hash(text))}"
        path.write_text(text)
        monkeypatch.setattr(host_mod, "CPUINFO", path)
        host_mod.detect.cache_clear()
        return host_mod.detect()

    yield present
    host_mod.detect.cache_clear()


@pytest.fixture
def search(tmp_path) -> ProfileSearch:
    return ProfileSearch(data_dir=tmp_path / "data")


def test_the_signature_names_the_cpu_and_changes_with_it(fake_cpu):
    epyc = fake_cpu(EPYC_AVX2)
    assert epyc.signature.startswith("amd-epyc-")
    assert fake_cpu(EPYC_AVX2).signature == epyc.signature  # stable
    xeon = fake_cpu(XEON_VNNI)
    assert xeon.signature != epyc.signature
    assert xeon.vnni and "avx512_vnni" in xeon.record()["flags"]
    # the same model name with other flags (a VM that hides AVX2) is another CPU
    assert fake_cpu(EPYC_AVX2.replace(" avx2", "")).signature != epyc.signature
    # and so is another generation under the same generic name
    assert fake_cpu(EPYC_AVX2.replace("model\t\t: 1", "model\t\t: 17")).signature \
        != epyc.signature
    record = epyc.record()
    assert record["signature"] == epyc.signature and record["peak_fp32_gmacs_per_core"] > 0


def _toy_fit(cpu: host_mod.HostCPU, scale: float) -> costmodel.Fit:
    """A full fit made (by the real NNLS) from rows of the reference's own predictions times
    `scale`: what a refit on a CPU `scale` times slower than the reference's would find."""
    ref = fitstore.reference_fits(ProfileSearch())["onnxruntime/fp32"].vector()
    rng = np.random.default_rng(0)
    rows = [(f, float(f @ ref) * scale) for f in rng.uniform(0, 1, (40, len(ref)))]
    fitted = costmodel.fit(rows, "onnxruntime", "fp32")
    fitted.cpu = cpu.record()
    return fitted


def _demo_ops() -> list:
    from targets.base import Op

    return [Op("conv", "conv", "fp32", 2_000_000, 40_000),
            Op("relu", "elementwise", "fp32", 16_000, 64_000),
            Op("fc", "matmul", "fp32", 100_000, 4_000)]


def test_a_fit_of_one_cpu_is_not_this_hosts_on_another(fake_cpu, search, monkeypatch):
    """The acceptance test: CPU A's fit is A's; on CPU B it is neither used nor called this
    host's, and B's estimate says which CPU its factors come from."""
    monkeypatch.setenv(selfcal.ENV, "auto")
    onnx = targets.get("onnxruntime")
    a = fake_cpu(EPYC_AVX2)
    fit_a = _toy_fit(a, 3.0)
    fitstore.save(fit_a, search, a)
    host_a = search.load("host-cpu")
    on_a = costmodel.estimate(_demo_ops(), host_a, onnx, "fp32", host_a, search=search)
    assert on_a["fit"]["native"] and on_a["fit"]["cpu_signature"] == a.signature
    assert "on this host" in on_a["method"]

    b = fake_cpu(XEON_VNNI)
    assert b.signature != a.signature
    host_b = search.load("host-cpu")
    assert host_b.device.startswith("Intel(R) Xeon")
    choice = fitstore.choose(search, b, onnx, "fp32")
    assert not choice.native and choice.fit.cpu.get("signature") != a.signature
    on_b = costmodel.estimate(_demo_ops(), host_b, onnx, "fp32", host_b, search=search)
    assert not on_b["fit"]["native"]
    assert "not this host" in on_b["method"] and "on this host" not in on_b["method"]
    assert on_b["fit"]["cpu"] == fitstore.reference(search, onnx, "fp32").cpu_description
    # B's figure is the reference's, transferred; A's fit (3x the reference) would differ
    ops = _demo_ops()
    by_reference = costmodel.predict_ms(fitstore.reference(search, onnx, "fp32").fit, ops,
                                        host_b, host_b, native=False)
    by_a = costmodel.predict_ms(fit_a, ops, host_b, host_b, native=True)
    assert on_b["p50"] == pytest.approx(max(by_reference, on_b["lower_bound_ms"]), abs=1e-4)
    assert abs(on_b["p50"] - by_a) > 0.3 * by_a
    assert selfcal.needed("onnxruntime", "fp32", search) is True  # B still needs its own
    # and A's file is A's alone
    assert fitstore.cpu_file(search, a).exists() and not fitstore.cpu_file(search, b).exists()


@pytest.mark.slow
def test_the_profile_report_never_calls_another_cpus_fit_this_host(tmp_path):
    """`toolchain profile` on a CPU with no fit of its own (calibration off): the estimate is
    labelled with the reference's CPU."""
    model = tmp_path / "m.onnx"
    _export_small_onnx(model)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), selfcal.ENV: "off"}
    proc = toolchain("profile", model, "--target", "host-cpu", "--runs", "20",
                     "--min-seconds", "0.1", env=env, timeout=300)
    assert proc.returncode in (0, 3), proc.stderr
    assert "(not this host)" in proc.stdout and "the estimator on this host" not in proc.stdout
    assert "calibrating" not in proc.stderr


def _export_small_onnx(path: Path) -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 14 * 14, 10)).eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), str(path), dynamo=True,
                      external_data=False)


@pytest.mark.parametrize("damage", [
    b"{not json", b"", b'{"fits": []}', b'{"cpu": {"signature": 3}, "fits": {}}',
    json.dumps({"cpu": {"signature": "x"}, "fits": {"onnxruntime/fp32": {
        "backend": "onnxruntime", "precision": "fp32", "fit_date": "d", "models": 1,
        "host_profile": "host-cpu", "train_mape": 0.1,
        "coefficients": dict.fromkeys(costmodel.FEATURES, -1.0)}}}).encode(),
    json.dumps({"cpu": {"signature": "x"}, "fits": {"onnxruntime/fp32": {
        "backend": "onnxruntime", "precision": "fp32", "fit_date": "d", "models": 1,
        "host_profile": "host-cpu", "train_mape": 0.1,
        "coefficients": {"conv": 1.0}}}}).encode(),
    b" " * (fitstore.MAX_FIT_FILE_BYTES + 1),
    b"[" * 200_000,
    *[json.dumps({"cpu": {"signature": "x"}, "fits": {"onnxruntime/fp32": {
        "backend": "onnxruntime", "precision": "fp32", "fit_date": "d", "models": 1,
        "host_profile": "host-cpu", "train_mape": 0.1,
        "coefficients": dict.fromkeys(costmodel.FEATURES, 0.5), **bad}}}).encode()
      for bad in ({"cpu": "amd"}, {"cpu": {"peak_fp32_gmacs_per_core": "0"}},
                  {"cpu": {"peak_fp32_gmacs_per_core": 0}}, {"models": "12"},
                  {"wall_s": "fast"}, {"train_mape": float("nan")}, {"method": 3})],
], ids=["truncated", "empty", "fits-not-object", "bad-cpu", "negative", "missing", "huge",
        "deep", "cpu-text", "peak-text", "peak-zero", "models-text", "wall-text", "mape-nan",
        "method-number"])
def test_a_damaged_fit_file_is_refused_and_replaced(fake_cpu, search, damage, monkeypatch):
    monkeypatch.setenv(selfcal.ENV, "auto")
    cpu = fake_cpu(EPYC_AVX2)
    path = fitstore.cpu_file(search, cpu)
    path.parent.mkdir(parents=True)
    path.write_bytes(damage)
    with pytest.raises(fitstore.FitFileError) as err:
        fitstore.host_fits(search, cpu)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    # estimates pass over it (the reference, labelled as another CPU's) ...
    choice = fitstore.choose(search, cpu, targets.get("onnxruntime"), "fp32")
    assert choice is not None and not choice.native
    assert selfcal.needed("onnxruntime", "fp32", search)
    # ... and the next fit replaces it whole
    fitstore.save(_toy_fit(cpu, 2.0), search, cpu)
    assert set(fitstore.host_fits(search, cpu)) == {"onnxruntime/fp32"}
    assert not list(path.parent.glob("*.tmp"))


def test_a_fit_file_of_another_cpu_under_this_name_is_refused(fake_cpu, search):
    a = fake_cpu(EPYC_AVX2)
    fitstore.save(_toy_fit(a, 2.0), search, a)
    b = fake_cpu(XEON_VNNI)
    fitstore.cpu_file(search, a).rename(fitstore.cpu_file(search, b))
    with pytest.raises(fitstore.FitFileError, match="made for CPU"):
        fitstore.host_fits(search, b)


def test_the_shipped_reference_records_its_cpu():
    cpu, fits = fitstore.read(fitstore.reference_files(ProfileSearch())[1])
    assert {"onnxruntime/fp32", "litert/int8"} <= set(fits)
    assert cpu["signature"] == fitstore.UNRECORDED and "not recorded" in cpu["description"]
    for fit in fits.values():
        assert fit.models >= 20 and fit.method == "full"


def test_rescaling_recovers_a_cpu_that_is_slower_per_kind():
    """Rows made by a CPU 3x slower on convolutions and 1.5x on the rest: the per-kind factors
    come back, and a kind no row exercises takes the overall factor."""
    reference = fitstore.reference_fits(ProfileSearch())["onnxruntime/fp32"]
    ref = reference.vector()
    index = {n: i for i, n in enumerate(costmodel.FEATURES)}
    true = ref * 1.5
    for k in selfcal.GROUPS["conv"]:
        true[index[k]] = ref[index[k]] * 3.0
    rng = np.random.default_rng(1)
    feats = rng.uniform(0, 1, (30, len(ref)))
    feats[:, [index[k] for k in selfcal.GROUPS["pooling"]]] = 0  # no pooling measured
    rows = [(f, float(f @ true)) for f in feats]
    coefficients, factors = selfcal.rescale(reference, rows, ridge=0.05)
    assert factors["conv"] == pytest.approx(3.0, rel=0.05)
    assert factors["matmul"] == pytest.approx(1.5, rel=0.05)
    overall = factors["pooling"]
    assert 1.5 <= overall <= 3.0  # the geometric mean of what was measured
    assert coefficients["compute_conv"] == pytest.approx(3.0 * reference.coefficients[
        "compute_conv"], rel=0.05)


def test_a_busy_measurement_is_named():
    steady = list(np.random.default_rng(0).normal(1.0, 0.02, 300))
    assert floors.host_stretch_note(steady) is None
    busy = steady[:150] + [2.2 * t for t in steady[150:180]] + steady[180:]
    note = floors.host_stretch_note(busy)
    assert note and "busy" in note and "p95" in note
    calm = [Measured("a", [], 1.0, [1.0, 1.05, 1.1]), Measured("b", [], 2.0, [2.0, 2.1, 2.0])]
    assert selfcal.busy(calm, 0.1) == (pytest.approx(0.075, abs=0.01), "")
    noisy = [Measured("a", [], 1.0, [1.0, 2.0, 1.9]), Measured("b", [], 2.0, [2.0, 4.2, 2.0])]
    spread, note = selfcal.busy(noisy, 2.5)
    assert spread > 0.9 and "busy" in note and "load average 2.5" in note


def test_one_calibration_at_a_time_per_cpu(search):
    cpu = host_mod.detect()
    waited, said = [], []

    def other() -> None:
        with selfcal.cpu_lock(search, cpu, 0.3, said.append) as got:
            waited.append(got)

    with selfcal.cpu_lock(search, cpu, 1.0) as got:
        assert got
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert waited == [False] and "waiting for another process" in said[0]
    with selfcal.cpu_lock(search, cpu, 0.3) as got:
        assert got


def test_calibration_can_be_turned_off(monkeypatch, search):
    monkeypatch.setenv(selfcal.ENV, "off")
    assert not selfcal.needed("onnxruntime", "fp32", search)
    assert selfcal.ensure_host_fit("onnxruntime", "fp32", search, log=print) is None
    monkeypatch.setenv(selfcal.ENV, "auto")
    assert selfcal.needed("onnxruntime", "fp32", search)


def test_profiles_host_shows_the_signature_and_the_reference(fake_cpu, tmp_path,
                                                            monkeypatch):
    cpu = fake_cpu(XEON_VNNI)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["profiles", "host", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["cpu"]["signature"] == cpu.signature and record["own_fits"] == {}
    assert "onnxruntime/fp32" in record["reference_fits"]


# --- real calibrations --------------------------------------------------------------------

CPU_BACKENDS = sorted(targets.BACKENDS)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_calibrates_on_this_cpu_or_says_why_not(backend, search, monkeypatch):
    """Parametrized over the registry: a backend that builds and runs here calibrates (a few
    real micro-models, real sessions) into this CPU's file; one that cannot, or that no
    reference fit covers, is never tried."""
    monkeypatch.setenv(selfcal.ENV, "auto")
    plugin = targets.get(backend)
    precision = "int8" if backend == "litert" else "fp32"
    if (plugin.run_unavailable_reason() or plugin.build_unavailable_reason()
            or fitstore.reference(search, plugin, precision) is None):
        assert not selfcal.needed(backend, precision, search)
        assert selfcal.ensure_host_fit(backend, precision, search) is None
        return
    cpu = host_mod.detect()
    lines: list[str] = []
    fitted = selfcal.calibrate(backend, precision, search, lines.append, cpu,
                               export_budget_s=0.0, min_models=3)
    assert fitted.method == "calibration" and fitted.models >= 2
    assert fitted.cpu["signature"] == cpu.signature and fitted.wall_s > 0
    assert all(np.isfinite(list(fitted.coefficients.values())))
    assert any(f"round {selfcal.ROUNDS}/{selfcal.ROUNDS}" in line for line in lines)  # progress
    assert fitstore.host_fits(search, cpu)[f"{backend}/{precision}"].base == fitted.base
    choice = fitstore.choose(search, cpu, plugin, precision)
    assert choice.native and "on this host" in choice.describe()
    assert not selfcal.needed(backend, precision, search)


@pytest.mark.slow
def test_toolchain_profile_calibrates_a_new_cpu_once(tmp_path):
    """First `toolchain profile` on a CPU with no fit: the calibration runs (progress on
    stderr, wall time reported) and the estimate is this host's; the second run reuses it."""
    model = tmp_path / "m.onnx"
    _export_small_onnx(model)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), selfcal.ENV: "auto"}
    args = ("profile", model, "--target", "host-cpu", "--runs", "20", "--min-seconds", "0.1")
    first = toolchain(*args, env=env, timeout=600)
    assert first.returncode in (0, 3), first.stderr
    assert "calibrating the latency cost model for this CPU" in first.stderr
    assert f"[1/{len(QUICK)}]" in first.stderr and f"round 1/{selfcal.ROUNDS}" in first.stderr
    assert "calibrated onnxruntime/fp32 on this CPU in" in first.stdout
    assert "the estimator on this host" in first.stdout and "not this host" not in first.stdout
    files = list((tmp_path / "xdg" / "edgepack" / "fits").glob("*.json"))
    assert [f.stem for f in files] == [host_mod.detect().signature]
    second = toolchain(*args, env=env, timeout=600)
    assert second.returncode in (0, 3), second.stderr
    assert "calibrating" not in second.stderr and "the estimator on this host" in second.stdout


def test_a_fit_file_that_is_not_a_regular_file_is_refused(fake_cpu, search):
    cpu = fake_cpu(EPYC_AVX2)
    path = fitstore.cpu_file(search, cpu)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)  # reading it would never end
    with pytest.raises(fitstore.FitFileError, match="not a regular file"):
        fitstore.host_fits(search, cpu)


def test_a_data_folder_that_cannot_be_written_does_not_fail_the_estimate(tmp_path,
                                                                       monkeypatch):
    """The calibration reports the failure in one line; the estimate goes on with the
    reference, labelled as another CPU's."""
    monkeypatch.setenv(selfcal.ENV, "auto")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should be")
    search = ProfileSearch(data_dir=blocker / "edgepack")
    line = selfcal.ensure_host_fit("onnxruntime", "fp32", search, log=lambda _: None)
    assert line and "failed" in line and "\n" not in line
    choice = fitstore.choose(search, host_mod.detect(), targets.get("onnxruntime"), "fp32")
    assert choice is not None and not choice.native


def test_the_asked_precision_comes_before_a_stand_in(fake_cpu, search):
    """This CPU has only an fp32 fit; for int8 the reference's own int8 fit is used (another
    CPU's, and labelled so), not this CPU's fp32 factors."""
    cpu = fake_cpu(EPYC_AVX2)
    fitstore.save(_toy_fit(cpu, 2.0), search, cpu)
    litert = targets.get("litert")
    assert "litert/int8" in fitstore.reference_fits(search)
    choice = fitstore.choose(search, cpu, litert, "int8")
    assert choice.key == "litert/int8" and not choice.native and choice.note == ""
    onnx_int8 = fitstore.choose(search, cpu, targets.get("onnxruntime"), "int8")
    assert onnx_int8.key == "onnxruntime/fp32" and onnx_int8.native  # the stand-in, said so
    assert "no fit for onnxruntime/int8" in onnx_int8.note
