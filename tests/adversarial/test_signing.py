"""Ed25519 bundle signing against hostile input: keys, trust files, signature.json and the
bundles a device is handed. A device with a trust file runs only bundles signed by a
trusted, unrevoked key, and says in one line why it refused any other."""

from __future__ import annotations

import base64
import json
import os
import stat
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime
from runtime.bundle import MANIFEST, SIGNATURE, BundleError, extract_bundle, write_bundle
from runtime.signing import (
    SignatureError,
    TrustFileError,
    check_signature,
    key_id,
    load_private_key,
    load_trust,
    parse_trust,
    public_key_b64,
    read_signature,
    sign_manifest,
)
from tests.conftest import BIN, assert_exit, run_cmd, toolchain
from tests.test_bundle_safety import _entry, _repack

EDGE = BIN / "edge-runtime"


def _no_trace(proc) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]


def _trust_file(path: Path, keys: dict[str, Ed25519PrivateKey], revoked=()) -> Path:
    lines = [f"revoked = {json.dumps(list(revoked))}", ""]
    for name, private in keys.items():
        public = private.public_key()
        lines += ["[[key]]", f'id = "{key_id(public)}"',
                  f'public_key = "{public_key_b64(public)}"', f"name = {json.dumps(name)}", ""]
    path.write_text("\n".join(lines))
    return path


def _kid(private: Ed25519PrivateKey) -> str:
    return key_id(private.public_key())


# -- keys generate (fast) ------------------------------------------------------------------------
def test_keys_generate_writes_0600_private_key_and_prints_its_id(tmp_path):
    proc = toolchain("keys", "generate", "--out", tmp_path / "keys", "--name", "release-2026")
    assert proc.returncode == 0, proc.stderr
    private_path = tmp_path / "keys" / "release-2026.private.pem"
    public_path = tmp_path / "keys" / "release-2026.public.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8
    private = load_private_key(private_path)
    assert f"key id {_kid(private)}" in proc.stdout
    assert public_key_b64(private.public_key()) in proc.stdout  # the trust-file entry
    assert public_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [
        "release-2026.private.pem", "release-2026.public.pem"]


def test_keys_generate_refuses_to_overwrite_and_bad_names(tmp_path):
    keys = tmp_path / "keys"
    assert toolchain("keys", "generate", "--out", keys).returncode == 0
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    again = toolchain("keys", "generate", "--out", keys)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr, again.stderr
    # a public key alone in the way is refused too, and no private key is left behind
    (keys / "other.public.pem").write_text("someone's")
    third = toolchain("keys", "generate", "--out", keys, "--name", "other")
    assert third.returncode == 2 and "other.public.pem exists" in third.stderr
    escape = toolchain("keys", "generate", "--out", keys, "--name", "../escaped")
    assert escape.returncode == 2 and "key name" in escape.stderr
    for proc in (again, third, escape):
        _no_trace(proc)
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == {
        **before, "other.public.pem": b"someone's"}
    assert not (tmp_path / "escaped.private.pem").exists()


