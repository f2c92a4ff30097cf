"""Hostile bundles and hostile inputs against the bundle reader, the manifest, model loading
and `edge-runtime verify/run`: every one is refused with one line naming the problem,
nothing is written past the sizes the manifest declares, the extraction folder is left
empty, no payload runs, and the runtime still works afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from runtime.bundle import (
    _GZIP_HEADER,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    BundleError,
    extract_bundle,
    write_bundle,
)
from runtime.cli import cli
from runtime.manifest import ManifestError
from targets.base import BackendUnavailable
from tests.conftest import BIN, run_cmd

GIB = 1 << 30
_ZEROS = bytes(1 << 20)


# -- writing hostile archives cheaply ----------------------------------------------------------
# A part of the decompressed stream: bytes, or a count of zero bytes (a gzip bomb costs ~1 KiB
# per MiB: the same deflate block, repeated after full flushes).
Part = bytes | int


def _write_gz(dst: Path, parts: list[Part]) -> Path:
    """A gzip file with edgepack's exact header around `parts`, valid CRC and length."""
    comp, crc, total = zlib.compressobj(9, zlib.DEFLATED, -15), 0, 0
    with open(dst, "wb") as f:
        f.write(_GZIP_HEADER)
        for part in parts:
            if isinstance(part, int):
                full, rest = divmod(part, len(_ZEROS))
                f.write(comp.flush(zlib.Z_FULL_FLUSH))
                block = comp.compress(_ZEROS) + comp.flush(zlib.Z_FULL_FLUSH)
                for _ in range(full):
                    f.write(block)
                    crc = zlib.crc32(_ZEROS, crc)
                part = bytes(rest)
                total += full * len(_ZEROS)
            f.write(comp.compress(part))
            crc, total = zlib.crc32(part, crc), total + len(part)
        f.write(comp.flush())
        f.write(crc.to_bytes(4, "little") + (total & 0xFFFFFFFF).to_bytes(4, "little"))
    return dst


