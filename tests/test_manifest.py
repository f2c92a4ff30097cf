"""The typed manifest: a real manifest reads and writes back byte for byte, and damaged
manifests are refused by the runtime with a message naming the field."""

import copy
import json
import tarfile
from pathlib import Path

import pytest

import runtime
from runtime.bundle import MANIFEST, BundleError, extract_bundle, write_bundle
from runtime.manifest import Manifest, ManifestError, parse_manifest
from tests.conftest import BIN, run_cmd
from tests.test_bundle_safety import _repack


@pytest.fixture(scope="module")
def good(build_demo) -> Path:
    return build_demo("host-cpu").bundle


def _manifest_bytes(bundle: Path) -> bytes:
    with tarfile.open(bundle, "r:gz") as tar:
        return tar.extractfile(MANIFEST).read()


def test_real_manifest_round_trips_unchanged(good):
    raw = _manifest_bytes(good)
    manifest = parse_manifest(raw)
    assert manifest.to_dict() == json.loads(raw)
    assert json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode() == raw
    # typed fields, not dicts
    assert manifest.target.backend == "onnxruntime" and manifest.target.threads == 2
    assert manifest.input.raw_shape == (1, 32, 32) and manifest.input.tensor.dtype == "float32"
    assert manifest.golden.count == 8 and manifest.golden.atol > 0
    assert manifest.metrics.final.latency_ms.source == "measured-host"
    assert manifest.metrics.gate.passed is True
    assert "stages" in manifest.metrics.extra
    assert manifest.files[manifest.model_file].size > 0


def test_rewritten_bundle_has_the_same_manifest(good, tmp_path):
    """Writing the typed manifest back gives the same manifest.json as the build wrote."""
    manifest = extract_bundle(good, tmp_path / "plain")
    assert isinstance(manifest, Manifest)
    files = {name: tmp_path / "plain" / name for name in manifest.files}
    again = write_bundle(tmp_path / "again.edgepack", manifest.to_dict(), files)
    assert _manifest_bytes(again) == _manifest_bytes(good)


def _set(path: str, value=None, delete: bool = False):
    """An edit of the manifest dict at a dotted path (file names hold no dots here)."""
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        for part in parents:
            m = m[part]
        if delete:
            del m[last]
        else:
            m[last] = value
    return edit


def _drop_model_sha(m: dict) -> None:
    del m["files"][m["model_file"]]["sha256"]


DAMAGED = {
    "no target.backend": (_set("target.backend", delete=True),
                          "manifest field 'target.backend' is missing"),
    "threads as a string": (_set("target.threads", "x"),
                            "manifest field 'target.threads' must be a positive integer, "
                            "got 'x'"),
    "threads zero": (_set("target.threads", 0), "'target.threads' must be a positive integer"),
    "negative atol": (_set("golden.atol", -0.1),
                      "manifest field 'golden.atol' must be a number >= 0, got -0.1"),
    "no atol": (_set("golden.atol", delete=True), "manifest field 'golden.atol' is missing"),
    "raw_shape with a zero": (_set("input.raw_shape", [1, 0, 32]),
                              "'input.raw_shape' must be a list of positive integers, "
                              "got [1, 0, 32]"),
    "raw_shape not a list": (_set("input.raw_shape", "1x32x32"),
                             "'input.raw_shape' must be a list of positive integers"),
    "raw_shape of floats": (_set("input.raw_shape", [1.0, 32, 32]),
                            "'input.raw_shape' must be a list of positive integers"),
    "files entry without sha256": (_drop_model_sha,
                                   "manifest field 'files.model/model.onnx.sha256' is missing"),
    "unknown schema version": (_set("schema_version", 2),
                               "manifest field 'schema_version' must be 1 (the version this "
                               "runtime reads), got 2"),
    "model file outside the files table": (_set("model_file", "../../etc/passwd"),
                                           "'model_file' must be a file listed in 'files'"),
    "labels not strings": (_set("output.labels", [0, 1]),
                           "'output.labels' must be a list of strings"),
    "accuracy as text": (_set("metrics.final.accuracy", "high"),
                         "'metrics.final.accuracy' must be a number >= 0 and <= 1"),
    "run_needs_torch as text": (_set("target.run_needs_torch", "no"),
                                "'target.run_needs_torch' must be true or false"),
}


def _damaged(good: Path, folder: Path, edit) -> Path:
    """The good bundle with its manifest.json edited and nothing else changed (unsigned, so
    only the manifest reader stands between the edit and the runtime)."""
    def members(entries):
        out = []
        for info, blob in entries:
            if info.name == MANIFEST:
                m = json.loads(blob)
                edit(m)
                blob = json.dumps(m, indent=2, sort_keys=True).encode()
                info.size = len(blob)
            out.append((info, blob))
        return out

    folder.mkdir(parents=True, exist_ok=True)
    return _repack(good, folder / "damaged.edgepack", members)


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_manifest_is_refused_naming_the_field(good, tmp_path, case):
    edit, message = DAMAGED[case]
    bad = _damaged(good, tmp_path / "cases", edit)
    with pytest.raises(BundleError) as err:
        runtime.load(bad, workdir=tmp_path / "api")
    assert message in str(err.value)
    assert isinstance(err.value, ManifestError)
    assert not list((tmp_path / "api").iterdir()), "files left in the extraction folder"
    proc = run_cmd(BIN / "edge-runtime", "verify", bad)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_reader_checks_without_a_bundle(good):
    raw = json.loads(_manifest_bytes(good))
    with pytest.raises(ManifestError, match=r"'\(top level\)' must be an object, got \[\]"):
        Manifest.from_dict([])
    broken = copy.deepcopy(raw)
    broken["golden"]["min_top1_agreement"] = 1.5
    with pytest.raises(ManifestError, match="'golden.min_top1_agreement' must be a number"):
        Manifest.from_dict(broken)
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{not json")
    # an older manifest without the optional fields still reads, with their defaults
    old = copy.deepcopy(raw)
    del old["target"]["budgets"], old["golden"]["min_top1_agreement"]
    manifest = Manifest.from_dict(old)
    assert manifest.target.budgets == {} and manifest.golden.min_top1_agreement == 1.0


def test_package_refuses_a_manifest_pointing_at_missing_files(good, tmp_path):
    from toolchain.build.package import package

    manifest = parse_manifest(_manifest_bytes(good))
    with pytest.raises(ValueError, match="model_file = model/model.onnx"):
        package(tmp_path / "x.edgepack", manifest, {})
    assert not (tmp_path / "x.edgepack").exists()
