"""The parity suite: every registered backend x every model-zoo architecture. Export, load in
the backend's run half, compare with PyTorch on fresh random inputs (fp32: relative error under
1e-4), check batch handling; int8 backends must agree with PyTorch on at least 99% of the demo's
test split. Backends that cannot run here are skipped with the reason (see `pytest -ra`)."""

import subprocess

import numpy as np
import pytest
import torch

import targets
from targets import BACKENDS
from targets.base import ExportUnsupported, QuantizeJob, TensorSpec, dequantize, quantize
from targets.export_log import converter_output_to
from tests.conftest import REPO
from toolchain.build.model_zoo import ARCHITECTURES


def unavailable(name: str) -> str | None:
    return targets.get(name).run_unavailable_reason()


def _trained_looking(model):
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request):
    if reason := unavailable(request.param):
        pytest.skip(f"{request.param}: {reason}")
    return request.param


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def exported(request, backend, tmp_path_factory):
    torch.manual_seed(0)
    model = _trained_looking(ARCHITECTURES[request.param](width=8))
    out = tmp_path_factory.mktemp(f"{backend}-{request.param}")
    with converter_output_to(out / "export.log"):
        path = targets.get(backend).export(model, torch.zeros(1, 1, 32, 32), out)
    return backend, request.param, model, path


def test_export_writes_the_model_files(exported):
    backend, _, _, path = exported
    files = targets.get(backend).model_files(path)
    assert files[0] == path and all(f.is_file() and f.stat().st_size > 100 for f in files)


def test_fp32_parity_with_pytorch(exported):
    backend, arch, model, path = exported
    session = targets.get(backend).open_session(path, 2)
    x = np.random.default_rng(1).standard_normal((4, 1, 32, 32)).astype(np.float32)
    got = session.run(x)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (4, 10)
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel < 1e-4, f"{backend}/{arch}: relative error {rel:.2e}"


