"""The cost model's view of an ONNX graph: operators with MACs, data type and bytes moved,
after shape inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from targets.base import Op, pad_lanes

_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int32": 4, "int64": 8}

_ONNX_ELEMENTWISE = {"Add", "Mul", "Sub", "Div", "Relu", "Sigmoid", "Tanh", "Erf", "Clip",
                     "LeakyRelu", "HardSwish", "HardSigmoid", "Gelu", "Sqrt", "Pow"}
_ONNX_POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
                 "ReduceSum"}
_ONNX_FREE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Constant", "Identity",
              "QuantizeLinear", "DequantizeLinear", "Cast"}


def read_ops(path: Path) -> list[Op]:
    """Q/DQ pairs are folded by ONNX Runtime into integer kernels: an op fed by
    DequantizeLinear counts as int8 and the Q/DQ nodes themselves as free."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[:1]:
        if not dim.HasField("dim_value"):
            dim.dim_value = 1
    try:  # ONNX Runtime's symbolic inference follows the reshapes inside attention blocks
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:
        model = shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int, ...]] = {}
    elem: dict[str, int] = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        shapes[init.name], elem[init.name] = arr.shape, arr.dtype.itemsize
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
            elem[vi.name] = {1: 4, 10: 2, 3: 1, 2: 1, 7: 8, 6: 4}.get(
                vi.type.tensor_type.elem_type, 4)
    producers = {o: n for n in model.graph.node for o in n.output}
    ops = []
    for node in model.graph.node:
        if node.op_type in _ONNX_FREE:
            continue
        out = shapes.get(node.output[0])
        if out is None:
            continue
        out_elems = int(np.prod(out))
        quantized = any(producers.get(i) is not None
                        and producers[i].op_type == "DequantizeLinear" for i in node.input)
        dtype = "int8" if quantized else ("fp16" if elem.get(node.output[0]) == 2 else "fp32")
        width = _DTYPE_BYTES[dtype]
        nbytes = sum(int(np.prod(shapes[i])) * width for i in node.input if i in shapes)
        nbytes += out_elems * width
        kind, macs = "other", out_elems
        padded = macs
        if node.op_type == "Conv" and node.input[1] in shapes:
            w = shapes[node.input[1]]  # (O, I/groups, KH, KW); output (N, O, H, W)
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            kind = "depthwise" if groups > 1 and w[1] == 1 else "conv"
            macs = out_elems * int(np.prod(w[1:]))
            blocks = out_elems // out[1] * pad_lanes(out[1])
            padded = blocks * int(np.prod(w[2:])) * (1 if w[1] == 1 else pad_lanes(w[1]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            k = int(a[-1] if a else 1)
            kind, macs = "matmul", out_elems * k
            padded = out_elems // out[-1] * pad_lanes(out[-1]) * pad_lanes(k)
        elif node.op_type in _ONNX_ELEMENTWISE:
            kind = "elementwise"
        elif node.op_type in _ONNX_POOLING:
            x = shapes.get(node.input[0])
            kind, macs = "pooling", int(np.prod(x)) if x else out_elems
            padded = macs
        ops.append(Op(node.name or node.op_type, kind, dtype, macs, nbytes, padded))
    return ops
