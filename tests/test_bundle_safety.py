"""Bundles that are corrupted, truncated, unsafe or not bundles at all are refused by
`verify` and by the Python API, with a clear message, and nothing lands outside the
extraction folder."""

import gzip
import io
import tarfile
from pathlib import Path

import pytest

import runtime
from runtime.bundle import MANIFEST, BundleError, extract_bundle, write_bundle
from tests.conftest import BIN, run_cmd


def _repack(src: Path, dst: Path, edit) -> Path:
    """Rewrite a bundle's members through `edit(list of (TarInfo, bytes))`, with the same
    gzip framing our writer uses, so only the member checks can catch the change."""
    with tarfile.open(src, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]
    members = edit(members)
    with open(dst, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                               compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return dst


def _entry(name: str, data: bytes = b"x", kind=tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


@pytest.fixture(scope="module")
def good(build_demo) -> Path:
    return build_demo("host-cpu").bundle


def _bad_bundles(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True)
    data = good.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}

    def flipped(offset: int) -> Path:
        b = bytearray(data)
        b[offset] ^= 0x01
        path = folder / f"flip-{offset}.edgepack"
        path.write_bytes(bytes(b))
        return path

    for offset in (5, 100, len(data) // 2, len(data) - 6):
        cases[f"byte {offset} changed"] = (flipped(offset), "corrupted")
    truncated = folder / "truncated.edgepack"
    truncated.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (truncated, "truncated")
    notbundle = folder / "notes.edgepack"
    notbundle.write_text("this is not a bundle\n")
    cases["not a bundle"] = (notbundle, "not an edgepack bundle")
    cases["entry escapes with ../"] = (
        _repack(good, folder / "escape.edgepack", lambda m: [*m, _entry("../x", b"pwned")]),
        "unsafe entry '../x'")
    cases["absolute entry"] = (
        _repack(good, folder / "abs.edgepack", lambda m: [_entry("/tmp/x"), *m]),
        "unsafe entry '/tmp/x'")
    cases["symlink entry"] = (
        _repack(good, folder / "symlink.edgepack",
                lambda m: [*m, _entry("model/evil", kind=tarfile.SYMTYPE, link="/etc/passwd")]),
        "link")
    cases["hard link entry"] = (
        _repack(good, folder / "hardlink.edgepack",
                lambda m: [*m, _entry("golden/h", kind=tarfile.LNKTYPE, link=MANIFEST)]),
        "link")

    def swap_model_bytes(members):
        out = []
        for info, blob in members:
            if info.name.startswith("model/"):
                blob = blob[:-1] + bytes([blob[-1] ^ 0xFF])
            out.append((info, blob))
        return out

    cases["model file altered, archive rebuilt"] = (
        _repack(good, folder / "altered.edgepack", swap_model_bytes), "sha256 mismatch")
    cases["extra file"] = (
        _repack(good, folder / "extra.edgepack", lambda m: [*m, _entry("extra.bin")]),
        "not listed in the manifest")
    cases["no manifest"] = (
        _repack(good, folder / "nomanifest.edgepack",
                lambda m: [e for e in m if e[0].name != MANIFEST]), "no manifest.json")
    return cases


def test_bad_bundles_are_refused(good, tmp_path):
    cases = _bad_bundles(good, tmp_path / "cases")
    for label, (path, message) in cases.items():
        # the Python API
        extract_to = tmp_path / "api" / path.stem
        with pytest.raises(BundleError, match=message.replace("(", r"\(")) as err:
            runtime.load(path, workdir=extract_to)
        assert str(err.value), label
        left = list(extract_to.iterdir()) if extract_to.exists() else []
        assert not left, f"{label}: files left in the extraction folder"
        # the command line
        proc = run_cmd(BIN / "edge-runtime", "verify", path)
        assert proc.returncode != 0, label
        assert message in proc.stderr, (label, proc.stderr)
        assert "Traceback" not in proc.stderr, label
    # nothing escaped: the only things under tmp_path are what the test made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api", "cases"]
    assert not (tmp_path / "x").exists() and not Path("/tmp/x").exists()


def test_good_bundle_extracts_only_its_files(good, tmp_path):
    manifest = extract_bundle(good, tmp_path / "ok")
    files = sorted(p.relative_to(tmp_path / "ok").as_posix()
                   for p in (tmp_path / "ok").rglob("*") if p.is_file())
    assert files == sorted([*manifest.files, MANIFEST])


def test_extraction_refuses_a_non_empty_folder(good, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        extract_bundle(good, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def _signed_copy(good: Path, folder: Path, key) -> Path:
    plain = folder / "plain"
    manifest = extract_bundle(good, plain)
    files = {name: plain / name for name in manifest.files}
    return write_bundle(folder / "signed.edgepack", manifest.to_dict(), files, key=key)


def test_signed_bundles(good, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key, wrong = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = _signed_copy(good, tmp_path, key)
    with runtime.load(signed, trust=trust_of(key)) as model:
        assert model.self_test().ok
    with pytest.raises(BundleError, match="unknown key id"):
        runtime.load(signed, trust=trust_of(wrong))
    with pytest.raises(BundleError, match="unsigned"):
        runtime.load(good, trust=trust_of(key))
    # tampering, revoked keys, rotation and malformed signatures: tests/adversarial/test_signing.py


def trust_of(private):
    """A trust store that trusts this private key's public half."""
    from runtime.signing import key_id, parse_trust, public_key_b64

    public = private.public_key()
    return parse_trust({"key": [{"id": key_id(public), "public_key": public_key_b64(public)}]})


def test_golden_mismatch_fails_verify(good, tmp_path):
    """A bundle whose golden outputs disagree with its model fails the self-test."""
    import numpy as np

    plain = tmp_path / "plain"
    manifest = extract_bundle(good, plain)
    outputs = np.load(plain / "golden/outputs.npy")
    np.save(plain / "golden/outputs.npy", outputs + 1.0)
    files = {name: plain / name for name in manifest.files}
    bad = write_bundle(tmp_path / "badgolden.edgepack", manifest.to_dict(), files)
    proc = run_cmd(BIN / "edge-runtime", "verify", bad)
    assert proc.returncode == 1 and "golden self-test FAILED" in proc.stdout
    with pytest.raises(BundleError, match="golden self-test FAILED"):
        runtime.load(bad)
