"""GPU-only behaviour (TensorRT engines, the cloud-gpu path on a GPU). Skipped, with the reason,
on machines without TensorRT or an NVIDIA GPU, which is every machine this project is developed
on; `benchmarks/gpu_check.py` is the GPU machine's end-to-end check."""

import numpy as np
import pytest
import torch

import targets
from targets.export_log import converter_output_to
from toolchain.build.model_zoo import plain_cnn

pytestmark = pytest.mark.tensorrt


@pytest.fixture
def tensorrt():
    plugin = targets.get("tensorrt")
    if reason := plugin.run_unavailable_reason():
        pytest.skip(f"tensorrt: {reason}")
    return plugin


def test_engine_is_built_once_and_cached_per_gpu(tensorrt, tmp_path, monkeypatch):
    from targets.base import QuantizeJob
    monkeypatch.setenv("EDGEPACK_TRT_CACHE", str(tmp_path / "cache"))
    model = plain_cnn(width=8).eval()
    with converter_output_to(tmp_path / "log"):
        fp32 = tensorrt.export(model, torch.zeros(1, 1, 32, 32), tmp_path)
    x1 = np.zeros((1, 1, 32, 32), np.float32)
    path = tensorrt.quantize(QuantizeJob("fp16", fp32, model, x1, x1, tmp_path / "fp16"))
    first = tensorrt.open_session(path, 1)
    engines = list((tmp_path / "cache").glob("*.engine"))
    assert len(engines) == 1
    stamp = engines[0].stat().st_mtime_ns
    second = tensorrt.open_session(path, 1)
    assert engines[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    for session in (first, second):
        got = session.run(x)
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-2  # fp16


def test_cloud_gpu_prefers_a_gpu_backend_when_there_is_one():
    from toolchain.profiles import load_profile

    chosen, _ = targets.choose(load_profile("cloud-gpu").backends)
    if chosen.name == "onnxruntime":
        pytest.skip("no GPU backend can run here: cloud-gpu falls back to ONNX Runtime on the CPU")
    assert chosen.name in ("tensorrt", "onnxruntime-gpu", "aoti")
