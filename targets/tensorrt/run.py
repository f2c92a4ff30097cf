"""TensorRT's run half. The bundle carries the portable ONNX file and a small build
config (`model.trt.json`: fp16, int8 from QDQ); an engine is built from them with the
TensorRT builder and cached per GPU model, TensorRT version and precision, because an engine
only runs on the GPU (and TensorRT release) it was built for.

Written against the TensorRT 10 Python API (named I/O tensors, `execute_async_v3`) with
cuda-python for device memory; no torch in the run half. TensorRT cannot be installed on the
machines this project is developed on: this module has not been run (see the README)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from targets.base import BackendUnavailable, TensorSpec

CONFIG_SUFFIX = ".trt.json"
MAX_BATCH = 64


def cache_dir() -> Path:
    """Where built engines are kept: $EDGEPACK_TRT_CACHE, else the user's cache folder (read
    when an engine is looked up, not at import)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("EDGEPACK_TRT_CACHE") or default / "edgepack" / "tensorrt")


def model_files(main: Path) -> list[Path]:
    config = main.with_suffix(CONFIG_SUFFIX)
    return [main, config] if config.exists() else [main]


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def unavailable_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'edgepack[tensorrt]' on an NVIDIA GPU host)"
    try:
        count = _check(_cudart().cudaGetDeviceCount())
    except Exception as exc:  # no driver, no cuda-python
        return f"no usable CUDA runtime ({exc})"
    return None if count else "no NVIDIA GPU found"


def write_config(model_path: Path, *, fp16: bool, int8: bool) -> Path:
    path = model_path.with_suffix(CONFIG_SUFFIX)
    path.write_text(json.dumps({"fp16": fp16, "int8": int8, "max_batch": MAX_BATCH}))
    return path


def _engine_path(onnx_path: Path, config: dict[str, Any]) -> Path:
    import tensorrt as trt

    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(0))
    gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    key = hashlib.sha256(onnx_path.read_bytes() + json.dumps(config, sort_keys=True).encode())
    key.update(f"{gpu}|{trt.__version__}".encode())
    safe_gpu = "".join(c if c.isalnum() else "-" for c in gpu)
    return cache_dir() / f"{key.hexdigest()[:20]}-{safe_gpu}-trt{trt.__version__}.engine"


def build_engine(onnx_path: Path, config: dict[str, Any]) -> bytes:
    """Parse the ONNX file and build a serialized engine with a dynamic-batch profile."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    build_config = builder.create_builder_config()
    if config.get("fp16"):
        build_config.set_flag(trt.BuilderFlag.FP16)
    if config.get("int8"):  # the ONNX carries QDQ nodes: explicit quantization
        build_config.set_flag(trt.BuilderFlag.INT8)
    tensor = network.get_input(0)
    shape = list(tensor.shape)
    if shape[0] == -1:
        profile = builder.create_optimization_profile()
        rest = shape[1:]
        profile.set_shape(tensor.name, [1, *rest], [1, *rest], [config.get("max_batch",
                                                                           MAX_BATCH), *rest])
        build_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build an engine (see its log above)")
    return bytes(serialized)


class TensorRTSession:
    def __init__(self, model_path: Path, threads: int) -> None:
        if reason := unavailable_reason():
            raise BackendUnavailable(reason)
        import tensorrt as trt

        config_path = model_path.with_suffix(CONFIG_SUFFIX)
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        engine_path = _engine_path(model_path, config)
        if engine_path.exists():
            blob = engine_path.read_bytes()
        else:
            blob = build_engine(model_path, config)
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = engine_path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, engine_path)
        self._cudart = _cudart()
        self._engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(blob)
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._in = next(n for n in names
                        if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self._out = next(n for n in names
                         if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        in_shape = tuple(self._engine.get_tensor_shape(self._in))
        out_shape = tuple(self._engine.get_tensor_shape(self._out))
        self.input = TensorSpec(self._in, tuple(None if d < 0 else d for d in in_shape),
                                "float32")
        self.output = TensorSpec(self._out, tuple(None if d < 0 else d for d in out_shape),
                                 "float32")
        self._max_batch = int(config.get("max_batch", MAX_BATCH)) if in_shape[0] < 0 else 1
        self._stream = _check(self._cudart.cudaStreamCreate())

    def _run_chunk(self, x: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        self._context.set_input_shape(self._in, x.shape)
        out_shape = tuple(self._context.get_tensor_shape(self._out))
        y = np.empty(out_shape, dtype=np.float32)
        d_in = _check(cudart.cudaMalloc(x.nbytes))
        d_out = _check(cudart.cudaMalloc(y.nbytes))
        try:
            kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, kind_h2d,
                                          self._stream))
            self._context.set_tensor_address(self._in, int(d_in))
            self._context.set_tensor_address(self._out, int(d_out))
            if not self._context.execute_async_v3(self._stream):
                raise RuntimeError("TensorRT execution failed")
            _check(cudart.cudaMemcpyAsync(y.ctypes.data, d_out, y.nbytes, kind_d2h,
                                          self._stream))
            _check(cudart.cudaStreamSynchronize(self._stream))
        finally:
            cudart.cudaFree(d_in)
            cudart.cudaFree(d_out)
        return y

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self._max_batch
        return np.concatenate([self._run_chunk(x[i : i + step])
                               for i in range(0, len(x), step)])


def open_session(model_path: Path, threads: int) -> TensorRTSession:
    return TensorRTSession(model_path, threads)
