"""A `.pt2` ExportedProgram archive, checked before torch sees it.

`torch.export.load` unpickles (and so can run code from) weights and constants its configs
mark `use_pickle`, legacy `data/weights/<model>.pt` members, custom/opaque object constants and
the sample inputs, and it loads AOTInductor shared libraries. Without --trust-pickle we refuse
an archive holding any of those (or anything that looks like a pickle), and hand torch a copy
rebuilt from the bytes we checked, with the sample inputs emptied (torch then skips them): what
torch reads is what we read, and nothing in it is unpickled.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

from toolchain.build.safe_archive import (
    PICKLE_SUFFIXES,
    check_file_size,
    gib,
    looks_like_pickle,
    one_line,
    open_checked_zip,
)
from toolchain.errors import UsageError

MAX_PT2_BYTES = 2 * 2**30  # the file, and what it unpacks to
MAX_JSON_BYTES = 256 * 2**20  # a graph or config member
_NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd")
_PICKLED_CONSTANT_PREFIXES = ("custom_obj_", "opaque_obj_")


def _refuse(path: Path, member: str, why: str) -> UsageError:
    return UsageError(
        f"model {path}: member {member!r} {why}, and loading it can run arbitrary code; pass "
        "--trust-pickle only if you trust this file, or re-export it with torch.export.save "
        "from plain tensors"
    )


def checked_pt2(path: Path) -> io.BytesIO:
    """The archive rebuilt in memory from checked members, ready for `torch.export.load`."""
    check_file_size(path, "model", MAX_PT2_BYTES)
    with open_checked_zip(path, "model", MAX_PT2_BYTES) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise UsageError(f"model {path}: member {dup!r} appears twice in the archive")
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise UsageError(f"model {path}: not an ExportedProgram archive (torch.export.save "
                             "puts every member in one top folder)")
        root = roots.pop() + "/"
        models = [n[len(root) + 7:-5] for n in names
                  if n.startswith(root + "models/") and n.endswith(".json")]
        if not models:
            raise UsageError(f"model {path}: not an ExportedProgram archive (no models/*.json; "
                             "write it with torch.export.save)")
        configs = {i.filename: _json(zf, i, path) for i in infos if i.filename.endswith(".json")}
        raw = _raw_payloads(path, root, configs)
        samples = {f"{root}data/sample_inputs/{m}.pt" for m in models}
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as rebuilt:
            for info in infos:
                name = info.filename
                data = b"" if name in samples else zf.read(info)
                if name not in samples:
                    _check_member(path, name[len(root):], data, name in raw)
                rebuilt.writestr(name, data)
    out.seek(0)
    return out


def _json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Any:
    if info.file_size > MAX_JSON_BYTES:
        raise UsageError(f"model {path}: member {info.filename!r} is {info.file_size} bytes; "
                         f"a JSON member may have at most {gib(MAX_JSON_BYTES)}")
    try:
        return json.loads(zf.read(info))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"model {path}: member {info.filename!r} is not valid JSON "
                         f"({one_line(exc)})") from exc


def _raw_payloads(path: Path, root: str, configs: dict[str, Any]) -> set[str]:
    """Members the weight/constant configs name as raw tensor bytes (read, never unpickled);
    refuses an entry marked use_pickle, a pickled constant, or tensors too big to allocate."""
    raw: set[str] = set()
    elements = 0
    for name, doc in configs.items():
        if _says_use_pickle(doc):
            raise _refuse(path, name, "marks a payload use_pickle (a pickled tensor)")
        entries = doc.get("config") if isinstance(doc, dict) else None
        folder = name.rsplit("/", 1)[0] + "/"
        if not isinstance(entries, dict) or not folder.startswith(root + "data/"):
            continue
        for meta in entries.values():
            if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                continue
            if meta["path_name"].startswith(_PICKLED_CONSTANT_PREFIXES):
                raise _refuse(path, folder + meta["path_name"], "is a pickled object constant")
            raw.add(folder + meta["path_name"])
            elements += _numel(meta.get("tensor_meta"))
    if elements * 8 > MAX_PT2_BYTES:  # torch allocates zeros for an empty payload
        raise UsageError(f"model {path}: its weights declare {elements} elements, over the "
                         f"{gib(MAX_PT2_BYTES)} limit")
    return raw


def _numel(tensor_meta: Any) -> int:
    sizes = tensor_meta.get("sizes") if isinstance(tensor_meta, dict) else None
    if not isinstance(sizes, list):
        return 0
    dims = [s.get("as_int") for s in sizes if isinstance(s, dict)]
    return math.prod(d if isinstance(d, int) and d > 0 else 1 for d in dims)


def _says_use_pickle(doc: Any, depth: int = 0) -> bool:
    if depth > 64:
        return False
    if isinstance(doc, dict):
        return bool(doc.get("use_pickle")) or any(
            _says_use_pickle(v, depth + 1) for v in doc.values() if isinstance(v, dict | list))
    if isinstance(doc, list):
        return any(_says_use_pickle(v, depth + 1) for v in doc if isinstance(v, dict | list))
    return False


def _check_member(path: Path, name: str, data: bytes, raw: bool) -> None:
    lowered = name.lower()
    if lowered.endswith(PICKLE_SUFFIXES):
        raise _refuse(path, name, "is a pickle file (torch.load format)")
    if lowered.startswith("data/aotinductor/") or lowered.endswith(_NATIVE_SUFFIXES):
        raise _refuse(path, name, "is compiled native code (an AOTInductor package)")
    if not raw and looks_like_pickle(data[:2]):
        raise _refuse(path, name, "is a pickle (it starts with a pickle protocol header)")
