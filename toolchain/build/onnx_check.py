"""An `.onnx` model, checked before onnx or ONNX Runtime loads it.

The protobuf is read without its external data; every tensor stored outside the file must name
a file inside the model's folder (no absolute path, no `..`, no symlink out), so loading the
model cannot read `/etc/passwd` or another user's file into the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

from toolchain.build.safe_archive import check_file_size, gib, one_line
from toolchain.errors import UsageError

MAX_ONNX_BYTES = 2 * 2**30  # protobuf's own limit for one message
MAX_EXTERNAL_BYTES = 8 * 2**30  # all external data files together


def check_onnx(path: Path) -> None:
    """Refuse an unreadable or oversized model, or external data that leaves its folder."""
    import onnx

    check_file_size(path, "model", MAX_ONNX_BYTES)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, and more for odd files
        raise UsageError(f"model {path}: not an ONNX model ({one_line(exc)})") from exc
    folder = path.resolve().parent
    seen: dict[Path, int] = {}
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = _external_file(path, folder, tensor.name, where)
        seen.setdefault(target, target.stat().st_size)
    if (total := sum(seen.values())) > MAX_EXTERNAL_BYTES:
        raise UsageError(f"model {path}: its external data files hold {total} bytes, over the "
                         f"{gib(MAX_EXTERNAL_BYTES)} limit")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises several types for malformed files
        raise UsageError(f"model {path}: not a valid ONNX model ({one_line(exc)})") from exc


def _external_file(path: Path, folder: Path, tensor: str, where: str) -> Path:
    def refuse(why: str) -> UsageError:
        return UsageError(f"model {path}: tensor {tensor!r} keeps its data in {where!r}, "
                          f"which {why}; external data must be a file beside the model")

    pure = PurePath(where.replace("\\", "/"))
    if not where or "\0" in where:
        raise refuse("is not a file name")
    if pure.is_absolute() or where.startswith(("/", "\\")) or ".." in pure.parts:
        raise refuse("leaves the model's folder (absolute or with '..')")
    target = (folder / pure).resolve()
    if not target.is_relative_to(folder):
        raise refuse("is a link out of the model's folder")
    if not target.is_file():
        raise refuse("does not exist or is not a regular file")
    return target


def _tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto in the model: initializers and attributes, in every subgraph and
    function, without recursion (a deep nest of subgraphs must not blow the stack)."""
    graphs = [model.graph] + [t.initialization for t in model.training_info] + [
        t.algorithm for t in model.training_info]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            nodes.extend(graph.node)
            continue
        for attr in nodes.pop().attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)
