"""OpenVINO on the CPU: exported through torch.export (or from ONNX) to IR; int8 with NNCF,
accuracy-aware when plain int8 misses the gate; priced by the IR's operators; profiled by
OpenVINO's performance counters."""

from targets.base import Backend, Capabilities

BACKEND = Backend(
    name="openvino",
    description="OpenVINO runtime, CPU plugin",
    capabilities=Capabilities(
        precisions=("fp32", "fp16", "int8"), dynamic_batch=True, run_needs_torch=False,
        from_onnx=True, extra="openvino", layer_profiler=True, float_layers=True,
        accuracy_aware=True),
    model_file="model.xml",
    run_module="targets.openvino.run",
    export_module="targets.openvino.export",
    quantizer_module="targets.openvino.quantize",
    graph_module="targets.openvino.graph",
    profiler_module="targets.openvino.profiler",
    cost_fit_fallbacks=("onnxruntime",),
)
