"""LiteRT (TFLite) with XNNPACK: exported with litert-torch at batch 1; full-integer int8
through its PT2E quantizer (layers can stay float; quantization-aware fine-tuning); priced by
its flatbuffer's operators. Its op profiler lives only in the C++ benchmark tool."""

from targets.base import Backend, Capabilities

BACKEND = Backend(
    name="litert",
    description="LiteRT (TFLite) with XNNPACK",
    capabilities=Capabilities(
        precisions=("fp32", "int8"), dynamic_batch=False, run_needs_torch=False,
        from_onnx=False, extra="tflite", layer_profiler=False, float_layers=True, qat=True,
        quantizes_from_torch=True),
    model_file="model.tflite",
    run_module="targets.litert.run",
    export_module="targets.litert.export",
    quantizer_module="targets.litert.quantize",
    graph_module="targets.litert.graph",
    no_profiler_reason=("no per-layer timing through its Python API (LiteRT's op profiler "
                        "lives in the C++ benchmark tool)"),
    cost_fit_fallbacks=("onnxruntime",),
)
