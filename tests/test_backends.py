"""Every registered backend: export a CNN, load it in the run half, compare with PyTorch."""

import numpy as np
import pytest
import torch

from targets import BACKENDS, backend_module
from targets.base import ExportUnsupported, TensorSpec, dequantize, quantize
from targets.export_log import converter_output_to
from toolchain.models import demo_cnn


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = demo_cnn(in_channels=1, num_classes=10, width=8).eval()
    # non-trivial BatchNorm statistics, so folding them is exercised
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def exported(request, cnn, tmp_path_factory):
    name = request.param
    module = backend_module(name)
    assert module.run_unavailable_reason() is None, f"{name} should run on this machine"
    out = tmp_path_factory.mktemp(name)
    with converter_output_to(out / "export.log"):
        path = module.export(cnn, torch.zeros(1, 1, 32, 32), out)
    return name, module, path


def test_export_writes_one_loadable_file(exported):
    name, module, path = exported
    assert path.is_file() and path.stat().st_size > 1000
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix != ".log") == [path.name]


@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_parity_with_pytorch(exported, cnn, threads):
    name, module, path = exported
    session = module.open_session(path, threads)
    assert session.input.dtype == "float32" and session.output.dtype == "float32"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 1, 32, 32)).astype(np.float32)
    got = session.run(x)
    with torch.no_grad():
        want = cnn(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (5, 10)
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel < 1e-4, f"{name}: relative error {rel:.2e}"


def test_session_takes_any_batch_size(exported):
    _, module, path = exported
    session = module.open_session(path, 1)
    x = np.random.default_rng(2).standard_normal((7, 1, 32, 32)).astype(np.float32)
    full = session.run(x)
    one_by_one = np.concatenate([session.run(x[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(full, one_by_one, rtol=1e-5, atol=1e-6)


def test_run_half_imports_no_torch(exported, runtime_venv):
    """The run half works in the torch-free environment."""
    import subprocess

    name, _, path = exported
    code = (
        "import sys, numpy as np\n"
        "from targets import backend_module\n"
        f"s = backend_module({name!r}).open_session({str(path)!r}, 1)\n"
        "y = s.run(np.zeros((2, 1, 32, 32), np.float32))\n"
        "assert y.shape == (2, 10), y.shape\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([runtime_venv / "bin" / "python", "-c", code], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_litert_cannot_be_made_from_onnx(tmp_path):
    with pytest.raises(ExportUnsupported):
        backend_module("litert").export(tmp_path / "m.onnx", None, tmp_path)


def test_litert_int8_inputs_and_outputs_are_handled_by_the_run_half(cnn, tmp_path):
    module = backend_module("litert")
    calibration = torch.randn(32, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with converter_output_to(tmp_path / "export.log"):
        path = module.export_int8(cnn, calibration[:1], calibration, tmp_path)
    session = module.open_session(path, 1)
    assert session.input.dtype == "int8" and session.input.scale > 0
    assert session.output.dtype == "int8" and session.output.scale > 0
    x = calibration[:8].numpy()
    got = session.run(x)  # float in, float out: (de)quantized with the model's own parameters
    assert got.dtype == np.float32
    with torch.no_grad():
        want = cnn(calibration[:8]).numpy()
    err = np.max(np.abs(got - want))
    assert err < 0.1 * np.max(np.abs(want)), err
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.75


def test_quantize_round_trip():
    spec = TensorSpec("x", (None, 4), "int8", scale=0.5, zero_point=-3)
    x = np.array([[-100.0, -1.0, 0.26, 100.0]], np.float32)
    q = quantize(x, spec)
    assert q.dtype == np.int8 and q.tolist() == [[-128, -5, -2, 127]]
    np.testing.assert_allclose(dequantize(q, spec), [[-62.5, -1.0, 0.5, 65.0]])
