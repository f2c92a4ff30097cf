"""The bundle format (`*.edgepack`): a gzip-compressed tar holding `manifest.json`, the model
file(s), golden inputs/outputs and reference distributions, and optionally `signature.json`.

This module is the one source of truth for the format: the toolchain writes bundles with
`write_bundle`, the runtime opens them with `extract_bundle`. Extraction never trusts the
archive and reads it in one pass: `manifest.json` first (its size checked from its header),
then only the entries its files table lists, each refused before it is written when its
size is not the declared one and checked against its sha256 as it arrives; plain files with
plain relative names only (no links, sparse files, absolute paths or `..`); decompression
bounded by the declared sizes (a gzip bomb stops there) and the gzip stream checked end to
end; the Ed25519 signature checked against the device's trust file (runtime.signing).
The manifest's fields are read and checked by `runtime.manifest`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
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
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024  # a pax or GNU long-name header; ours hold a name or two
MAX_NAME_CHARS = 255
MAX_NAME_PARTS = 8
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                     tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
# tar framing around each entry (header, pax header, padding) and the archive's end
_MEMBER_FRAMING = 4 * 512
_HEADER_SLACK = 64 * 1024
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


def _open_stream(path: Path) -> gzip.GzipFile:
    """The decompressed stream, once the gzip header is edgepack's own."""
    try:
        with open(path, "rb") as raw:
            header = raw.read(len(_GZIP_HEADER))
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read: {exc}") from exc
    if header[:2] != b"\x1f\x8b":
        raise BundleError(f"{path}: not an edgepack bundle (not a gzip-compressed archive)")
    if header != _GZIP_HEADER:
        raise BundleError(f"{path}: corrupted bundle (its gzip header is not edgepack's)")
    return gzip.GzipFile(filename=path, mode="rb")


class _Budget:
    """The decompressed stream, counted as it arrives: reading past `limit` refuses the
    bundle, so a gzip bomb costs at most `limit` bytes of decompression, never a disk."""

    def __init__(self, gz: gzip.GzipFile, path: Path) -> None:
        self.gz, self.path, self.count = gz, path, 0
        self.limit = MAX_MANIFEST_BYTES + _HEADER_SLACK

    def read(self, size: int = -1) -> bytes:
        # never more than a block at a time, and at most one byte past the limit
        want = min(1 << 20 if size < 0 else size, 1 << 20, self.limit - self.count + 1)
        data = self.gz.read(max(want, 0))
        self.count += len(data)
        if self.count > self.limit:
            raise BundleError(f"{self.path}: bundle expands past the {self.limit} bytes its "
                              f"manifest accounts for (a gzip bomb or hidden data)")
        return data

    def drain(self) -> None:
        """Read to the end: checks the gzip CRC and length, and that nothing hides there."""
        while self.read(1 << 16):
            pass


