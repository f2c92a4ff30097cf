"""The cost model's view of a .tflite model: operators with MACs, data type and bytes moved,
read through the interpreter."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from targets.base import Op, arithmetic_dtype, pad_lanes

_TFLITE_KIND = {
    "CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise", "FULLY_CONNECTED": "matmul",
    "BATCH_MATMUL": "matmul", "AVERAGE_POOL_2D": "pooling", "MAX_POOL_2D": "pooling",
    "MEAN": "pooling", "SUM": "pooling", "ADD": "elementwise", "MUL": "elementwise",
    "SUB": "elementwise", "LOGISTIC": "elementwise", "RELU": "elementwise",
    "RELU6": "elementwise", "TANH": "elementwise", "GELU": "elementwise", "DIV": "elementwise",
    "HARD_SWISH": "elementwise", "QUANTIZE": "elementwise", "DEQUANTIZE": "elementwise",
}


def read_ops(path: Path) -> list[Op]:
    from targets.litert.run import interpreter_class

    interp = interpreter_class()(model_path=str(path))
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
        blocks = out_elems // max(out_ch, 1) * pad_lanes(out_ch)
        if name == "CONV_2D" and len(ins) > 1:  # weights (O, KH, KW, I)
            w = ins[1]["shape"]
            macs = out_elems * int(np.prod(w[1:]))
            padded = blocks * int(np.prod(w[1:3])) * pad_lanes(w[3])
        elif name == "DEPTHWISE_CONV_2D" and len(ins) > 1:  # weights (1, KH, KW, O)
            macs = out_elems * int(np.prod(ins[1]["shape"][1:3]))
            padded = blocks * int(np.prod(ins[1]["shape"][1:3]))
        elif name == "FULLY_CONNECTED" and len(ins) > 1:  # weights (O, I)
            macs = out_elems * int(ins[1]["shape"][-1])
            padded = blocks * pad_lanes(ins[1]["shape"][-1])
        elif name == "BATCH_MATMUL":
            macs = out_elems * int(ins[0]["shape"][-1])
            padded = blocks * pad_lanes(ins[0]["shape"][-1])
        elif kind == "pooling" and ins:
            macs = padded = int(np.prod(ins[0]["shape"]))
        if name in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS"):
            nbytes = 0  # a view, no data moves
        dtype = arithmetic_dtype(ins[0]["dtype"] if ins else outs[0]["dtype"])
        ops.append(Op(f"{name}_{op['index']}", kind, dtype, macs, nbytes, padded))
    return ops