def _info(name: str, size: int, kind: bytes = tarfile.REGTYPE, **pax: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, 0o644
    info.pax_headers = pax
    return info


def _tar_parts(entries: list[tuple[tarfile.TarInfo | bytes, Part]]) -> list[Part]:
    """Tar framing around (header, data) pairs; a header may be raw 512-byte blocks."""
    parts: list[Part] = []
    for header, data in entries:
        size = data if isinstance(data, int) else len(data)
        raw = header if isinstance(header, bytes) else header.tobuf(tarfile.PAX_FORMAT)
        parts += [raw, data, bytes(-size % 512)]
    return [*parts, bytes(1024)]


def _archive(dst: Path, entries: list[tuple[tarfile.TarInfo | bytes, Part]],
             tail: list[Part] = ()) -> Path:
    return _write_gz(dst, [*_tar_parts(entries), *tail])


def _gnu_sparse_header(name: str, stored: int, real: int) -> bytes:
    """A GNU sparse ('S') header: `stored` bytes in the archive stand for `real` bytes."""
    info = _info(name, stored, tarfile.GNUTYPE_SPARSE)
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    buf[386:410] = b"%011o\0%011o\0" % (0, stored)  # one sparse region: offset 0, `stored`
    buf[482] = 0  # no extension blocks
    buf[483:495] = b"%011o\0" % real
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


# -- the real bundle and what it holds -------------------------------------------------------
@pytest.fixture(scope="module")
def good(build_demo) -> Path:
    return build_demo("host-cpu").bundle


@pytest.fixture(scope="module")
def plain(good, tmp_path_factory) -> tuple[dict, dict[str, bytes]]:
    """The good bundle's manifest (as a dict) and its files' bytes."""
    folder = tmp_path_factory.mktemp("plain")
    manifest = extract_bundle(good, folder)
    return (json.loads((folder / MANIFEST).read_bytes()),
            {name: (folder / name).read_bytes() for name in manifest.files})


def _entries(manifest: dict, files: dict[str, bytes]) -> list[tuple[tarfile.TarInfo, bytes]]:
    blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return [(_info(MANIFEST, len(blob)), blob),
            *[(_info(name, len(data)), data) for name, data in sorted(files.items())]]


def _rewritten(plain, folder: Path, edit=None, replace: dict[str, bytes] | None = None,
               name: str = "b.edgepack") -> Path:
    """A bundle from the good one's files (`replace` swaps some, hashes recomputed) and its
    manifest with `edit(manifest)` applied: hostile contents that pass every hash."""
    manifest, files = json.loads(json.dumps(plain[0])), dict(plain[1])
    files.update(replace or {})
    src = folder / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    if edit:
        edit(manifest)
    manifest.pop("files", None)
    return write_bundle(folder / name, manifest, {rel: src / rel for rel in files})


def _edited_manifest(plain, folder: Path, edit, name: str = "m.edgepack") -> Path:
    """The good files with the manifest (files table included) edited as it stands."""
    manifest = json.loads(json.dumps(plain[0]))
    edit(manifest)
    return _archive(folder / name, _entries(manifest, plain[1]))


@contextlib.contextmanager
def _max_file_size(limit: int):
    """No file this process writes may grow past `limit` bytes (RLIMIT_FSIZE): a write past
    it fails with EFBIG, which an extraction would report as a different refusal."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _refused(path: Path, dest: Path, message: str, cap: int = 2 << 20) -> BundleError:
    """extract_bundle refuses `path` with `message`, never writing a file over `cap` bytes,
    and leaves `dest` empty."""
    with _max_file_size(cap), pytest.raises(BundleError) as err:
        extract_bundle(path, dest)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert not list(dest.iterdir()), "files left in the extraction folder"
    return err.value


# -- 1. resource exhaustion -------------------------------------------------------------------
def test_gnu_sparse_member_is_refused_before_writing(plain, tmp_path):
    manifest, files = plain
    blob = json.dumps(manifest).encode()
    name = manifest["golden"]["inputs"]
    bad = _archive(tmp_path / "sparse.edgepack", [
        (_info(MANIFEST, len(blob)), blob),
        (_gnu_sparse_header(name, 512, GIB), bytes(512))])
    assert bad.stat().st_size < 70 * 1024
    _refused(bad, tmp_path / "out", f"unsafe entry {name!r}: a sparse file")


def test_pax_sparse_member_is_refused_before_writing(plain, tmp_path):
    manifest, files = plain
    blob = json.dumps(manifest).encode()
    name = manifest["golden"]["inputs"]
    sparse = _info(name, 512, **{"GNU.sparse.map": "0,512", "GNU.sparse.size": str(GIB)})
    bad = _archive(tmp_path / "pax-sparse.edgepack",
                   [(_info(MANIFEST, len(blob)), blob), (sparse, bytes(512))])
    _refused(bad, tmp_path / "out", "sparse file")


def test_gzip_bomb_member_larger_than_declared(plain, tmp_path):
    """A 1 MiB bundle whose golden inputs expand to 1 GiB: refused from the tar header,
    before a byte of it is written."""
    manifest, files = plain
    entries = _entries(manifest, files)
    name = manifest["golden"]["inputs"]
    entries = [(_info(name, GIB), GIB) if info.name == name else (info, data)
               for info, data in entries]
    bad = _archive(tmp_path / "bomb.edgepack", entries)
    assert bad.stat().st_size < 3 << 20
    declared = manifest["files"][name]["size"]
    _refused(bad, tmp_path / "out", f"entry {name!r} is {GIB} bytes; the manifest declares "
                                    f"{declared}")


def test_gzip_bomb_after_the_archive_is_cut_off(plain, tmp_path):
    """Gigabytes of zeros hidden after the end of the tar: decompression stops at what the
    manifest accounts for."""
    bad = _archive(tmp_path / "tail.edgepack", _entries(*plain), tail=[GIB])
    _refused(bad, tmp_path / "out", "expands past")


def test_undeclared_member_is_refused_before_its_bytes(plain, tmp_path):
    entries = [*_entries(*plain), (_info("model/extra.bin", 512 << 20), 512 << 20)]
    bad = _archive(tmp_path / "undeclared.edgepack", entries)
    _refused(bad, tmp_path / "out", "entry 'model/extra.bin' is not listed in the manifest")


def test_huge_manifest_is_refused_from_its_header(tmp_path):
    """A 200 MB manifest.json (in a bundle of 200 KB): refused before any of it is read."""
    size = 200 * 10**6
    header = _tar_parts([(_info(MANIFEST, size), b"")])[0]
    parts = [header, b"{", size - 2, b"}", bytes(-size % 512), bytes(1024)]
    bad = _write_gz(tmp_path / "huge-manifest.edgepack", parts)
    err = _refused(bad, tmp_path / "out", f"{MANIFEST} is {size} bytes: at most "
                                          f"{MAX_MANIFEST_BYTES}")
    assert not isinstance(err, MemoryError)


def test_oversized_extended_header_is_refused(plain, tmp_path):
    manifest, files = plain
    blob = json.dumps(manifest).encode()
    padded = _info(MANIFEST, len(blob), comment="x" * (4 << 20))
    bad = _archive(tmp_path / "pax.edgepack", [(padded, blob)])
    _refused(bad, tmp_path / "out", "an extended archive header of")


def test_manifest_must_come_first(plain, tmp_path):
    entries = _entries(*plain)
    bad = _archive(tmp_path / "late.edgepack", [*entries[1:], entries[0]])
    _refused(bad, tmp_path / "out", "no manifest.json as its first entry")


@pytest.mark.parametrize("kind, what", [(tarfile.DIRTYPE, "non-file entry"),
                                        (tarfile.FIFOTYPE, "non-file entry"),
                                        (tarfile.CHRTYPE, "non-file entry"),
                                        (tarfile.SYMTYPE, "link")])
def test_special_members_are_refused(plain, tmp_path, kind, what):
    special = _info("golden/inputs.npy", 0, kind)
    special.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
    entries = _entries(*plain)
    bad = _archive(tmp_path / "special.edgepack", [entries[0], (special, b""), *entries[2:]])
    _refused(bad, tmp_path / "out", f"'golden/inputs.npy': a {what}")


# -- 2. manifest paths ------------------------------------------------------------------------
def _rename_file(old_key: str, new: str):
    def edit(m: dict) -> None:
        old = m[old_key] if old_key in m else old_key
        m["files"][new] = m["files"].pop(old)
        if old_key in m:
            m[old_key] = new
    return edit


def _add_file(name: str, like: str = "model_file"):
    def edit(m: dict) -> None:
        m["files"][name] = dict(m["files"][m[like]])
    return edit


def _point(field: str, value: str):
    def edit(m: dict) -> None:
        *parents, last = field.split(".")
        node = m
        for part in parents:
            node = node[part]
        node[last] = value
    return edit


def _declare_size(size: int):
    def edit(m: dict) -> None:
        m["files"][m["model_file"]]["size"] = size
    return edit


PATH_ATTACKS = {
    "absolute file name": (_rename_file("model_file", "/etc/passwd"), "unsafe name '/etc/passwd'"),
    "parent escape": (_rename_file("model_file", "model/../../x.onnx"), "unsafe name"),
    "backslash": (_rename_file("model_file", "model\\model.onnx"), "unsafe name"),
    "NUL in a name": (_rename_file("model_file", "model/model.onnx\0.txt"), "unsafe name"),
    "hidden file": (_rename_file("model_file", "model/.model.onnx"), "unsafe name"),
    "names differing in case": (_add_file("Model/model.onnx"), "differ only in case"),
    "a name both file and folder": (_add_file("model"), "both as a file and as a folder"),
    "the manifest itself as a file": (_add_file(MANIFEST), "the bundle's own entry"),
    "model file /dev/zero": (_point("model_file", "/dev/zero"),
                             "'model_file' must be a file listed in 'files'"),
    "golden outputs outside the table": (_point("golden.outputs", "../../etc/shadow"),
                                         "'golden.outputs' must be a file listed in 'files'"),
    "reference distributions by case": (_point("reference_distributions",
                                               "Reference/distributions.json"),
                                        "'reference_distributions' must be a file listed"),
    "a declared size past the cap": (_declare_size(9 * GIB), "manifest field 'files' declares"),
}


@pytest.mark.parametrize("case", sorted(PATH_ATTACKS))
def test_manifest_paths_must_be_plain_listed_names(plain, tmp_path, case):
    edit, message = PATH_ATTACKS[case]
    bad = _edited_manifest(plain, tmp_path, edit)
    err = _refused(bad, tmp_path / "out", message)
    assert isinstance(err, ManifestError)


# -- 3. contents that pass the hashes ---------------------------------------------------------
def _load_refused(path: Path, workdir: Path, message: str) -> BundleError:
    with pytest.raises(BundleError) as err:
        runtime.load(path, workdir=workdir)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert not list(workdir.iterdir()), "files left in the extraction folder"
    return err.value


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    with tempfile.TemporaryFile() as f:
        np.save(f, array, allow_pickle=allow_pickle)
        f.seek(0)
        return f.read()


class _Payload:
    """Unpickling this creates a sentinel file: proof that a pickle ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.mkdir, (str(self.sentinel),)


REF = "reference/distributions.json"
CONTENT_ATTACKS = {
    "reference not JSON": ({REF: b"{not json"}, f"{REF} is not valid JSON"),
    "reference of wrong types": (
        {REF: json.dumps({"input": {"histogram": {"edges": "0..1", "proportions": []}}})
         .encode()}, f"{REF}: input.histogram.edges must be a list of finite numbers"),
    "reference a list": ({REF: b"[1, 2]"}, f"{REF} must be a JSON object"),
    "reference nested deep": ({REF: b"[" * 100000}, f"{REF} is not valid JSON"),
    "golden inputs not an array": ({"golden/inputs.npy": os.urandom(4096)},
                                   "golden/inputs.npy is not a .npy array"),
    "golden outputs of strings": ({"golden/outputs.npy": _npy(np.array(["a"] * 8))},
                                  "golden/outputs.npy has dtype <U1"),
    "golden inputs of the wrong shape": ({"golden/inputs.npy": _npy(
        np.zeros((8, 3, 32, 32), np.float32))}, "golden/inputs.npy has shape (8, 3, 32, 32)"),
    "golden inputs with NaN": ({"golden/inputs.npy": _npy(
        np.full((8, 1, 32, 32), np.nan, np.float32))}, "NaN or infinite"),
    "model file of random bytes": ({"model/model.onnx": os.urandom(2048)},
                                   "backend 'onnxruntime' cannot load model/model.onnx"),
}


@pytest.mark.parametrize("case", sorted(CONTENT_ATTACKS))
def test_hostile_contents_with_valid_hashes(plain, tmp_path, case):
    replace, message = CONTENT_ATTACKS[case]
    bad = _rewritten(plain, tmp_path, replace=replace)
    _load_refused(bad, tmp_path / "api", message)
    result = CliRunner().invoke(cli, ["verify", str(bad)])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert isinstance(result.exception, SystemExit)


def test_pickled_golden_array_never_runs(plain, tmp_path):
    sentinel = tmp_path / "pwned"
    payload = _npy(np.array([_Payload(sentinel)] * 8, dtype=object), allow_pickle=True)
    bad = _rewritten(plain, tmp_path, replace={"golden/outputs.npy": payload})
    _load_refused(bad, tmp_path / "api", "golden/outputs.npy has dtype object")
    assert not sentinel.exists()


def test_golden_header_declaring_a_terabyte(plain, tmp_path):
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 1, 32, 32)}
    with tempfile.TemporaryFile() as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.seek(0)
        blob = f.read() + bytes(4096)
    bad = _rewritten(plain, tmp_path, replace={"golden/inputs.npy": blob})
    _load_refused(bad, tmp_path / "api", "golden/inputs.npy declares shape (1000000000000")


