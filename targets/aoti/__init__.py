"""PyTorch AOTInductor: the model compiled ahead of time into a `.pt2` package of native
kernels. The one backend whose run half needs torch; bundles made with it say so."""

from targets.base import Backend, Capabilities

BACKEND = Backend(
    name="aoti",
    description="PyTorch AOTInductor package (needs torch)",
    capabilities=Capabilities(
        precisions=("fp32",), dynamic_batch=True, run_needs_torch=True, from_onnx=False,
        extra="build", layer_profiler=False,
        accelerator="nvidia-gpu"),  # compiled for the GPU; for this CPU only in tests
    model_file="model.pt2",
    run_module="targets.aoti.run",
    export_module="targets.aoti.export",
    cost_fit_fallbacks=("onnxruntime",),
)
