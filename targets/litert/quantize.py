"""LiteRT quantization: full-integer int8 (int8 weights, activations, inputs and outputs)
through litert-torch's PT2E quantizer, calibrated on samples; named layers can stay float;
quantization-aware fine-tuning as the last resort. Needs the PyTorch module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from targets.base import ExportUnsupported, QuantizeJob, eval_mode
from targets.litert.export import MODEL_FILE


def quantize(job: QuantizeJob) -> Path:
    if job.precision != "int8":
        raise ValueError(f"{job.precision} is not a precision LiteRT quantizes to")
    if job.module is None:
        raise ExportUnsupported("LiteRT int8 needs a PyTorch model")
    return int8(job.module, job.example, job.calibration, job.out_dir, job.float_layers)


def float_units(module: Any, fp32_path: Path) -> list[str]:
    """The torch module names of its convolutions and linear layers."""
    if module is None:
        raise ExportUnsupported("LiteRT int8 needs a PyTorch model")
    return quantizable_layers(module)


def qat(job: QuantizeJob, train: Callable[[Any], None]) -> Path:
    """Fake-quantized training (`train` trains the prepared graph module), then conversion."""
    return int8(job.module, job.example, job.calibration, job.out_dir, job.float_layers,
                qat_train=train)


def quantizable_layers(module: Any) -> list[str]:
    import torch.nn as nn

    return [name for name, m in module.named_modules()
            if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]


def _float_layer_quantizer(float_layers: tuple[str, ...], qat: bool = False) -> Any:
    """litert-torch's PT2E quantizer, minus the annotations of nodes inside `float_layers`:
    those ops stay float, with (de)quantize ops at their edges."""
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )

    class FloatLayersQuantizer(PT2EQuantizer):
        # litert-torch 0.10's conv+BN QAT patterns cannot be traced with torch 2.13; without
        # them QAT annotates conv and BN as separate ops, which trains and converts.
        STATIC_QAT_ONLY_OPS: list[str] = []

        def annotate(self, model: Any) -> Any:
            model = super().annotate(model)
            if not float_layers:
                return model
            removed = set()
            for node in model.graph.nodes:
                stack = node.meta.get("nn_module_stack") or {}
                paths = {str(v[0]) for v in stack.values()}
                if any(p == name or p.endswith(f".{name}") or p.endswith(f"['{name}']")
                       for p in paths for name in float_layers):
                    if node.meta.pop("quantization_annotation", None) is not None:
                        removed.add(node)
            # a node whose quantization is shared with a float node goes float too
            changed = True
            while changed:
                changed = False
                for node in model.graph.nodes:
                    ann = node.meta.get("quantization_annotation")
                    if ann is None or node in removed:
                        continue
                    specs = [*ann.input_qspec_map.values(), ann.output_qspec]
                    for spec in specs:
                        ref = getattr(spec, "edge_or_node", None)
                        refs = ref if isinstance(ref, tuple) else (ref,)
                        if any(r in removed for r in refs):
                            node.meta.pop("quantization_annotation")
                            removed.add(node)
                            changed = True
                            break
            return model

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False,
                                               is_qat=qat)
    return FloatLayersQuantizer().set_global(config)


def int8(module: Any, example: np.ndarray, calibration: np.ndarray, out_dir: Path,
                float_layers: tuple[str, ...] = (),
                qat_train: Callable[[Any], None] | None = None) -> Path:
    """Full-integer int8 LiteRT model. With `qat_train`, fake-quantized training (the callable
    trains the prepared graph module) before conversion."""
    import litert_torch
    import torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import (
        convert_pt2e,
        prepare_pt2e,
        prepare_qat_pt2e,
    )

    x = torch.from_numpy(example[:1])
    quantizer = _float_layer_quantizer(float_layers, qat=qat_train is not None)
    eval_mode(module)
    if qat_train is not None:  # trained in batches: the graph needs a symbolic batch size
        batch = torch.export.Dim("batch", min=1, max=4096)
        graph = torch.export.export(module, (torch.cat([x, x]),),
                                    dynamic_shapes=({0: batch},)).module()
    else:
        graph = torch.export.export(module, (x,)).module()
    if qat_train is not None:
        graph = prepare_qat_pt2e(graph, quantizer)
        qat_train(graph)
        from torchao.quantization.pt2e import move_exported_model_to_eval

        move_exported_model_to_eval(graph)
    else:
        graph = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for i in range(len(calibration)):
                graph(torch.from_numpy(calibration[i : i + 1]))
    graph = convert_pt2e(graph, fold_quantize=False)
    target = out_dir / MODEL_FILE
    litert_torch.convert(graph, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer)
                         ).export(str(target))
    return target
