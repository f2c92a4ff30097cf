"""ONNX Runtime on the CPU: exported with torch.onnx (dynamo), weights inline; int8 as static
QDQ, fp16 for GPUs; priced by its ONNX graph; profiled by ONNX Runtime's profiler."""

from targets.base import Backend, Capabilities

BACKEND = Backend(
    name="onnxruntime",
    description="ONNX Runtime, CPU execution provider",
    capabilities=Capabilities(
        precisions=("fp32", "fp16", "int8"), dynamic_batch=True, run_needs_torch=False,
        from_onnx=True, extra="onnx", layer_profiler=True, float_layers=True),
    model_file="model.onnx",
    run_module="targets.onnxruntime.run",
    export_module="targets.onnxruntime.export",
    quantizer_module="targets.onnxruntime.quantize",
    graph_module="targets.onnxruntime.graph",
    profiler_module="targets.onnxruntime.profiler",
)