def test_batches_of_any_size(exported):
    backend, _, _, path = exported
    session = targets.get(backend).open_session(path, 1)
    x = np.random.default_rng(2).standard_normal((7, 1, 32, 32)).astype(np.float32)
    full = session.run(x)
    one_by_one = np.concatenate([session.run(x[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(full, one_by_one, rtol=1e-4, atol=1e-5)


def test_dynamic_batch_where_the_backend_has_it(exported):
    backend, _, _, path = exported
    session = targets.get(backend).open_session(path, 1)
    if targets.get(backend).capabilities.dynamic_batch:
        assert session.input.shape[0] is None, session.input
    else:  # exported at batch 1 (LiteRT); the run half loops
        assert session.input.shape[0] == 1


def test_run_half_imports_no_torch(exported, runtime_venv):
    backend, _, _, path = exported
    plugin = targets.get(backend)
    if plugin.capabilities.run_needs_torch:
        pytest.skip(f"{backend} runs in torch's runtime by design")
    code = (
        "import sys, numpy as np, targets\n"
        f"if {backend!r} not in targets.BACKENDS: targets.register({plugin.run_module!r})\n"
        f"b = targets.get({backend!r})\n"
        "if b.run_unavailable_reason(): print(b.run_unavailable_reason()); sys.exit(3)\n"
        f"s = b.open_session({str(path)!r}, 1)\n"
        "y = s.run(np.zeros((2, 1, 32, 32), np.float32))\n"
        "assert y.shape == (2, 10), y.shape\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([runtime_venv / "bin" / "python", "-c", code], capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode == 3:
        pytest.skip(f"{backend} cannot run in the torch-free environment: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr


# --- int8 on the demo's test split --------------------------------------------------------

# int8 backends that run on a CPU: the GPU ones are checked by benchmarks/gpu_check.py
INT8_BACKENDS = sorted(b for b, plugin in BACKENDS.items() if plugin.supports("int8"))


@pytest.fixture(scope="module")
def trained_demo():
    from runtime.preprocess import apply, normalization
    from toolchain.build.data import load_data
    from toolchain.build.models import demo_cnn
    from toolchain.build.train import train

    data = load_data("digits", seed=0)
    prep = normalization(data.mean, data.std)
    torch.manual_seed(0)
    model = demo_cnn()
    xs = [apply(prep, x) for x in (data.x_train, data.x_val, data.x_test)]
    train(model, xs[0], data.y_train, xs[1], data.y_val, epochs=6, seed=0, log=lambda _: None)
    return model.eval(), xs[0], xs[2], data.y_test


@pytest.mark.parametrize("backend_name", INT8_BACKENDS)
def test_int8_agrees_with_pytorch_on_the_demo(backend_name, trained_demo, tmp_path):
    if reason := unavailable(backend_name):
        pytest.skip(reason)
    model, x_train, x_test, y_test = trained_demo
    plugin = targets.get(backend_name)
    with converter_output_to(tmp_path / "export.log"):
        fp32 = plugin.export(model, torch.from_numpy(x_test[:1]), tmp_path)
    path = plugin.quantize(QuantizeJob("int8", fp32, model, x_test[:1], x_train[:256],
                                       tmp_path / "q"))
    got = plugin.open_session(path, 2).run(x_test)
    with torch.no_grad():
        want = model(torch.from_numpy(x_test)).numpy()
    agreement = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    assert agreement >= 0.99, f"{backend_name}: top-1 agreement {agreement:.2%}"
    assert np.mean(got.argmax(-1) == y_test) >= 0.95


@pytest.mark.parametrize("backend_name", sorted(b for b, plugin in BACKENDS.items()
                                                 if not plugin.capabilities.from_onnx))
def test_torch_only_backends_refuse_an_onnx_file(backend_name, tmp_path):
    plugin = targets.get(backend_name)
    if reason := unavailable(backend_name):
        pytest.skip(reason)
    with pytest.raises(ExportUnsupported):
        plugin.export(tmp_path / "m.onnx", None, tmp_path)


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
def test_declared_capabilities_are_consistent(backend_name):
    plugin = targets.get(backend_name)
    caps = plugin.capabilities
    assert plugin.name == backend_name and plugin.description
    assert "fp32" in caps.precisions and set(caps.precisions) <= {"fp32", "fp16", "int8"}
    assert plugin.supports("fp32") and not plugin.supports("int4")
    if set(caps.precisions) - {"fp32"}:
        assert plugin.quantizer_module, "a backend that ships fp16/int8 needs a quantizer"
    assert caps.layer_profiler == (plugin.profiler_module is not None)
    assert (plugin.graph_module is not None) or caps.run_needs_torch
    assert set(plugin.cost_fit_fallbacks) <= set(BACKENDS)
    reason = plugin.run_unavailable_reason()
    assert reason is None or isinstance(reason, str) and reason


def test_quantize_round_trip():
    spec = TensorSpec("x", (None, 4), "int8", scale=0.5, zero_point=-3)
    x = np.array([[-100.0, -1.0, 0.26, 100.0]], np.float32)
    q = quantize(x, spec)
    assert q.dtype == np.int8 and q.tolist() == [[-128, -5, -2, 127]]
    np.testing.assert_allclose(dequantize(q, spec), [[-62.5, -1.0, 0.5, 65.0]])


def test_every_profile_backend_is_registered():
    from toolchain.profiles import available_profiles, load_profile_file

    for path in available_profiles().values():
        assert set(load_profile_file(path).backends) <= set(BACKENDS)


def test_the_toy_backend_from_one_module_is_in_every_registry_suite():
    """tests/conftest.py registers tests/toy_backend.py: the suites above are parametrized
    over the registry, so it was exported, run and compared like the built-in ones."""
    assert "toy-reference" in BACKENDS
    assert targets.get("toy-reference").run_module == "tests.toy_backend"


def test_unknown_backend_names_the_registered_ones():
    with pytest.raises(KeyError, match="registered: .*onnxruntime"):
        targets.get("no-such-backend")
