"""Zip archives from users (`.pt2` models, `.npz` data), checked before anything reads them.

A zip's central directory declares every member's name and uncompressed size; Python's
zipfile never inflates past the declared size, so checking the declared sizes against a cap
bounds what reading costs. Names must stay inside the archive (no absolute paths, no `..`).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path, PurePosixPath

from toolchain.errors import UsageError

MAX_MEMBERS = 10_000
# a pickle stream starts with the PROTO opcode and a protocol number (2 to 5 today)
_PICKLE_HEADER = re.compile(rb"\A\x80[\x02-\x05]")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth")


def gib(n: int) -> str:
    return f"{n / 2**30:g} GiB"


def check_file_size(path: Path, what: str, cap: int) -> int:
    """The file's size, refused above `cap` before a byte of it is read."""
    size = path.stat().st_size
    if size > cap:
        raise UsageError(f"{what} {path}: {size} bytes is over the {gib(cap)} limit "
                         "for this kind of file")
    return size


def open_checked_zip(path: Path, what: str, cap: int) -> zipfile.ZipFile:
    """Open `path` as a zip whose member names stay inside it and whose declared uncompressed
    sizes add up to at most `cap` bytes; the caller closes it."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UsageError(f"{what} {path}: not a zip archive ({one_line(exc)})") from exc
    try:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise UsageError(f"{what} {path}: {len(infos)} members, more than the "
                             f"{MAX_MEMBERS} allowed")
        total = 0
        for info in infos:
            check_member_name(path, what, info.filename)
            if info.file_size > cap or total + info.file_size > cap:
                raise UsageError(
                    f"{what} {path}: member {info.filename!r} declares {info.file_size} bytes "
                    f"uncompressed; the archive may unpack to at most {gib(cap)}"
                )
            total += info.file_size
            if info.flag_bits & 0x1:
                raise UsageError(f"{what} {path}: member {info.filename!r} is encrypted")
    except BaseException:
        zf.close()
        raise
    return zf


def check_member_name(path: Path, what: str, name: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (not name or name.startswith(("/", "\\")) or ".." in parts or "\0" in name
            or re.match(r"^[A-Za-z]:", name)):
        raise UsageError(f"{what} {path}: member name {name!r} escapes the archive "
                         "(absolute or with '..')")


def looks_like_pickle(head: bytes) -> bool:
    return bool(_PICKLE_HEADER.match(head))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, shortened: error messages stay one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