def test_garbage_model_for_another_backend(plain, tmp_path):
    """A .tflite of random bytes: one line naming the backend and the file."""
    def edit(m: dict) -> None:
        m["target"]["backend"], m["model_file"] = "litert", "model/model.tflite"

    files = {k: v for k, v in plain[1].items() if k != "model/model.onnx"}
    bad = _rewritten((plain[0], files), tmp_path, edit,
                     replace={"model/model.tflite": os.urandom(4096)})
    try:
        _load_refused(bad, tmp_path / "api", "backend 'litert' cannot load model/model.tflite")
    except BackendUnavailable:
        pytest.skip("this environment has no LiteRT runtime")


def test_preprocessing_that_cannot_apply(plain, tmp_path):
    bad = _rewritten(plain, tmp_path, _point("input.preprocessing", {
        "kind": "normalize", "layout": "NCHW", "mean": ["a"], "std": [0]}))
    _load_refused(bad, tmp_path / "api", "field 'input.preprocessing': 'mean' must be a list")


# -- edge-runtime run with hostile inputs, verify of non-bundles ------------------------------
def _inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    sentinel = tmp_path / "pwned"
    cases: dict[str, tuple[bytes, str, str]] = {
        "NaN": (_npy(np.full((2, 1, 32, 32), np.nan, np.float32)), ".npy", "NaN or infinite"),
        "inf": (_npy(np.full((2, 1, 32, 32), np.inf, np.float32)), ".npy", "NaN or infinite"),
        "wrong shape": (_npy(np.zeros((2, 3, 8), np.float32)), ".npy", "does not fit"),
        "object dtype": (_npy(np.array([_Payload(sentinel)], dtype=object), True), ".npy",
                         "dtype object"),
        "strings": (_npy(np.array(["1.0"] * 4)), ".npy", "dtype <U3"),
        "not numpy": (os.urandom(300), ".npy", "is not a .npy array"),
        "not a zip": (os.urandom(300), ".npz", "cannot be read as a .npz archive"),
    }
    out = {}
    for label, (blob, suffix, message) in cases.items():
        path = tmp_path / f"{label.replace(' ', '-')}{suffix}"
        path.write_bytes(blob)
        out[label] = (path, message)
    return out


