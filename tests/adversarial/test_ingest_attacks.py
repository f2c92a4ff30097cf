"""Hostile --model / --teacher / distill.student references and --data files.

Every case is a real file crafted to attack one reader (torch.export.load, onnx, np.load, PIL);
each must end in one UsageError (exit 2 from the CLI, one line, nothing written to --out),
run no payload (a pickle here would create a sentinel file) and read nothing it was not asked
to (no external data outside the model's folder, nothing decoded past a cap).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolchain.build.data import load_data
from toolchain.build.ingest import ingest_model
from toolchain.cli import cli
from toolchain.errors import UsageError


class Payload:
    """Unpickling this creates the sentinel file: proof that a pickle ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def payload_bytes(sentinel: Path) -> bytes:
    return pickle.dumps(Payload(sentinel), protocol=2)


def ingest(ref: str, trust_pickle: bool = False):
    return ingest_model(ref, in_channels=1, num_classes=2, pretrained=False,
                        trust_pickle=trust_pickle)


def refused(ref: str, *words: str, trust_pickle: bool = False) -> str:
    with pytest.raises(UsageError) as info:
        ingest(ref, trust_pickle)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    for word in words:
        assert word in message, message
    return message


def refused_data(ref: str, *words: str) -> str:
    with pytest.raises(UsageError) as info:
        load_data(ref, seed=0, image_size=8)
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def build(tmp_path: Path, *args: str):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["build", "--target", "host-cpu", "--epochs", "1",
                                      "--bench-runs", "10", "--quiet", "--out", str(out),
                                      *args])
    assert not out.exists(), "a refused build wrote to --out"
    return result


# --- .pt2 -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 2, 2),)), path)
    return path


def rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a zip member by member; change(name, data) returns new (name, data) pairs."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data in change(info.filename, zin.read(info)):
                zout.writestr(name, data)
    return dst


def root_of(pt2: Path) -> str:
    with zipfile.ZipFile(pt2) as zf:
        return zf.namelist()[0].split("/", 1)[0]


def pickled_weight_pt2(good: Path, dst: Path, sentinel: Path) -> Path:
    """weight_0 marked use_pickle and replaced by the payload: torch.load(weights_only=False)."""
    def change(name, data):
        if name.endswith("model_weights_config.json"):
            doc = json.loads(data)
            for meta in doc["config"].values():
                if meta["path_name"] == "weight_0":
                    meta["use_pickle"] = True
            data = json.dumps(doc).encode()
        elif name.endswith("data/weights/weight_0"):
            data = payload_bytes(sentinel)
        return [(name, data)]
    return rewrite(good, dst, change)


def test_pt2_pickled_weight_is_refused_and_never_unpickled(tmp_path, good_pt2):
    sentinel = tmp_path / "pwned"
    evil = pickled_weight_pt2(good_pt2, tmp_path / "evil.pt2", sentinel)
    result = build(tmp_path, "--model", str(evil))
    assert result.exit_code == 2, result.output
    assert "model_weights_config.json" in result.output and "use_pickle" in result.output
    assert "--trust-pickle" in result.output and "Traceback" not in result.output
    assert not sentinel.exists()
    # the control: torch itself runs the payload, so the refusal above is what saved us
    with contextlib.suppress(Exception):
        torch.export.load(str(evil))
    assert sentinel.exists()


def test_pt2_as_teacher_is_checked_the_same_way(tmp_path, good_pt2):
    sentinel = tmp_path / "pwned"
    evil = pickled_weight_pt2(good_pt2, tmp_path / "teacher.pt2", sentinel)
    result = build(tmp_path, "--teacher", str(evil))
    assert result.exit_code == 2 and "--trust-pickle" in result.output, result.output
    assert not sentinel.exists()


def test_pt2_legacy_pickled_weights_member(tmp_path, good_pt2):
    sentinel = tmp_path / "pwned"
    root = root_of(good_pt2)
    evil = rewrite(good_pt2, tmp_path / "legacy.pt2", lambda n, d: [(n, d)] + (
        [(f"{root}/data/weights/model.pt", payload_bytes(sentinel))]
        if n.endswith("archive_format") else []))
    refused(str(evil), "'data/weights/model.pt'", "pickle", "--trust-pickle")
    assert not sentinel.exists()


def test_pt2_member_with_a_pickle_header_under_any_name(tmp_path, good_pt2):
    root = root_of(good_pt2)
    evil = rewrite(good_pt2, tmp_path / "hidden.pt2", lambda n, d: [(n, d)] + (
        [(f"{root}/extra/notes", payload_bytes(tmp_path / "s"))]
        if n.endswith("archive_format") else []))
    refused(str(evil), "'extra/notes'", "pickle protocol header", "--trust-pickle")