def test_build_refuses_a_retired_hmac_key_before_building(tmp_path):
    hmac_key = tmp_path / "shared.key"
    hmac_key.write_bytes(b"correct horse battery staple\n")
    proc = toolchain("build", "--target", "host-cpu", "--out", tmp_path / "out",
                     "--sign-key", hmac_key, "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "HMAC shared-key signing is retired" in proc.stderr
    assert "toolchain keys generate" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before any work


# -- trust files and signature.json (fast) ------------------------------------------------------
_GOOD = Ed25519PrivateKey.generate()
_GOOD_ID, _GOOD_B64 = _kid(_GOOD), public_key_b64(_GOOD.public_key())
_ENTRY = f'[[key]]\nid = "{_GOOD_ID}"\npublic_key = "{_GOOD_B64}"\n'
_GOOD_TRUST = parse_trust(tomllib.loads(_ENTRY))

BAD_TRUST = {
    "not TOML": ("[[key]\nid = ", "not valid TOML"),
    "unknown top-level field": (f'trusted = ["x"]\n{_ENTRY}', "trusted: unknown field"),
    "revoked placed under a [[key]]": (f'{_ENTRY}revoked = ["{_GOOD_ID}"]\n',
                                       "key[0].revoked: unknown field (put `revoked"),
    "no keys": ('revoked = []\n', "key: no [[key]] table"),
    "key is not a table array": ('key = "abc"\n', "key: must be [[key]] tables"),
    "id of wrong type": (f'[[key]]\nid = 7\npublic_key = "{_GOOD_B64}"\n', "key[0].id"),
    "id does not match the key": (
        f'[[key]]\nid = "0000000000000000"\npublic_key = "{_GOOD_B64}"\n',
        f"key[0].id: 0000000000000000 does not match public_key, whose id is {_GOOD_ID}"),
    "public key not base64": (f'[[key]]\nid = "{_GOOD_ID}"\npublic_key = "!!"\n',
                              "key[0].public_key: neither PEM nor base64"),
    "public key of 31 bytes": (
        f'[[key]]\nid = "{_GOOD_ID}"\npublic_key = "{base64.b64encode(bytes(31)).decode()}"\n',
        "key[0].public_key: base64 of 31 bytes"),
    "garbage PEM": (f'[[key]]\nid = "{_GOOD_ID}"\npublic_key = "-----BEGIN PUBLIC KEY-----x"\n',
                    "key[0].public_key: not a readable PEM public key"),
    "missing public key": (f'[[key]]\nid = "{_GOOD_ID}"\n', "key[0].public_key: required"),
    "same key twice": (_ENTRY + _ENTRY, f"key[1].id: {_GOOD_ID} is listed twice"),
    "revoked not a list": (f'revoked = "{_GOOD_ID}"\n{_ENTRY}', "revoked: must be a list"),
    "revoked id malformed": (f'revoked = ["ABC"]\n{_ENTRY}', "revoked[0]: a key id is 16"),
    "name of wrong type": (f"{_ENTRY}name = [1]\n", "key[0].name: must be a string"),
    "deeply nested garbage": ("x = " + "[" * 5000, "not valid TOML"),
}


@pytest.mark.parametrize("label", sorted(BAD_TRUST))
def test_malformed_trust_file_is_refused_naming_file_and_field(label, tmp_path):
    text, message = BAD_TRUST[label]
    path = tmp_path / "trust.toml"
    path.write_text(text)
    with pytest.raises(TrustFileError) as err:
        load_trust(path)
    assert str(err.value).startswith(f"trust file {path}: "), err.value
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_trust_file_exits_2_in_every_device_command(tmp_path):
    path = tmp_path / "trust.toml"
    path.write_text(BAD_TRUST["id does not match the key"][0])
    dummy = tmp_path / "any.edgepack"
    dummy.write_bytes(b"never opened")
    proc = run_cmd(EDGE, "verify", dummy, "--trust", path)
    assert proc.returncode == 2 and f"trust file {path}: key[0].id" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    _no_trace(proc)
    # the same trust file through the Python API and Device.open
    with pytest.raises(TrustFileError, match=r"key\[0\]\.id"):
        runtime.load(dummy, trust=path)
    from runtime.device import Device

    with pytest.raises(TrustFileError, match=r"key\[0\]\.id"):
        Device.open(dummy, trust=path)


def test_trust_file_that_never_ends_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "trust.fifo"
    os.mkfifo(fifo)
    with pytest.raises(TrustFileError, match="not a regular file"):
        load_trust(fifo)
    with pytest.raises(TrustFileError, match="not a regular file"):
        load_trust("/dev/zero")


def test_trust_store_round_trips_through_its_toml(tmp_path):
    """Device.bench hands its start-up trust to a subprocess as this text."""
    other = Ed25519PrivateKey.generate()
    path = _trust_file(tmp_path / "t.toml", {"a \"quoted\" name": _GOOD, "other": other},
                       revoked=[_kid(other)])
    store = load_trust(path)
    again = parse_trust(tomllib.loads(store.to_toml()))
    assert again.revoked == store.revoked == {_kid(other)}
    assert {k: (v.name, public_key_b64(v.public_key)) for k, v in again.keys.items()} == {
        k: (v.name, public_key_b64(v.public_key)) for k, v in store.keys.items()}


def test_retired_hmac_key_option_and_env_are_refused_not_ignored(tmp_path):
    dummy = tmp_path / "any.edgepack"
    dummy.write_bytes(b"never opened")
    key = tmp_path / "shared.key"
    key.write_bytes(b"secret")
    proc = run_cmd(EDGE, "verify", dummy, "--key", key)
    assert proc.returncode == 2 and "--key: HMAC shared-key signing is retired" in proc.stderr
    env = {**os.environ, "EDGEPACK_SIGNING_KEY": str(key)}
    proc = run_cmd(EDGE, "run", dummy, "--input", key, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "$EDGEPACK_SIGNING_KEY: HMAC shared-key signing is retired" in proc.stderr
    _no_trace(proc)


BAD_SIGNATURES = {
    "not JSON": (b"{not json", "not JSON"),
    "not UTF-8": (b"\xff\xfe\x00", "not JSON"),
    "a list": (b"[1, 2]", "a JSON list"),
    "nested garbage": (b"[" * 2000 + b"]" * 2000, "not JSON"),
    "too large": (b" " * 5000, "larger than 4096 bytes"),
    "signature a number": (json.dumps({"algorithm": "ed25519", "key_id": _GOOD_ID,
                                       "signature": 5}).encode(), "signature is a int"),
    "key_id nested": (json.dumps({"algorithm": "ed25519", "key_id": {"a": [1]},
                                  "signature": ""}).encode(), "key_id is a dict"),
    "extra field": (json.dumps({"algorithm": "ed25519", "key_id": _GOOD_ID, "signature": "",
                                "public_key": _GOOD_B64}).encode(), "expected exactly"),
    "unknown algorithm": (json.dumps({"algorithm": "rsa", "key_id": _GOOD_ID,
                                      "signature": ""}).encode(), "algorithm 'rsa'"),
    "signature not base64": (json.dumps({"algorithm": "ed25519", "key_id": _GOOD_ID,
                                         "signature": "%%%"}).encode(), "not base64"),
    "signature too short": (json.dumps({"algorithm": "ed25519", "key_id": _GOOD_ID,
                                        "signature": "AAAA"}).encode(), "is 3 bytes"),
}


@pytest.mark.parametrize("label", sorted(BAD_SIGNATURES))
def test_malformed_signature_json_is_a_one_line_refusal(label):
    data, message = BAD_SIGNATURES[label]
    with pytest.raises(SignatureError, match="malformed signature.json") as err:
        read_signature(data)
    assert message in str(err.value) and "\n" not in str(err.value)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                              lambda c: st.lists(c, max_size=4)
                              | st.dictionaries(st.text(max_size=10), c, max_size=4),
                              max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_fuzzed_signature_json_never_escapes_as_another_error(data):
    with pytest.raises(SignatureError):
        check_signature(b"{}", data, _GOOD_TRUST)


# -- bundles (slow: one real signed build, then re-signed copies) -----------------------------
@dataclass
class Signed:
    bundle: Path          # built and signed by `toolchain build --sign-key`
    key: Ed25519PrivateKey
    manifest: dict
    files: dict[str, Path]
    manifest_bytes: bytes


@pytest.fixture(scope="module")
def signed(tmp_path_factory) -> Signed:
    root = tmp_path_factory.mktemp("signed-build")
    gen = toolchain("keys", "generate", "--out", root / "keys", "--name", "builder")
    assert gen.returncode == 0, gen.stderr
    private_path = root / "keys" / "builder.private.pem"
    proc = toolchain("build", "--target", "host-cpu", "--epochs", "1", "--bench-runs", "10",
                     "--sign-key", private_path, "--out", root / "out",
                     "--json", root / "report.json", "--quiet")
    assert_exit(proc.returncode, 0, root / "report.json", proc.stderr + proc.stdout)
    (bundle,) = list((root / "out").iterdir())
    parts = root / "parts"
    manifest = extract_bundle(bundle, parts)  # no trust: form only, unsigned bundles pass
    return Signed(bundle, load_private_key(private_path), manifest.to_dict(),
                  {name: parts / name for name in manifest.files},
                  (parts / MANIFEST).read_bytes())


def _resign(s: Signed, path: Path, key: Ed25519PrivateKey | None) -> Path:
    return write_bundle(path, s.manifest, s.files, key=key)


def _with_signature(s: Signed, path: Path, data: bytes) -> Path:
    def edit(members):
        kept = [m for m in members if m[0].name != SIGNATURE]
        return [kept[0], _entry(SIGNATURE, data), *kept[1:]]

    return _repack(s.bundle, path, edit)


def _refused(bundle: Path, trust, message: str, workdir: Path) -> None:
    with pytest.raises(BundleError) as err:
        runtime.load(bundle, trust=trust, workdir=workdir)
    assert message in str(err.value), err.value
    assert "\n" not in str(err.value)
    assert not list(workdir.iterdir())  # nothing left half-extracted


@pytest.mark.slow
def test_build_signs_the_exact_manifest_bytes_with_ed25519(signed):
    with tarfile.open(signed.bundle, "r:gz") as tar:
        record = json.loads(tar.extractfile(SIGNATURE).read())
        manifest_bytes = tar.extractfile(MANIFEST).read()
    assert record["algorithm"] == "ed25519" and record["key_id"] == _kid(signed.key)
    signed.key.public_key().verify(base64.b64decode(record["signature"]), manifest_bytes)
    assert record == sign_manifest(manifest_bytes, signed.key)  # Ed25519 is deterministic


@pytest.mark.slow
def test_trusted_bundle_verifies_by_api_and_cli(signed, tmp_path):
    trust = _trust_file(tmp_path / "trust.toml", {"builder": signed.key})
    with runtime.load(signed.bundle, trust=trust) as model:
        assert model.self_test().ok
    proc = run_cmd(EDGE, "verify", signed.bundle, "--trust", trust)
    assert proc.returncode == 0, proc.stderr
    assert f"signature ok (key {_kid(signed.key)}, builder)" in proc.stdout
    unchecked = run_cmd(EDGE, "verify", signed.bundle)
    assert unchecked.returncode == 0, unchecked.stderr
    assert "signature NOT checked (no --trust file)" in unchecked.stdout


@pytest.mark.slow
def test_torch_free_runtime_verifies_with_a_trust_file(signed, tmp_path, runtime_venv):
    py = runtime_venv / "bin" / "python"
    probe = run_cmd(py, "-c", "import sys, runtime.signing, runtime.bundle; "
                              "print('torch' in sys.modules, 'toolchain' in sys.modules)")
    assert probe.returncode == 0 and probe.stdout.split() == ["False", "False"], probe.stderr
    trust = _trust_file(tmp_path / "trust.toml", {"builder": signed.key})
    proc = run_cmd(py, "-m", "runtime", "verify", signed.bundle, "--trust", trust)
    assert proc.returncode == 0 and "signature ok" in proc.stdout, proc.stderr
    other = _trust_file(tmp_path / "other.toml", {"other": Ed25519PrivateKey.generate()})
    refused = run_cmd(py, "-m", "runtime", "verify", signed.bundle, "--trust", other)
    assert refused.returncode == 1 and "unknown key id" in refused.stderr, refused.stderr
    _no_trace(refused)


@pytest.mark.slow
def test_untrusted_bundles_are_each_refused_with_their_own_reason(signed, tmp_path):
    trusted = signed.key
    trust = _trust_file(tmp_path / "trust.toml", {"builder": trusted})
    stranger = Ed25519PrivateKey.generate()
    cases: dict[str, tuple[Path, str]] = {
        "no signature": (_resign(signed, tmp_path / "unsigned.edgepack", None),
                         "the bundle is unsigned, and the trust file"),
        "signed by another key": (_resign(signed, tmp_path / "stranger.edgepack", stranger),
                                  f"signed by unknown key id {_kid(stranger)}"),
    }
    # another key's signature under the trusted key's id: the wrong key, claimed as ours
    forged = sign_manifest(signed.manifest_bytes, stranger) | {"key_id": _kid(trusted)}
    cases["wrong key under a trusted id"] = (
        _with_signature(signed, tmp_path / "forged.edgepack", json.dumps(forged).encode()),
        f"bad signature for key {_kid(trusted)} (builder)")

    def raise_accuracy(members):
        out = []
        for info, blob in members:
            if info.name == MANIFEST:
                m = json.loads(blob)
                m["metrics"]["final"]["accuracy"] = 1.0
                blob = json.dumps(m, indent=2, sort_keys=True).encode()
                info.size = len(blob)
            out.append((info, blob))
        return out

    cases["tampered manifest"] = (
        _repack(signed.bundle, tmp_path / "tampered.edgepack", raise_accuracy),
        "the manifest was altered or signed with another key")
    cases["malformed signature.json"] = (
        _with_signature(signed, tmp_path / "garbage.edgepack", b'{"algorithm": ["ed25519"]'),
        "malformed signature.json: not JSON")
    cases["signature.json is a folder"] = (
        _repack(signed.bundle, tmp_path / "folder.edgepack",
                lambda m: [e for e in m if e[0].name != SIGNATURE] + [
                    _entry(f"{SIGNATURE}/x", b"{}")]),
        # the one-pass reader refuses the stray entry before any signature is read
        "entry 'signature.json/x' is not listed in the manifest's files table")
    hmac_record = {"algorithm": "hmac-sha256", "key_id": "0" * 16, "signature": "ab" * 32}
    cases["old HMAC signature"] = (
        _with_signature(signed, tmp_path / "hmac.edgepack", json.dumps(hmac_record).encode()),
        "signed with the retired shared-key scheme")
    messages = set()
    for label, (bundle, message) in cases.items():
        _refused(bundle, trust, message, tmp_path / "x" / label.replace(" ", "-"))
        messages.add(message)
    assert len(messages) == len(cases)
    # the command line: exit 1, one line, the same reason
    proc = run_cmd(EDGE, "verify", cases["tampered manifest"][0], "--trust", trust)
    assert proc.returncode == 1 and "bad signature" in proc.stderr, proc.stderr
    _no_trace(proc)
    replay = run_cmd(EDGE, "replay", cases["no signature"][0], "--trust", trust,
                     "--inputs", signed.files["golden/inputs.npy"], "--device-id", "sig-2",
                     "--spool", tmp_path / "spool")
    assert replay.returncode == 1 and "is unsigned" in replay.stderr, replay.stderr
    _no_trace(replay)
    # malformed and retired signatures are refused even without a trust file
    for label in ("malformed signature.json", "old HMAC signature"):
        bundle, message = cases[label]
        _refused(bundle, None, message, tmp_path / "y" / label.replace(" ", "-"))


@pytest.mark.slow
def test_revoked_key_is_refused_even_when_listed(signed, tmp_path):
    trust = _trust_file(tmp_path / "trust.toml", {"builder": signed.key},
                        revoked=[_kid(signed.key)])
    _refused(signed.bundle, trust, f"signed by revoked key {_kid(signed.key)} (builder)",
             tmp_path / "work")


@pytest.mark.slow
def test_key_rotation_accepts_both_then_only_the_new_key(signed, tmp_path):
    old, new = signed.key, Ed25519PrivateKey.generate()
    by_old = signed.bundle
    by_new = _resign(signed, tmp_path / "new.edgepack", new)
    both = _trust_file(tmp_path / "both.toml", {"release-2025": old, "release-2026": new})
    for bundle in (by_old, by_new):
        with runtime.load(bundle, trust=both, self_test=False) as model:
            assert model.manifest.model.name
    rotated = _trust_file(tmp_path / "rotated.toml", {"release-2025": old, "release-2026": new},
                          revoked=[_kid(old)])
    with runtime.load(by_new, trust=rotated, self_test=False):
        pass
    _refused(by_old, rotated, "revoked key", tmp_path / "work")


@pytest.mark.slow
def test_reload_uses_the_start_up_trust_and_keeps_serving_on_refusal(signed, tmp_path):
    from runtime.device import Device
    from runtime.telemetry import CommandError

    new = Ed25519PrivateKey.generate()
    trust_path = _trust_file(tmp_path / "trust.toml", {"old": signed.key, "new": new})
    untrusted = _resign(signed, tmp_path / "stranger.edgepack", Ed25519PrivateKey.generate())
    unsigned = _resign(signed, tmp_path / "unsigned.edgepack", None)
    by_new = _resign(signed, tmp_path / "new.edgepack", new)
    with Device.open(signed.bundle, trust=trust_path, device_id="sig-1",
                     spool_dir=tmp_path / "spool") as dev:
        # editing the file after start-up changes nothing: the device keeps its start-up trust
        trust_path.write_text("not toml at all [")
        serving = dev.info
        for bundle, reason in ((untrusted, "unknown key id"), (unsigned, "unsigned")):
            with pytest.raises(CommandError, match=reason):
                dev.handle_command({"command": "reload", "args": {"bundle": str(bundle)}})
            assert dev.info == serving
            ids, _ = dev.classify(np.zeros((1, *dev.model.raw_shape)))
            assert len(ids) == 1
        result = dev.reload(str(by_new))
        assert result["serving"]["sha256"] != serving["sha256"]
        assert dev.info == result["serving"]
        # bench runs the served bundle in a subprocess, with the same trust
        assert dev.bench(runs=1, warmup=0)["latency_ms"]["runs"] == 1