def test_run_refuses_hostile_inputs(good, tmp_path):
    runner = CliRunner()
    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as f:  # a header that declares 4 TB, and 1 KiB of data
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 1)})
        f.write(bytes(1024))
    cases = {**_inputs(tmp_path), "4 TB declared": (huge, "declares shape (1000000000000, 1)")}
    for label, (path, message) in cases.items():
        result = runner.invoke(cli, ["run", str(good), "--input", str(path)])
        assert result.exit_code == 2, (label, result.output)
        assert message in result.stderr, (label, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (label, result.stderr)
        assert isinstance(result.exception, SystemExit), label
    assert not (tmp_path / "pwned").exists()
    # labels that do not match the inputs
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, x=np.zeros((3, 1, 32, 32), np.float32), y=np.zeros(5, np.int64))
    result = runner.invoke(cli, ["run", str(good), "--input", str(mismatched)])
    assert result.exit_code == 2 and "5 labels 'y' for 3 inputs" in result.stderr
    # and the runtime still runs good inputs afterwards
    fine = tmp_path / "fine.npy"
    np.save(fine, np.zeros((2, 1, 32, 32), np.float32))
    result = runner.invoke(cli, ["run", str(good), "--input", str(fine), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["count"] == 2


def test_verify_of_non_bundles_is_one_line_exit_1(good, tmp_path):
    data = good.read_bytes()
    cases = {"empty": b"", "text": b"hello\n", "random": os.urandom(4096),
             "truncated": data[: len(data) // 3],
             "tampered": data[:-6] + bytes([data[-6] ^ 1]) + data[-5:],  # its CRC
             "gzip of junk": _write_gz(tmp_path / "junk", [os.urandom(2000)]).read_bytes()}
    for label, blob in cases.items():
        path = tmp_path / f"{label}.edgepack"
        path.write_bytes(blob)
        result = CliRunner().invoke(cli, ["verify", str(path)])
        assert result.exit_code == 1, (label, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, (label, result.stderr)
        assert result.stderr.startswith("Error: "), label
        assert result.stderr.count(str(path)) == 1, (label, result.stderr)
    # the installed command, once: no traceback, exit 1
    proc = run_cmd(BIN / "edge-runtime", "verify", tmp_path / "truncated.edgepack", timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "truncated" in proc.stderr


def test_extraction_folder_is_emptied_when_the_model_fails(plain, tmp_path):
    bad = _rewritten(plain, tmp_path, replace={"model/model.onnx": os.urandom(100)})
    _load_refused(bad, tmp_path / "api", "cannot load")
    # a default (temporary) folder is removed too
    before = set(Path(tempfile.gettempdir()).glob("edgepack-*"))
    with pytest.raises(BundleError):
        runtime.load(bad)
    assert set(Path(tempfile.gettempdir()).glob("edgepack-*")) <= before


# -- 4. fuzzing --------------------------------------------------------------------------------
def _only_bundle_errors(path: Path) -> None:
    """extract_bundle on `path`: a BundleError (or success) and an empty folder on refusal."""
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "out"
        try:
            extract_bundle(path, dest)
        except BundleError:
            assert not list(dest.iterdir())


FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048), st.booleans())
def test_fuzz_random_bytes(tmp_path, blob, with_header):
    path = tmp_path / "random.edgepack"
    path.write_bytes((_GZIP_HEADER if with_header else b"") + blob)
    _only_bundle_errors(path)


@FUZZ
@given(data=st.data())
def test_fuzz_byte_mutations(good, tmp_path, data):
    blob = bytearray(good.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(blob))))
    path = tmp_path / "mutated.edgepack"
    path.write_bytes(bytes(blob[:cut]))
    _only_bundle_errors(path)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_structure(plain, tmp_path, data):
    manifest = json.loads(json.dumps(plain[0]))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(manifest) if p]
        path = data.draw(st.sampled_from(paths))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "rename", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(JSON)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "rename":
            parent[data.draw(st.text(min_size=1, max_size=12))] = parent.pop(path[-1])
        else:
            parent[data.draw(st.text(max_size=8))] = data.draw(JSON)
    blob = json.dumps(manifest).encode()
    path = _archive(tmp_path / "fuzzed.edgepack",
                    [(_info(MANIFEST, len(blob)), blob), *_entries(*plain)[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "api"
        try:
            runtime.load(path, workdir=workdir).close()
        except (BundleError, BackendUnavailable):
            assert not list(workdir.iterdir())
