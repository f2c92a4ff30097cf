"""GPU-only behaviour (TensorRT engines, the cloud-gpu path on a GPU). Skipped, with the reason,
on machines without TensorRT or an NVIDIA GPU, which is every machine this project is developed
on; `benchmarks/gpu_check.py` is the GPU machine's end-to-end check."""

import numpy as np
import pytest
import torch

from targets import backend_module
from targets.export_log import converter_output_to
from toolchain.model_zoo import plain_cnn

pytestmark = pytest.mark.tensorrt


@pytest.fixture
def tensorrt():
    module = backend_module("tensorrt")
    if reason := module.run_unavailable_reason():
        pytest.skip(f"tensorrt: {reason}")
    return module


def test_engine_is_built_once_and_cached_per_gpu(tensorrt, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt, "CACHE_DIR", tmp_path / "cache")
    model = plain_cnn(width=8).eval()
    with converter_output_to(tmp_path / "log"):
        path = tensorrt.export(model, torch.zeros(1, 1, 32, 32), tmp_path, fp16=True)
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

    available = [b for b in load_profile("cloud-gpu").backends
                 if backend_module(b).run_unavailable_reason() is None]
    if available[0] == "onnxruntime":
        pytest.skip("no GPU backend can run here: cloud-gpu falls back to ONNX Runtime on the CPU")
    assert available[0] in ("tensorrt", "onnxruntime-gpu", "aoti")
