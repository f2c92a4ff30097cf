"""A non-editable install works on its own: the wheel carries the hardware profiles and the
cost-model fit, and a fresh virtual environment with it lists the profiles and builds the demo
from a folder far from this checkout. The dependencies come from the test environment (a .pth
file points at its site-packages) so the test needs no network; the package itself is the
wheel, installed without -e."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_exit, run_cmd

# The fresh environment must see only its own install: no PYTHONPATH pointing at a checkout.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
SOURCES = ("toolchain", "targets", "runtime", "hardware-profiles", "pyproject.toml", "setup.py",
           "README.md")


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:  # a copy, so the build leaves nothing in the checkout
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    proc = run_cmd(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "-q", "-w", work / "wheel", src, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (work / "wheel").glob("edgepack-*.whl")
    venv = work / "venv"
    proc = run_cmd(sys.executable, "-m", "venv", "--without-pip", venv)
    assert proc.returncode == 0, proc.stderr
    proc = run_cmd(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
                   "-q", "--no-deps", wheel)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = Path(run_cmd(venv / "bin" / "python", "-c",
                        "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                        env=CLEAN_ENV).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_ships_profiles_and_fits(fresh_venv, tmp_path):
    python = fresh_venv / "bin" / "python"
    proc = run_cmd(python, "-c", "import toolchain.profiles as p, toolchain; "
                   "print(p.BUILTIN_DIR); print(toolchain.__file__)", cwd=tmp_path, env=CLEAN_ENV)
    assert proc.returncode == 0, proc.stderr
    builtin, package = (Path(line) for line in proc.stdout.split())
    assert str(fresh_venv) in str(package), "the wheel's package, not the checkout"
    assert builtin.parent == package.parent and builtin.name == "hardware_profiles"
    assert (builtin / "fits" / "costmodel.json").is_file()
    proc = run_cmd(fresh_venv / "bin" / "toolchain", "profiles", "--json", cwd=tmp_path,
                   env=CLEAN_ENV)
    assert proc.returncode == 0, proc.stderr
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert {"cloud-gpu", "smartphone", "smart-speaker", "host-cpu", "edge-x86",
            "raspberry-pi-4"} <= names


def test_the_installed_toolchain_builds_the_demo(fresh_venv, tmp_path):
    proc = run_cmd(fresh_venv / "bin" / "toolchain", "build", "--target", "host-cpu",
                   "--epochs", "2", "--bench-runs", "10", "--out", tmp_path / "out", "--json",
                   tmp_path / "r.json", "--quiet", cwd=tmp_path, env=CLEAN_ENV)
    assert_exit(proc.returncode, 0, tmp_path / "r.json", proc.stderr)
    (bundle,) = (tmp_path / "out").glob("*.edgepack")
    proc = run_cmd(fresh_venv / "bin" / "edge-runtime", "verify", bundle, cwd=tmp_path,
                   env=CLEAN_ENV)
    assert proc.returncode == 0 and "self-test passed" in proc.stdout, proc.stdout + proc.stderr
    assert not (REPO / "build" / "lib").exists()  # nothing was built inside the checkout
    assert subprocess.run(["git", "status", "--porcelain", "--ignored", "toolchain"],
                          cwd=REPO, capture_output=True, text=True).stdout.count("egg-info") == 0
