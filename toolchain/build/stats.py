"""Parameter and MAC counts, for PyTorch modules and for ONNX graphs. MACs count the
multiply-accumulates of convolutions, linear layers and matrix products (what dominates
cost); normalization, activations and pooling are not MACs and are not counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def torch_stats(module: Any, example: np.ndarray) -> tuple[int, int]:
    """(params, MACs) of one forward pass at batch 1, counted with forward hooks."""
    import torch
    import torch.nn as nn

    from targets.base import eval_mode

    macs = 0

    def conv_hook(m: Any, inputs: Any, out: Any) -> None:
        nonlocal macs
        kernel = int(np.prod(m.kernel_size))
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            macs += int(inputs[0].numel()) * kernel * m.out_channels // m.groups
        else:
            macs += int(out.numel()) * kernel * m.in_channels // m.groups

    def linear_hook(m: Any, inputs: Any, out: Any) -> None:
        nonlocal macs
        macs += int(out.numel()) * m.in_features

    def attention_hook(m: Any, inputs: Any, out: Any) -> None:
        nonlocal macs
        q = inputs[0]  # (L, N, E) or (N, L, E): projections, scores, weighted sum, output
        tokens, e = int(q.numel() // q.shape[-1]), m.embed_dim
        length = q.shape[1] if m.batch_first else q.shape[0]
        macs += 4 * tokens * e * e + 2 * tokens * int(length) * e

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_hook(attention_hook))
    eval_mode(module)
    try:
        with torch.no_grad():
            module(torch.from_numpy(example[:1]))
    finally:
        for h in hooks:
            h.remove()
    if not hooks:
        raise ValueError("no countable layers (the module is a traced graph)")
    params = sum(p.numel() for p in module.parameters())
    return int(params), int(macs)


def onnx_stats(path: Path) -> tuple[int, int]:
    """(params, MACs) of an ONNX graph at batch 1: initializer sizes, and the MACs of its
    Conv, ConvTranspose, Gemm and MatMul nodes from inferred shapes."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    graph_input = model.graph.input[0]
    for dim in graph_input.type.tensor_type.shape.dim[:1]:
        if not dim.HasField("dim_value"):
            dim.dim_value = 1  # symbolic batch: count at batch 1
    model = shape_inference.infer_shapes(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    params = int(sum(a.size for a in inits.values()))
    shapes: dict[str, tuple[int, ...]] = {n: a.shape for n, a in inits.items()}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type == "Conv" and node.input[1] in shapes:
            w = shapes[node.input[1]]  # (out_ch, in_ch/groups, kh, kw)
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose" and node.input[1] in shapes:
            w = shapes[node.input[1]]  # (in_ch, out_ch/groups, kh, kw)
            x = shapes.get(node.input[0])
            if x:
                macs += int(np.prod(x)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            if a:
                transposed = node.op_type == "Gemm" and any(
                    at.name == "transA" and at.i for at in node.attribute)
                macs += int(np.prod(out)) * int(a[0] if transposed else a[-1])
    return params, macs


def model_stats(module: Any, exported: Path, x: np.ndarray, work: Path) -> tuple[int, int]:
    """(params, MACs): from the torch module where it can be walked, else from an ONNX graph
    (the exported file, or a fresh ONNX export of the module for counting only)."""
    if exported.suffix == ".onnx":
        return onnx_stats(exported)
    try:
        return torch_stats(module, x)
    except Exception:  # an ExportedProgram's graph module has no layers to hook
        import torch

        from targets.export_log import converter_output_to
        from targets.onnxruntime.export import export as export_onnx

        folder = work / "stats"
        folder.mkdir(exist_ok=True)
        with converter_output_to(work / "stats.log"):
            path = export_onnx(module, torch.from_numpy(x[:1]), folder)
        return onnx_stats(path)