def test_pt2_pickled_object_constant(tmp_path, good_pt2):
    def change(name, data):
        if name.endswith("model_constants_config.json"):
            data = json.dumps({"config": {"obj": {"path_name": "custom_obj_0"}}}).encode()
        return [(name, data)]
    evil = rewrite(good_pt2, tmp_path / "constant.pt2", change)
    refused(str(evil), "custom_obj_0", "pickled object constant", "--trust-pickle")


def test_pt2_sample_inputs_pickle_is_never_handed_to_torch(tmp_path, good_pt2):
    """torch loads the sample inputs with weights_only=True, then falls back to a full
    unpickle: every .pt2 has them, so we do not refuse them but empty them."""
    sentinel = tmp_path / "pwned"
    evil = rewrite(good_pt2, tmp_path / "samples.pt2", lambda n, d: [
        (n, payload_bytes(sentinel) if "sample_inputs" in n else d)])
    model = ingest(str(evil))
    assert not sentinel.exists()
    assert model.module(torch.ones(1, 1, 2, 2)).shape == (1, 2)
    with contextlib.suppress(Exception):  # the control: torch's own load runs it
        torch.export.load(str(evil))
    assert sentinel.exists()


def test_pt2_good_file_loads_with_and_without_trust(good_pt2):
    x = torch.ones(1, 1, 2, 2)
    a, b = ingest(str(good_pt2)), ingest(str(good_pt2), trust_pickle=True)
    assert a.traced and torch.equal(a.module(x), b.module(x))


def test_pt2_not_a_zip(tmp_path):
    (tmp_path / "junk.pt2").write_bytes(b"\x80\x04 this is no zip" * 10)
    refused(str(tmp_path / "junk.pt2"), "not a zip archive")


@pytest.mark.parametrize("name", ["../../escape.txt", "/etc/cron.d/x", "m/../../x",
                                  "C:/Windows/x"])
def test_pt2_member_names_that_escape(tmp_path, good_pt2, name):
    evil = rewrite(good_pt2, tmp_path / "escape.pt2", lambda n, d: [(n, d)] + (
        [(name, b"x")] if n.endswith("archive_format") else []))
    refused(str(evil), "escapes the archive", repr(name))