class _CappedTarInfo(tarfile.TarInfo):
    """Refuses sparse members and oversized or endless extended headers while tarfile reads
    them, before it would hold them in memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        headers = getattr(tar, "_edgepack_headers", 0) + 1
        tar._edgepack_headers = headers  # type: ignore[attr-defined]
        if headers > 4 * MAX_ENTRIES:
            raise BundleError(f"more than {4 * MAX_ENTRIES} archive headers")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BundleError(f"unsafe entry {self.name!r}: a sparse file; bundles hold plain "
                              "files")
        if self.type in _EXTENDED_HEADERS and self.size > MAX_HEADER_BYTES:
            raise BundleError(f"an extended archive header of {self.size} bytes (at most "
                              f"{MAX_HEADER_BYTES})")
        return super()._proc_member(tar)


def member_name_problem(name: str) -> str | None:
    """Why `name` cannot be a bundle entry, or None: entries are plain relative names made of
    letters, digits, '.', '_' and '-', in parts separated by '/' that start with a letter,
    digit or '_' (so no '..', no hidden files, no absolute paths, backslashes or NUL)."""
    if not isinstance(name, str) or not name:
        return "an entry name must be a non-empty string"
    if len(name) > MAX_NAME_CHARS or name.count("/") >= MAX_NAME_PARTS:
        return f"entry names have at most {MAX_NAME_CHARS} characters and {MAX_NAME_PARTS} parts"
    if not all(_NAME_PART.fullmatch(part) for part in name.split("/")):
        return ("entries must be plain relative paths: parts of letters, digits, '.', '_', "
                "'-' separated by '/', each starting with a letter, digit or '_'")
    return None


def _safe_member_name(name: str) -> str:
    if problem := member_name_problem(name):
        raise BundleError(f"unsafe entry {name!r}: {problem}")
    return name


def extract_bundle(path: Path | str, dest: Path | str,
                   trust: TrustStore | None = None) -> Manifest:
    """Verify and extract a bundle into the folder `dest` (created; must not exist or be
    empty). With `trust`, the bundle must carry a valid signature from a trusted, unrevoked
    key. Returns the checked manifest. On any failure nothing is left in `dest`.

    One pass over the stream: the manifest (the first entry, size checked from its header)
    declares every other entry's size and hash; an entry it does not list, or of another
    size, is refused before its bytes are written, and the whole stream is bounded by what
    the manifest declares."""
    path, dest = Path(path), Path(dest)
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        busy = any(dest.iterdir())
    except OSError as exc:
        raise BundleError(f"{dest}: cannot be used as the extraction folder ({exc})") from exc
    if busy:
        raise BundleError(f"{dest}: extraction folder is not empty")
    try:
        with _open_stream(path) as gz:
            manifest, manifest_bytes = _extract_members(path, _Budget(gz, path), dest)
        _check_signature(dest, manifest_bytes, trust)
        return manifest
    except BaseException:
        for child in dest.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _extract_members(path: Path, stream: _Budget, dest: Path) -> tuple[Manifest, bytes]:
    try:
        return _read_archive(path, stream, dest)
    except BundleError:
        # A damaged byte can show first as a wrong entry; say that the file is damaged when
        # the rest of the stream (bounded by the budget) fails its gzip check.
        if damage := _damage(stream):
            raise BundleError(f"{path}: corrupted or truncated bundle ({damage})") from None
        raise


def _damage(stream: _Budget) -> str | None:
    try:
        stream.drain()
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        return str(exc) or type(exc).__name__
    except BundleError:
        pass
    return None


def _read_archive(path: Path, stream: _Budget, dest: Path) -> tuple[Manifest, bytes]:
    manifest: Manifest | None = None
    manifest_bytes = b""
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CappedTarInfo) as tar:
            for count, member in enumerate(tar, start=1):
                name = _check_member(member, count, seen)
                if manifest is None:
                    manifest, manifest_bytes = _read_manifest(path, tar, member, dest)
                    stream.limit = stream.count + _declared_bytes(manifest, dest)
                elif name == SIGNATURE:
                    if member.size > MAX_SIGNATURE_BYTES:
                        raise BundleError(f"{SIGNATURE} is {member.size} bytes: at most "
                                          f"{MAX_SIGNATURE_BYTES}")
                    _copy(tar, member, dest, member.size, None)
                elif name not in manifest.files:
                    raise BundleError(f"entry {name!r} is not listed in the manifest's files "
                                      "table: files not listed in the manifest are refused")
                else:
                    _copy(tar, member, dest, manifest.files[name].size,
                          manifest.files[name].sha256)
            stream.drain()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"{path}: corrupted, truncated or not a bundle archive ({exc})") \
            from exc
    except RecursionError as exc:
        raise BundleError(f"{path}: archive headers nest too deep") from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read or extracted ({exc})") from exc
    if manifest is None:
        raise BundleError(f"{path}: not an edgepack bundle (no {MANIFEST})")
    if missing := sorted(set(manifest.files) - seen):
        raise BundleError(f"files listed in the manifest are missing: {', '.join(missing)}")
    return manifest, manifest_bytes


def _check_member(member: tarfile.TarInfo, count: int, seen: set[str]) -> str:
    if count > MAX_ENTRIES:
        raise BundleError(f"more than {MAX_ENTRIES} entries")
    name = _safe_member_name(member.name)
    if not member.isreg() or member.issparse():
        kind = ("link" if member.issym() or member.islnk()
                else "sparse file" if member.issparse() else "non-file entry")
        raise BundleError(f"unsafe entry {name!r}: a {kind}; bundles hold plain files")
    if count == 1 and name != MANIFEST:
        raise BundleError(f"not an edgepack bundle (no {MANIFEST} as its first entry; "
                          f"found {name!r})")
    if name in seen:
        raise BundleError(f"entry {name!r} appears twice")
    seen.add(name)
    return name


def _read_manifest(path: Path, tar: tarfile.TarFile, member: tarfile.TarInfo,
                   dest: Path) -> tuple[Manifest, bytes]:
    # runtime.manifest imports this module's constants, so it is imported here, not above
    from runtime.manifest import parse_manifest

    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST} is {member.size} bytes: at most {MAX_MANIFEST_BYTES}")
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    data = source.read(member.size + 1)
    if len(data) != member.size:
        raise BundleError(f"{path}: {MANIFEST} is truncated")
    manifest = parse_manifest(data)
    (dest / MANIFEST).write_bytes(data)
    return manifest, data


def _declared_bytes(manifest: Manifest, dest: Path) -> int:
    """How far the stream may go past the manifest: the declared sizes and tar's framing.
    Refuses a bundle that would not fit on this disk before writing any of it."""
    declared = sum(entry.size for entry in manifest.files.values())
    free = shutil.disk_usage(dest).free
    if declared > free:
        raise BundleError(f"the bundle's files take {declared} bytes; {dest} has {free} free")
    return declared + MAX_SIGNATURE_BYTES + (len(manifest.files) + 1) * _MEMBER_FRAMING \
        + _HEADER_SLACK


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, declared: int,
          sha256: str | None) -> None:
    """Write one entry, refusing it when its size is not the declared one: checked from its
    header before writing, and again on the bytes as they arrive (at most declared + 1)."""
    name = member.name
    if member.size != declared:
        raise BundleError(f"entry {name!r} is {member.size} bytes; the manifest declares "
                          f"{declared}")
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    target = dest.joinpath(*name.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    with open(target, "xb") as out:
        while block := source.read(min(1 << 20, declared + 1 - written)):
            written += len(block)
            if written > declared:
                raise BundleError(f"entry {name!r} holds more than its declared {declared} "
                                  "bytes")
            digest.update(block)
            out.write(block)
    if written != declared:
        raise BundleError(f"entry {name!r} is truncated: {written} of {declared} bytes")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise BundleError(f"sha256 mismatch for {name}: manifest {sha256}, "
                          f"file {digest.hexdigest()}")


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
