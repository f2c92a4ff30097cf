"""An exported model as a list of operators with their cost drivers: what kind of op, in which
data type, how many multiply-accumulates (or elements, for ops without MACs) and how many bytes
it reads and writes. Read from the file each backend runs: LiteRT flatbuffers (through the
interpreter), ONNX graphs (after shape inference) and OpenVINO IR."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("conv", "depthwise", "matmul", "elementwise", "pooling", "other")
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int32": 4, "int64": 8}


LANES = 8  # kernels work on channel blocks of this many (AVX2/AVX-512 and NEON kernels alike)


def _pad(n: int) -> int:
    return -(-int(n) // LANES) * LANES


@dataclass(frozen=True)
class Op:
    name: str
    kind: str
    dtype: str  # the arithmetic's data type: fp32, fp16 or int8
    macs: int  # multiply-accumulates; for ops without them, elements produced
    bytes: int  # inputs read plus outputs written
    padded_macs: int = 0  # the MACs with channel counts rounded up to whole blocks of LANES

    @property
    def work(self) -> int:
        return self.padded_macs or self.macs


def _dtype(numpy_dtype: object) -> str:
    kind = np.dtype(numpy_dtype)
    if kind in (np.int8, np.uint8):
        return "int8"
    if kind == np.float16:
        return "fp16"
    return "fp32"


# ---- LiteRT --------------------------------------------------------------------------------

_TFLITE_KIND = {
    "CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise", "FULLY_CONNECTED": "matmul",
    "BATCH_MATMUL": "matmul", "AVERAGE_POOL_2D": "pooling", "MAX_POOL_2D": "pooling",
    "MEAN": "pooling", "SUM": "pooling", "ADD": "elementwise", "MUL": "elementwise",
    "SUB": "elementwise", "LOGISTIC": "elementwise", "RELU": "elementwise",
    "RELU6": "elementwise", "TANH": "elementwise", "GELU": "elementwise", "DIV": "elementwise",
    "HARD_SWISH": "elementwise", "QUANTIZE": "elementwise", "DEQUANTIZE": "elementwise",
}


def tflite_ops(path: Path) -> list[Op]:
    from targets.litert_backend import _interpreter_class

    interp = _interpreter_class()(model_path=str(path))
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    ops = []
    for op in interp._get_ops_details():
        ins = [tensors[i] for i in op["inputs"] if i >= 0 and i in tensors]
        outs = [tensors[i] for i in op["outputs"] if i in tensors]
        if not outs:
            continue
        out_elems = int(np.prod(outs[0]["shape"]))
        nbytes = sum(int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
                     for t in ins + outs)
        name = op["op_name"]
        kind = _TFLITE_KIND.get(name, "other")
        macs = padded = out_elems
        out_ch = int(outs[0]["shape"][-1]) if len(outs[0]["shape"]) else 1
        blocks = out_elems // max(out_ch, 1) * _pad(out_ch)
        if name == "CONV_2D" and len(ins) > 1:  # weights (O, KH, KW, I)
            w = ins[1]["shape"]
            macs = out_elems * int(np.prod(w[1:]))
            padded = blocks * int(np.prod(w[1:3])) * _pad(w[3])
        elif name == "DEPTHWISE_CONV_2D" and len(ins) > 1:  # weights (1, KH, KW, O)
            macs = out_elems * int(np.prod(ins[1]["shape"][1:3]))
            padded = blocks * int(np.prod(ins[1]["shape"][1:3]))
        elif name == "FULLY_CONNECTED" and len(ins) > 1:  # weights (O, I)
            macs = out_elems * int(ins[1]["shape"][-1])
            padded = blocks * _pad(ins[1]["shape"][-1])
        elif name == "BATCH_MATMUL":
            macs = out_elems * int(ins[0]["shape"][-1])
            padded = blocks * _pad(ins[0]["shape"][-1])
        elif kind == "pooling" and ins:
            macs = padded = int(np.prod(ins[0]["shape"]))
        if name in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS"):
            nbytes = 0  # a view, no data moves
        dtype = _dtype(ins[0]["dtype"] if ins else outs[0]["dtype"])
        ops.append(Op(f"{name}_{op['index']}", kind, dtype, macs, nbytes, padded))
    return ops


# ---- ONNX ----------------------------------------------------------------------------------

_ONNX_ELEMENTWISE = {"Add", "Mul", "Sub", "Div", "Relu", "Sigmoid", "Tanh", "Erf", "Clip",
                     "LeakyRelu", "HardSwish", "HardSigmoid", "Gelu", "Sqrt", "Pow"}
_ONNX_POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
                 "ReduceSum"}
_ONNX_FREE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Constant", "Identity",
              "QuantizeLinear", "DequantizeLinear", "Cast"}


def onnx_ops(path: Path) -> list[Op]:
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
            blocks = out_elems // out[1] * _pad(out[1])
            padded = blocks * int(np.prod(w[2:])) * (1 if w[1] == 1 else _pad(w[1]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            k = int(a[-1] if a else 1)
            kind, macs = "matmul", out_elems * k
            padded = out_elems // out[-1] * _pad(out[-1]) * _pad(k)
        elif node.op_type in _ONNX_ELEMENTWISE:
            kind = "elementwise"
        elif node.op_type in _ONNX_POOLING:
            x = shapes.get(node.input[0])
            kind, macs = "pooling", int(np.prod(x)) if x else out_elems
            padded = macs
        ops.append(Op(node.name or node.op_type, kind, dtype, macs, nbytes, padded))
    return ops


# ---- OpenVINO ------------------------------------------------------------------------------

_OV_ELEMENTWISE = {"Add", "Multiply", "Subtract", "Divide", "Relu", "Sigmoid", "Tanh", "Gelu",
                   "Clamp", "HSwish", "Swish", "Power", "Sqrt", "Erf"}
_OV_POOLING = {"MaxPool", "AvgPool", "ReduceMean", "ReduceSum"}
_OV_FREE = {"Parameter", "Result", "Constant", "Reshape", "Squeeze", "Unsqueeze", "ShapeOf",
            "Convert", "Gather", "Concat"}


def openvino_ops(path: Path) -> list[Op]:
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
            blocks = out_elems // out_dims[1] * _pad(out_dims[1])
            if kind_name == "GroupConvolution":  # (G, O/G, I/G, KH, KW)
                kind = "depthwise" if w[2] == 1 else "conv"
                macs = out_elems * int(np.prod(w[2:]))
                padded = blocks * int(np.prod(w[3:])) * (1 if w[2] == 1 else _pad(w[2]))
            else:  # (O, I, KH, KW)
                kind, macs = "conv", out_elems * int(np.prod(w[1:]))
                padded = blocks * int(np.prod(w[2:])) * _pad(w[1])
        elif kind_name == "MatMul":
            a = [d.get_length() for d in ins[0].get_partial_shape()]
            kind, macs = "matmul", out_elems * int(a[-1])
            padded = out_elems // out_dims[-1] * _pad(out_dims[-1]) * _pad(a[-1])
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


def graph_ops(model_file: Path) -> list[Op]:
    suffix = model_file.suffix
    if suffix == ".tflite":
        return tflite_ops(model_file)
    if suffix == ".onnx":
        return onnx_ops(model_file)
    if suffix == ".xml":
        return openvino_ops(model_file)
    raise ValueError(f"no operator reader for {model_file.name} (.tflite, .onnx, .xml)")