def declare_size(path: Path, member_suffix: str, size: int) -> None:
    """Patch the central directory so that a member claims `size` bytes uncompressed."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        (name_len,) = struct.unpack_from("<H", data, at + 28)
        if bytes(data[at + 46: at + 46 + name_len]).decode().endswith(member_suffix):
            struct.pack_into("<I", data, at + 24, size)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


def test_pt2_zip_bomb_declared_size(tmp_path, good_pt2):
    bomb = tmp_path / "bomb.pt2"
    bomb.write_bytes(good_pt2.read_bytes())
    declare_size(bomb, "models/model.json", 0xFFFFFFF0)
    refused(str(bomb), "models/model.json", "declares 4294967280 bytes uncompressed", "2 GiB")


def test_pt2_and_onnx_size_cap_before_reading(tmp_path):
    for name in ("huge.pt2", "huge.onnx"):
        with open(tmp_path / name, "wb") as f:  # sparse: costs no disk, and no reading
            f.truncate(2 * 2**30 + 1)
        refused(str(tmp_path / name), "over the 2 GiB limit")


def test_pickle_pt_without_trust_is_refused_unread(tmp_path):
    sentinel = tmp_path / "pwned"
    (tmp_path / "m.pt").write_bytes(payload_bytes(sentinel))
    result = build(tmp_path, "--model", str(tmp_path / "m.pt"))
    assert result.exit_code == 2 and "--trust-pickle" in result.output
    assert "arbitrary code" in result.output and len(result.output.strip().splitlines()) == 1
    assert not sentinel.exists()


# --- .onnx ----------------------------------------------------------------------------------

def external_onnx(path: Path, location: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2],
                    data_location=TensorProto.EXTERNAL)
    w.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert model.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x.bin",
                                      "..\\..\\secret"])
def test_onnx_external_data_outside_the_folder(tmp_path, location):
    (tmp_path / "m").mkdir()
    path = external_onnx(tmp_path / "m" / "model.onnx", location)
    refused(str(path), "tensor 'w'", repr(location), "leaves the model's folder")


def test_onnx_external_data_through_a_symlink(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "secret").write_bytes(b"12345678")
    os.symlink(tmp_path / "secret", tmp_path / "m" / "w.bin")
    refused(str(external_onnx(tmp_path / "m" / "model.onnx", "w.bin")), "a link out")


def test_onnx_external_data_in_a_nested_subgraph_is_found(tmp_path):
    from onnx import TensorProto, helper

    inner = external_onnx(tmp_path / "inner.onnx", "/etc/shadow")
    import onnx

    branch = onnx.load(str(inner), load_external_data=False).graph
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "outer",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    path = tmp_path / "outer.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    refused(str(path), "'/etc/shadow'")


def test_onnx_external_data_beside_the_model_is_accepted(tmp_path):
    import onnx

    path = external_onnx(tmp_path / "model.onnx", "model.onnx.data")
    (tmp_path / "model.onnx.data").write_bytes(np.ones(2, np.float32).tobytes())
    assert ingest(str(path)).kind == "onnx"
    assert onnx.load(str(path)).graph.initializer[0].raw_data == np.ones(2, np.float32).tobytes()


def test_garbage_onnx(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"\xff\xfe garbage \x00" * 50)
    result = build(tmp_path, "--model", str(tmp_path / "g.onnx"))
    assert result.exit_code == 2 and "not an ONNX model" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


# --- factories ------------------------------------------------------------------------------

FACTORIES = {
    "raises_on_import.py": ("raise RuntimeError('boom at import')\n", "make",
                            "importing it failed: RuntimeError: boom at import"),
    "exits_on_import.py": ("import sys\nsys.exit(5)\n", "make", "SystemExit"),
    "syntax.py": ("def make(:\n", "make", "SyntaxError"),
    "returns_str.py": ("def make():\n    return 'model'\n", "make",
                       "returned a str, not an nn.Module"),
    "factory_raises.py": ("def make():\n    raise ValueError('bad\\nsecond line')\n", "make",
                          "calling it failed: ValueError: bad second line"),
}


@pytest.mark.parametrize("filename", sorted(FACTORIES))
def test_factory_file_failures_are_one_line(tmp_path, filename):
    source, attr, words = FACTORIES[filename]
    (tmp_path / filename).write_text(source)
    ref = f"{tmp_path / filename}:{attr}"
    refused(ref, words)


def test_factory_failure_through_the_cli_and_as_student(tmp_path):
    (tmp_path / "bad.py").write_text("def make(num_classes):\n    raise KeyError(num_classes)\n")
    ref = f"{tmp_path / 'bad.py'}:make"
    for args in (["--model", ref], ["--set", f'distill.student="{ref}"']):
        result = build(tmp_path, *args)
        assert result.exit_code == 2, result.output
        assert f"model factory {ref}: calling it failed: KeyError: 10" in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_factory_missing_file_and_module_raising_on_import(tmp_path, monkeypatch):
    refused(f"{tmp_path / 'gone.py'}:make", "not found", "gone.py")
    (tmp_path / "edgepack_hostile_mod.py").write_text("raise ValueError('no import for you')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    refused("edgepack_hostile_mod:make", "importing edgepack_hostile_mod failed",
            "ValueError: no import for you")
    assert "edgepack_hostile_mod" not in sys.modules


# --- .npz -----------------------------------------------------------------------------------

def npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


X = np.zeros((12, 1, 4, 4), np.float32)
Y = np.repeat(np.arange(3), 4)


@pytest.mark.parametrize("case,arrays,words", [
    ("huge_label", {"x": X, "y": np.full(12, 300_000_000)}, ["class id 300000000"]),
    ("negative_label", {"x": X, "y": -Y}, ["class id -2"]),
    ("float_labels", {"x": X, "y": Y.astype(np.float32)}, ["y integer class ids", "float32"]),
    ("zero_samples", {"x": X[:0], "y": Y[:0]}, ["no samples"]),
    ("too_few", {"x": X, "y": np.array([0] * 11 + [1])}, ["fewer than 3 samples"]),
    ("inf", {"x": np.where(X == 0, np.inf, X), "y": Y}, ["NaN or infinite"]),
    ("rank", {"x": X[:, 0], "y": Y}, ["expected 4 dimensions"]),
    ("complex", {"x": X.astype(np.complex64), "y": Y}, ["real numbers"]),
    ("lengths", {"x": X, "y": Y[:5]}, ["12 samples but y has 5"]),
    ("empty_sample", {"x": np.zeros((12, 1, 0, 4), np.float32), "y": Y}, ["C, H and W"]),
])
def test_npz_contents(tmp_path, case, arrays, words):
    refused_data(npz(tmp_path / f"{case}.npz", **arrays), f"{case}.npz", *words)


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "pwned"
    obj = np.empty(12, dtype=object)
    obj[:] = [Payload(sentinel)] * 12
    path = tmp_path / "obj.npz"
    np.savez(path, x=X, y=obj)
    refused_data(str(path), "'y'", "Python objects", "pickle")
    assert not sentinel.exists()


def test_npz_zip_bomb_declared_size(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez(path, x=X, y=Y)
    declare_size(path, "x.npy", 0xFFFFFFF0)
    declare_size(path, "y.npy", 0xFFFFFFF0)
    refused_data(str(path), "'y.npy' declares 4294967280 bytes", "4 GiB")


def test_npz_array_header_claims_a_huge_shape(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 3, 1000, 1000)})
    buf.write(b"\0" * 64)
    path = tmp_path / "shape.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue())
        zf.writestr("y.npy", _npy(Y))
    refused_data(str(path), "array 'x' of shape (1000000, 3, 1000, 1000)", "over the 4 GiB")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_npz_not_a_zip_and_a_fifo(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 but not really")
    refused_data(str(tmp_path / "junk.npz"), "not a zip archive")
    os.mkfifo(tmp_path / "pipe.npz")  # np.load would block on it forever
    refused_data(str(tmp_path / "pipe.npz"), "not a regular file")


# --- image folders --------------------------------------------------------------------------

def png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; its pixel data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def image_folder(root: Path, per_class: int = 3) -> Path:
    from PIL import Image

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (6, 6), 40 * i).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("side,words", [(20000, "400000000 pixels"), (10000, "10000x10000")])
def test_image_header_too_big_is_refused_before_decoding(tmp_path, side, words):
    root = image_folder(tmp_path / "imgs")
    (root / "a" / "huge.png").write_bytes(png(side, side))
    refused_data(str(root), "huge.png", words, "pixel limit")


def test_image_folder_problems(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "a" / "fake.png").write_text("not an image at all")
    refused_data(str(root), "fake.png", "not a readable image")
    (root / "a" / "fake.png").unlink()
    (root / "empty").mkdir()
    refused_data(str(root), "empty", "holds no images")
    (root / "empty").rmdir()
    (tmp_path / "outside.png").write_bytes(png(4, 4))
    os.symlink(tmp_path / "outside.png", root / "b" / "link.png")
    refused_data(str(root), "link.png", "a link out of the data folder")
    (root / "b" / "link.png").unlink()
    os.symlink(tmp_path, root / "c")  # a class folder that is the parent folder
    refused_data(str(root), "a link out of the data folder")
    (root / "c").unlink()
    assert load_data(str(root), seed=0, image_size=8).labels == ["a", "b"]


def test_image_size_that_would_not_fit_in_memory(tmp_path):
    root = image_folder(tmp_path / "imgs")
    with pytest.raises(UsageError, match="6 images at 30000x30000 need more than 4 GiB"):
        load_data(str(root), seed=0, image_size=30000)


def test_unreadable_model_and_data(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    (tmp_path / "locked.onnx").write_bytes(b"x")
    (tmp_path / "locked.onnx").chmod(0)
    refused(str(tmp_path / "locked.onnx"), "cannot be read")
    root = image_folder(tmp_path / "imgs")
    (root / "a").chmod(0)
    try:
        refused_data(str(root), "cannot be read")
    finally:
        (root / "a").chmod(0o755)


def test_bad_data_through_the_cli_writes_nothing(tmp_path):
    path = npz(tmp_path / "labels.npz", x=X, y=np.full(12, 300_000_000))
    result = build(tmp_path, "--data", path, "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 2 and result.output.startswith("usage error: data "), result.output
    assert not (tmp_path / "r.json").exists()


# --- fuzz: random bytes under each suffix end in UsageError, never anything else ------------

@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".pt2", ".onnx", ".npz"]),
       zipped=st.booleans())
def test_random_bytes_are_refused_cleanly(tmp_path, data, suffix, zipped):
    path = tmp_path / f"fuzz{suffix}"
    if zipped:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("x.npy" if suffix == ".npz" else "m/models/model.json", data)
    else:
        path.write_bytes(data)
    with pytest.raises(UsageError) as info:
        if suffix == ".npz":
            load_data(str(path), seed=0)
        else:
            ingest(str(path))
    assert "\n" not in str(info.value)
