"""Bundle signatures: Ed25519 over the exact `manifest.json` bytes (which hold every file's
sha256), and the device's trust file that says which public keys it accepts.

The build signs with a private key (`toolchain keys generate`); a device holds only public
keys, so a device that can verify a bundle cannot sign one. The shared-key HMAC scheme of
earlier releases is retired: it made every verifier a signer. A trust file (TOML):

    revoked = ["0123456789abcdef"]      # top level, above the first [[key]]

    [[key]]
    id = "89abcdef01234567"             # first 16 hex digits of sha256(raw public key)
    public_key = "<base64 of the 32 raw bytes, or a PEM public key>"
    name = "release-2026"

Torch-free: numpy-free too; only `cryptography` and the standard library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ALGORITHM = "ed25519"
RETIRED_ALGORITHM = "hmac-sha256"
RETIRED = ("HMAC shared-key signing is retired (every device holding the key could sign); "
           "make an Ed25519 key pair with `toolchain keys generate --out DIR`, sign with "
           "`toolchain build --sign-key DIR/NAME.private.pem`, and give devices a --trust file")
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_TRUST_FILE_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 4096
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SIGNATURE_FIELDS = {"algorithm", "key_id", "signature"}


class SigningError(ValueError):
    """A signing key file is unusable; the message says why and what is valid."""


class TrustFileError(ValueError):
    """The trust file is malformed; the message names the file and the field."""


class SignatureError(ValueError):
    """The bundle's signature is missing, malformed, untrusted or wrong (one line, says which)."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_b64(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _read_capped(path: Path, cap: int) -> bytes:
    """A small regular file's bytes (never a FIFO or a device that would block or never end)."""
    try:
        if not path.is_file():
            raise ValueError("not a regular file")
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from exc
    if len(data) > cap:
        raise ValueError(f"larger than {cap} bytes")
    return data


