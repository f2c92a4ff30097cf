"""ONNX Runtime with the TensorRT or CUDA execution provider: ONNX Runtime's exporter,
quantizer and graph reader, a run half that asks for the GPU providers."""

from targets.base import Backend, Capabilities

BACKEND = Backend(
    name="onnxruntime-gpu",
    description="ONNX Runtime with the TensorRT or CUDA execution provider",
    capabilities=Capabilities(
        precisions=("fp32", "fp16", "int8"), dynamic_batch=True, run_needs_torch=False,
        from_onnx=True, extra="onnx", layer_profiler=False, float_layers=True,
        accelerator="nvidia-gpu"),
    model_file="model.onnx",
    run_module="targets.onnxruntime_gpu.run",
    export_module="targets.onnxruntime.export",
    quantizer_module="targets.onnxruntime.quantize",
    graph_module="targets.onnxruntime.graph",
    cost_fit_fallbacks=("onnxruntime",),
)
