"""TensorRT 10 on an NVIDIA GPU: the bundle carries the ONNX file and a build config; the
engine is built on first load and cached per GPU model, TensorRT version and precision.
Written against TensorRT's real API; TensorRT cannot be installed where this project is
developed, so this backend has not been run (see the README)."""

from targets.base import Backend, Capabilities

BACKEND = Backend(
    name="tensorrt",
    description="TensorRT engine on an NVIDIA GPU",
    capabilities=Capabilities(
        precisions=("fp32", "fp16", "int8"), dynamic_batch=True, run_needs_torch=False,
        from_onnx=True, extra="tensorrt", layer_profiler=False, float_layers=True,
        accelerator="nvidia-gpu"),
    model_file="model.onnx",
    run_module="targets.tensorrt.run",
    export_module="targets.tensorrt.export",
    quantizer_module="targets.tensorrt.quantize",
    graph_module="targets.onnxruntime.graph",
    cost_fit_fallbacks=("onnxruntime",),
)