# -- the build side: keys and signing -------------------------------------------------------------
def generate_keypair(out_dir: Path, name: str = "edgepack") -> tuple[Path, Path, str]:
    """Write NAME.private.pem (PKCS8, mode 0600) and NAME.public.pem into `out_dir`; refuses
    to overwrite either. Returns (private path, public path, key id)."""
    if not _KEY_NAME.fullmatch(name):
        raise SigningError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    private_path, public_path = out_dir / f"{name}.private.pem", out_dir / f"{name}.public.pem"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise SigningError(f"{path} exists: refusing to overwrite a key (choose --name)")
    out_dir.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path, key_id(private.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never follow a link or replace a file that appeared since the check above
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise SigningError(f"{path} exists: refusing to overwrite a key (choose --name)") from exc
    try:
        os.fchmod(fd, mode)  # the umask must not loosen or tighten what we promise
        os.write(fd, data)
    finally:
        os.close(fd)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS8, unencrypted) file, or a SigningError."""
    try:
        data = _read_capped(Path(path), MAX_KEY_FILE_BYTES)
    except ValueError as exc:
        raise SigningError(f"{path}: {exc}") from exc
    if b"-----BEGIN" not in data:
        raise SigningError(f"{path}: not a PEM private key; {RETIRED}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({exc}); make one with "
                           "`toolchain keys generate --out DIR`") from exc
    except Exception as exc:  # cryptography's UnsupportedAlgorithm and friends
        raise SigningError(f"{path}: unsupported private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: a {type(key).__name__.removeprefix('_')} key; bundles are "
                           "signed with Ed25519 (`toolchain keys generate --out DIR`)")
    return key


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature.json record for these exact manifest bytes."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise SigningError(f"a {type(private_key).__name__} is not an Ed25519 private key; "
                           + RETIRED)
    return {"algorithm": ALGORITHM, "key_id": key_id(private_key.public_key()),
            "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode()}


# -- the device side: the trust file -------------------------------------------------------------
@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    name: str
    public_key: Ed25519PublicKey


@dataclass(frozen=True)
class TrustStore:
    """Public keys a device accepts, and key ids it refuses even when listed."""

    keys: Mapping[str, TrustedKey]
    revoked: frozenset[str]
    source: str = "<trust>"

    def to_toml(self) -> str:
        """The same trust as a trust file (for a subprocess that must use exactly it)."""
        lines = [f"revoked = {json.dumps(sorted(self.revoked))}", ""]
        for k in self.keys.values():
            lines += ["[[key]]", f"id = {json.dumps(k.key_id)}",
                      f"public_key = {json.dumps(public_key_b64(k.public_key))}",
                      f"name = {json.dumps(k.name)}", ""]
        return "\n".join(lines)


def load_trust(path: Path | str) -> TrustStore:
    """Read and check a trust file; a TrustFileError names the file and the field."""
    path = Path(path)
    try:
        data = _read_capped(path, MAX_TRUST_FILE_BYTES)
    except ValueError as exc:
        raise TrustFileError(f"trust file {path}: {exc}") from exc
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise TrustFileError(f"trust file {path}: not valid TOML ({exc})") from exc
    return parse_trust(doc, str(path))


def parse_trust(doc: dict[str, Any], source: str = "<trust>") -> TrustStore:
    def bad(field: str, problem: str) -> TrustFileError:
        return TrustFileError(f"trust file {source}: {field}: {problem}")

    if unknown := sorted(set(doc) - {"key", "revoked"}):
        raise bad(unknown[0], "unknown field; a trust file holds [[key]] tables and `revoked`")
    entries = doc.get("key", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise bad("key", "must be [[key]] tables")
    if not entries:
        raise bad("key", "no [[key]] table: a trust file must trust at least one key")
    revoked = doc.get("revoked", [])
    if not isinstance(revoked, list):
        raise bad("revoked", "must be a list of key ids")
    for i, rid in enumerate(revoked):
        if not isinstance(rid, str) or not _KEY_ID.fullmatch(rid):
            raise bad(f"revoked[{i}]", "a key id is 16 lowercase hex digits")
    keys: dict[str, TrustedKey] = {}
    for i, entry in enumerate(entries):
        where = f"key[{i}]"
        if unknown := sorted(set(entry) - {"id", "public_key", "name"}):
            hint = (" (put `revoked = [...]` at the top, above the first [[key]])"
                    if unknown[0] == "revoked" else "; a key has id, public_key and name")
            raise bad(f"{where}.{unknown[0]}", "unknown field" + hint)
        kid, text, name = entry.get("id"), entry.get("public_key"), entry.get("name", "")
        if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
            raise bad(f"{where}.id", "required: 16 lowercase hex digits (the key id "
                      "`toolchain keys generate` printed)")
        if not isinstance(text, str):
            raise bad(f"{where}.public_key", "required: base64 of the raw 32-byte Ed25519 "
                      "public key, or a PEM public key")
        if not isinstance(name, str) or len(name) > 200:
            raise bad(f"{where}.name", "must be a string of at most 200 characters")
        try:
            public = _public_key(text)
        except ValueError as exc:
            raise bad(f"{where}.public_key", str(exc)) from exc
        if key_id(public) != kid:
            raise bad(f"{where}.id", f"{kid} does not match public_key, whose id is "
                      f"{key_id(public)}")
        if kid in keys:
            raise bad(f"{where}.id", f"{kid} is listed twice")
        keys[kid] = TrustedKey(kid, name or kid, public)
    return TrustStore(keys, frozenset(revoked), source)


def _public_key(text: str) -> Ed25519PublicKey:
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except Exception as exc:  # ValueError, UnsupportedAlgorithm
            raise ValueError(f"not a readable PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("a PEM public key, but not Ed25519")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("neither PEM nor base64") from exc
    if len(raw) != 32:
        raise ValueError(f"base64 of {len(raw)} bytes; an Ed25519 public key is 32 raw bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


# -- the device side: checking a bundle's signature ----------------------------------------------
@dataclass(frozen=True)
class SignatureRecord:
    algorithm: str
    key_id: str
    signature: bytes


def read_signature(data: bytes) -> SignatureRecord:
    """Parse signature.json strictly: a JSON object of three strings, nothing else."""
    def bad(problem: str) -> SignatureError:
        return SignatureError(f"malformed signature.json: {problem}")

    if len(data) > MAX_SIGNATURE_BYTES:
        raise bad(f"larger than {MAX_SIGNATURE_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad("not JSON") from exc
    if not isinstance(doc, dict):
        raise bad(f"a JSON {type(doc).__name__}, expected an object with "
                  "algorithm, key_id and signature")
    if set(doc) != _SIGNATURE_FIELDS:
        raise bad(f"fields {sorted(doc)}, expected exactly {sorted(_SIGNATURE_FIELDS)}")
    for field in sorted(_SIGNATURE_FIELDS):
        if not isinstance(doc[field], str):
            raise bad(f"{field} is a {type(doc[field]).__name__}, expected a string")
    if doc["algorithm"] == RETIRED_ALGORITHM:
        raise SignatureError("the bundle was signed with the retired shared-key scheme "
                             "(hmac-sha256): re-sign it with an Ed25519 key from "
                             "`toolchain keys generate` (toolchain build --sign-key)")
    if doc["algorithm"] != ALGORITHM:
        raise bad(f"algorithm {doc['algorithm'][:40]!r}; this runtime verifies {ALGORITHM!r}")
    if not _KEY_ID.fullmatch(doc["key_id"]):
        raise bad("key_id is not 16 lowercase hex digits")
    try:
        sig = base64.b64decode(doc["signature"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad("signature is not base64") from exc
    if len(sig) != 64:
        raise bad(f"signature is {len(sig)} bytes; an Ed25519 signature is 64")
    return SignatureRecord(doc["algorithm"], doc["key_id"], sig)


def check_signature(manifest_bytes: bytes, signature: bytes | None,
                    trust: TrustStore | None) -> SignatureRecord | None:
    """Check signature.json's bytes (None: the bundle has none) against `trust`. Without
    trust, an unsigned bundle passes and a signed one is only checked for form. Returns the
    record (None when unsigned); raises SignatureError with a one-line reason."""
    record = read_signature(signature) if signature is not None else None
    if trust is None:
        return record
    if record is None:
        raise SignatureError(f"the bundle is unsigned, and the trust file {trust.source} "
                             "requires a signature from a trusted key")
    if record.key_id in trust.revoked:
        name = trust.keys[record.key_id].name if record.key_id in trust.keys else record.key_id
        raise SignatureError(f"the bundle is signed by revoked key {record.key_id} ({name}); "
                             "re-sign it with a current key")
    trusted = trust.keys.get(record.key_id)
    if trusted is None:
        raise SignatureError(f"the bundle is signed by unknown key id {record.key_id}; the "
                             f"trust file {trust.source} trusts "
                             f"{', '.join(sorted(trust.keys))}")
    try:
        trusted.public_key.verify(record.signature, manifest_bytes)
    except InvalidSignature as exc:
        raise SignatureError(f"bad signature for key {record.key_id} ({trusted.name}): the "
                             "manifest was altered or signed with another key") from exc
    return record
