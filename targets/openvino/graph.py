"""The cost model's view of an OpenVINO IR: operators with MACs, data type and bytes moved
(FakeQuantize inputs mark int8 arithmetic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from targets.base import Op, pad_lanes

_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}

_OV_ELEMENTWISE = {"Add", "Multiply", "Subtract", "Divide", "Relu", "Sigmoid", "Tanh", "Gelu",
                   "Clamp", "HSwish", "Swish", "Power", "Sqrt", "Erf"}
_OV_POOLING = {"MaxPool", "AvgPool", "ReduceMean", "ReduceSum"}
_OV_FREE = {"Parameter", "Result", "Constant", "Reshape", "Squeeze", "Unsqueeze", "ShapeOf",
            "Convert", "Gather", "Concat"}


def read_ops(path: Path) -> list[Op]:
    import openvino as ov

    model = ov.Core().read_model(str(path))
    model.reshape({model.inputs[0]: [1, *list(model.inputs[0].get_partial_shape())[1:]]})
    ops = []
    for node in model.get_ordered_ops():
        kind_name = node.get_type_name()
        if kind_name in _OV_FREE or kind_name == "FakeQuantize":
            continue
        out = node.get_output_partial_shape(0)
        if not out.is_static:
            continue
        out_elems = int(np.prod([d.get_length() for d in out]))
        ins = [node.input(i) for i in range(node.get_input_size())]
        quantized = any(i.get_source_output().get_node().get_type_name() == "FakeQuantize"
                        for i in ins)
        dtype = "int8" if quantized else "fp32"
        width = _DTYPE_BYTES[dtype]
        nbytes = out_elems * width
        for i in ins:
            shape = i.get_partial_shape()
            if shape.is_static:
                nbytes += int(np.prod([d.get_length() for d in shape])) * width
        kind, macs = "other", out_elems
        padded = macs
        out_dims = [d.get_length() for d in out]
        if kind_name in ("Convolution", "GroupConvolution"):
            w = [d.get_length() for d in ins[1].get_partial_shape()]
            blocks = out_elems // out_dims[1] * pad_lanes(out_dims[1])
            if kind_name == "GroupConvolution":  # (G, O/G, I/G, KH, KW)
                kind = "depthwise" if w[2] == 1 else "conv"
                macs = out_elems * int(np.prod(w[2:]))
                padded = blocks * int(np.prod(w[3:])) * (1 if w[2] == 1 else pad_lanes(w[2]))
            else:  # (O, I, KH, KW)
                kind, macs = "conv", out_elems * int(np.prod(w[1:]))
                padded = blocks * int(np.prod(w[2:])) * pad_lanes(w[1])
        elif kind_name == "MatMul":
            a = [d.get_length() for d in ins[0].get_partial_shape()]
            kind, macs = "matmul", out_elems * int(a[-1])
            padded = out_elems // out_dims[-1] * pad_lanes(out_dims[-1]) * pad_lanes(a[-1])
        elif kind_name == "ScaledDotProductAttention":  # q (..., L, d) k (..., S, d)
            q = [d.get_length() for d in ins[0].get_partial_shape()]
            k = [d.get_length() for d in ins[1].get_partial_shape()]
            kind, macs = "matmul", 2 * int(np.prod(q)) * int(k[-2])
            padded = macs
        elif kind_name in _OV_ELEMENTWISE:
            kind = "elementwise"
        elif kind_name in _OV_POOLING:
            kind = "pooling"
        ops.append(Op(node.get_friendly_name(), kind, dtype, macs, nbytes, padded))
    return ops
