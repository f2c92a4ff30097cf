"""The bundle format (`*.edgepack`): a gzip-compressed tar holding `manifest.json`, the model
file(s), golden inputs/outputs and reference distributions, and optionally `signature.json`.

This module is the one source of truth for the format: the toolchain writes bundles with
`write_bundle`, the runtime opens them with `extract_bundle`. Extraction never trusts the
archive: regular files only, no absolute paths or `..`, bounded sizes, the gzip stream
checked end to end, every file's sha256 checked against the manifest, the Ed25519 signature
checked against the device's trust file (runtime.signing). The manifest's fields are
read and checked by `runtime.manifest`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from runtime.manifest import Manifest
    from runtime.signing import TrustStore

SCHEMA_VERSION = 1
SUFFIX = ".edgepack"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
MAX_ENTRIES = 256
MAX_TOTAL_BYTES = 8 * 1024**3  # a cloud-GPU engine can be large; a phone's never is
MAX_MANIFEST_BYTES = 16 * 1024**2
# Our writer's exact gzip header: magic, deflate, no flags, mtime 0, XFL 2 (best), OS 255.
# Checking it makes any changed byte detectable: the rest is covered by the CRC32 and length.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"


class BundleError(Exception):
    """The bundle is malformed, corrupted, tampered with or unsafe; the message says which."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature_of(manifest_bytes: bytes, key: Ed25519PrivateKey) -> dict[str, str]:
    from runtime.signing import sign_manifest

    return sign_manifest(manifest_bytes, key)


def write_bundle(
    out_path: Path, manifest: dict[str, Any], files: dict[str, Path],
    key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write a bundle. `manifest` is in the layout of `Manifest.to_dict()`; `files` maps
    archive names to local files, whose sha256 and sizes are added to the manifest here.
    With `key` (runtime.signing.load_private_key), signature.json signs the manifest.
    Written to a temporary name and renamed, so a failed write leaves nothing behind."""
    manifest = dict(manifest)
    manifest["files"] = {
        name: {"sha256": sha256_file(path), "size": path.stat().st_size}
        for name, path in sorted(files.items())
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    entries: list[tuple[str, bytes | Path]] = [(MANIFEST, manifest_bytes)]
    if key is not None:
        entries.append((SIGNATURE, json.dumps(_signature_of(manifest_bytes, key)).encode()))
    entries += sorted(files.items())

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9
        ) as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, content in entries:
                data = content if isinstance(content, bytes) else Path(content).read_bytes()
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path


def _check_gzip_stream(path: Path) -> None:
    """Decompress the whole stream once: catches truncation and any changed byte."""
    try:
        with open(path, "rb") as f:
            header = f.read(len(_GZIP_HEADER))
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read: {exc}") from exc
    if header[:2] != b"\x1f\x8b":
        raise BundleError(f"{path}: not an edgepack bundle (not a gzip-compressed archive)")
    if header != _GZIP_HEADER:
        raise BundleError(f"{path}: corrupted bundle (its gzip header is not edgepack's)")
    total = 0
    try:
        with gzip.open(path, "rb") as gz:
            for block in iter(lambda: gz.read(1 << 20), b""):
                total += len(block)
                if total > MAX_TOTAL_BYTES + (1 << 20):
                    raise BundleError(f"{path}: bundle expands past {MAX_TOTAL_BYTES} bytes")
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise BundleError(f"{path}: corrupted or truncated bundle ({exc})") from exc


def _safe_member_name(name: str) -> str:
    normalized = posixpath.normpath(name)
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or normalized != name
        or normalized == ".."
        or normalized.startswith("../")
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise BundleError(f"unsafe entry {name!r}: bundle entries must be plain relative paths")
    return name


def extract_bundle(path: Path | str, dest: Path | str,
                   trust: TrustStore | None = None) -> Manifest:
    """Verify and extract a bundle into the folder `dest` (created; must not exist or be
    empty). With `trust`, the bundle must carry a valid signature from a trusted, unrevoked
    key. Returns the checked manifest. On any failure nothing is left in `dest`."""
    # runtime.manifest imports this module's constants, so it is imported here, not above
    from runtime.manifest import parse_manifest

    path, dest = Path(path), Path(dest)
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file")
    _check_gzip_stream(path)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise BundleError(f"{dest}: extraction folder is not empty")
    try:
        _extract_members(path, dest)
        manifest_bytes = (dest / MANIFEST).read_bytes()
        _check_signature(dest, manifest_bytes, trust)
        manifest = parse_manifest(manifest_bytes)
        _check_files(dest, manifest)
        return manifest
    except BaseException:
        for child in dest.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _extract_members(path: Path, dest: Path) -> None:
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_ENTRIES:
                    raise BundleError(f"{path}: more than {MAX_ENTRIES} entries")
                name = _safe_member_name(member.name)
                if not member.isreg():
                    kind = "link" if member.issym() or member.islnk() else "non-file entry"
                    raise BundleError(f"unsafe entry {name!r}: a {kind}; bundles hold plain files")
                if name in seen:
                    raise BundleError(f"entry {name!r} appears twice")
                seen.add(name)
                total += member.size
                if total > MAX_TOTAL_BYTES:
                    raise BundleError(f"{path}: bundle expands past {MAX_TOTAL_BYTES} bytes")
                target = dest.joinpath(*name.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # regular file
                with open(target, "xb") as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BundleError(f"{path}: not a readable bundle archive ({exc})") from exc
    if MANIFEST not in seen:
        raise BundleError(f"{path}: not an edgepack bundle (no {MANIFEST})")


def _check_signature(dest: Path, manifest_bytes: bytes, trust: TrustStore | None) -> None:
    from runtime.signing import MAX_SIGNATURE_BYTES, SignatureError, check_signature

    sig_path = dest / SIGNATURE
    signature = None
    if sig_path.exists():
        if not sig_path.is_file():
            raise BundleError(f"malformed {SIGNATURE}: a folder, not a file")
        if sig_path.stat().st_size > MAX_SIGNATURE_BYTES:
            raise BundleError(f"malformed {SIGNATURE}: larger than {MAX_SIGNATURE_BYTES} bytes")
        signature = sig_path.read_bytes()
    try:
        check_signature(manifest_bytes, signature, trust)
    except SignatureError as exc:
        raise BundleError(str(exc)) from exc


def _check_files(dest: Path, manifest: Manifest) -> None:
    listed = manifest.files
    present = {
        p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()
    } - {MANIFEST, SIGNATURE}
    if missing := sorted(set(listed) - present):
        raise BundleError(f"files listed in the manifest are missing: {', '.join(missing)}")
    if extra := sorted(present - set(listed)):
        raise BundleError(f"files not listed in the manifest: {', '.join(extra)}")
    for name, entry in listed.items():
        actual = sha256_file(dest / name)
        if actual != entry.sha256:
            raise BundleError(f"sha256 mismatch for {name}: manifest {entry.sha256}, "
                              f"file {actual}")
