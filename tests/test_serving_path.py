"""The serving path (targets.fastpath, each backend's `runner`, Model.predict) against the
reference path it replaces (runtime.preprocess.apply, then Session.run): the same
predictions, arrays of their own for every caller, NaN and infinities refused. And the
telemetry window's input sampling (runtime.window): few copies, evenly spread, statistics
that still describe the window."""

import importlib

import numpy as np
import pytest
import torch

import targets
from runtime import preprocess
from runtime.window import INPUT_SAMPLES, MIN_DRIFT_SAMPLES, Window
from targets import BACKENDS, fastpath
from targets.base import TensorSpec, dequantize, quantize
from targets.export_log import converter_output_to
from toolchain.build.model_zoo import ARCHITECTURES

MEAN, STD = [0.3056904375553131], [0.32402709126472473]
SPEC = preprocess.normalization(MEAN, STD)


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    """Digit-like raw inputs: mostly 0, some 1, values between, and a few out of range."""
    rng = np.random.default_rng(seed)
    x = rng.choice([0.0, 1.0, 0.5], size=(n, 1, 32, 32), p=[0.6, 0.3, 0.1])
    x += rng.normal(0, 0.2, x.shape) * (rng.random(x.shape) < 0.3)
    return x.astype(np.float32)


# --- the int8 input stage and the output table, numpy only ------------------------------------

@pytest.mark.parametrize("dtype,scale,zero_point", [("int8", 0.012078957632184029, -50),
                                                     ("int8", 0.5, 3), ("uint8", 0.02, 128)])
def test_folded_quantization_matches_normalize_then_quantize(dtype, scale, zero_point):
    spec = TensorSpec("x", (1, 1, 32, 32), dtype, scale, zero_point)
    mean, std = preprocess.constants(SPEC)
    target = np.empty((1, 1, 32, 32), dtype)
    prepare = fastpath.quantizing_stage(mean, std, spec, target)
    # some values far outside the quantized range (clipped)
    x = np.concatenate([_inputs(64) * 3 - 1, _inputs(8, seed=1) * 400 - 200])
    got = []
    for i in range(len(x)):
        prepare(x[i : i + 1])
        got.append(target.copy())
    got = np.concatenate(got).astype(np.int32)
    want = quantize(preprocess.apply(SPEC, x), spec).astype(np.int32)
    # folding rounds differently only for values within float32 rounding of a half step
    assert np.abs(got - want).max() <= 1
    assert np.mean(got != want) < 1e-3
    info = np.iinfo(dtype)
    assert got.min() == info.min and got.max() == info.max  # the clip is exercised


@pytest.mark.parametrize("dtype,zero_point", [("int8", -7), ("uint8", 120)])
def test_output_table_equals_dequantize_for_every_byte(dtype, zero_point):
    spec = TensorSpec("y", (1, 10), dtype, 0.0731, zero_point)
    q = np.arange(256, dtype=np.uint8).view(dtype)
    table = fastpath.dequantize_table(spec)
    np.testing.assert_array_equal(table.take(q.view(np.uint8)), dequantize(q, spec))


def test_the_input_stage_refuses_nan_and_infinity_and_clips_huge_values():
    spec = TensorSpec("x", (1, 1, 4, 4), "int8", 0.1, 0)
    mean, std = preprocess.constants(SPEC)
    target = np.empty((1, 1, 4, 4), np.int8)
    prepare = fastpath.quantizing_stage(mean, std, spec, target)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((1, 1, 4, 4), np.float32)
        x[0, 0, 3, 2] = bad
        with pytest.raises(ValueError, match="1 NaN or infinite value"):
            prepare(x)
    with np.errstate(over="ignore"):  # the sum of squares overflows: checked value by value
        prepare(np.full((1, 1, 4, 4), 1e30, np.float32))
    assert (target == 127).all()


# --- every backend's runner against normalize-then-run ----------------------------------------

@pytest.fixture(scope="module", params=sorted(BACKENDS))
def fp32_model(request, tmp_path_factory):
    plugin = targets.get(request.param)
    if reason := plugin.run_unavailable_reason():
        pytest.skip(f"{request.param}: {reason}")
    run_half = importlib.import_module(plugin.run_module)
    if not any(hasattr(v, "runner") for v in vars(run_half).values() if isinstance(v, type)):
        pytest.skip(f"{request.param} has no serving path of its own: Model normalizes, "
                    "then runs")
    torch.manual_seed(0)
    model = ARCHITECTURES["plain-cnn"](width=8).eval()
    out = tmp_path_factory.mktemp(f"serving-{request.param}")
    with converter_output_to(out / "export.log"):
        path = plugin.export(model, torch.zeros(1, 1, 32, 32), out)
    return request.param, path


def test_runner_gives_the_reference_outputs_in_arrays_of_their_own(fp32_model):
    backend, path = fp32_model
    session = targets.get(backend).open_session(path, 1)
    runner = getattr(session, "runner", None)
    run = runner(*preprocess.constants(SPEC))
    assert run is not None, f"{backend}: no serving path for a float32 model"
    x = _inputs(5, seed=1)
    want = session.run(preprocess.apply(SPEC, x))
    first = run(x[:1])
    kept = first.copy()
    ones = [first] + [run(x[i : i + 1]) for i in range(1, 5)]
    # float models: the normalization is the same float32 arithmetic, so the same bits
    np.testing.assert_array_equal(np.concatenate(ones), want)
    np.testing.assert_array_equal(run(x), want)  # a batch of another size
    np.testing.assert_array_equal(first, kept)  # later calls did not write into it
    assert not any(np.shares_memory(a, b) for i, a in enumerate(ones) for b in ones[i + 1:])
    bad = x[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        run(bad)
    bad[0, 0, 0, 0] = -np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        run(np.concatenate([x[:2], bad]))


def test_int8_model_serving_path_agrees_with_the_reference_path(build_demo, digits_test_npz):
    """The demo's smart-speaker bundle (LiteRT int8): folded quantization, the interpreter's
    own tensors, the output table; the same predictions as quantizing after normalizing, and
    the golden self-test still passes."""
    import runtime

    built = build_demo("smart-speaker")
    x = np.load(digits_test_npz)["x"].astype(np.float32)
    with runtime.load(built.bundle) as model:
        assert model.self_test().ok
        session = model.session
        want = session.run(preprocess.apply(model.manifest.input.preprocessing, x))
        got = np.concatenate([model.predict(x[i : i + 1]) for i in range(len(x))])
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.995
        step = session.output.scale
        assert np.abs(got - want).max() <= 8 * step  # one input step moves a logit a little
        np.testing.assert_array_equal(model.predict(x), got)  # batch or one by one
        a = model.predict(x[:1])
        b = model.predict(x[1:2])
        assert not np.shares_memory(a, b)


# --- the window's input sample ---------------------------------------------------------------

def test_window_keeps_few_inputs_evenly_spread_and_copies_them():
    window = Window(None, 10, capacity=1000)
    x = np.arange(1000, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 3),
                                                                          np.float32)
    for i in range(1000):
        sample = x[i : i + 1].copy()
        window.record(sample, np.array([i % 10]), np.array([0.9]), 0.001)
        sample[...] = -1  # the caller reuses its buffer: the window holds a copy
    body = window.close()
    kept, stride = body["input"]["samples"], body["input"]["sample_stride"]
    assert INPUT_SAMPLES // 2 <= kept <= INPUT_SAMPLES
    assert (kept - 1) * stride < 1000 <= kept * stride  # spread over the whole window
    # the kept inputs are inferences 0, stride, 2 * stride, ...: the window's mean
    seen = window._x[:kept, 0, 0]
    np.testing.assert_array_equal(seen, np.arange(kept) * stride)
    assert body["input"]["per_channel"][0]["min"] == 0
    assert body["count"] == 1000 and body["output"]["class_counts"] == [100] * 10


def test_window_with_batches_and_drift_statistics():
    rng = np.random.default_rng(3)
    ref = {"count": 500,
           "input": {"histogram": {"edges": np.linspace(-1, 2, 33).tolist(),
                                   "proportions": [1 / 32] * 32}},
           "output": {"predicted_class": {"proportions": [0.1] * 10},
                      "confidence": {"proportions": [0.05] * 20}},
           "samples": {"input_channel_means": [rng.uniform(-1, 2, (200, 64)).mean(1).tolist()],
                       "confidence": rng.uniform(0, 1, 200).tolist()}}
    window = Window(ref, 10, capacity=100)  # grows past its first allocation
    for _ in range(30):
        n = 7
        x = rng.uniform(-1, 2, (n, 1, 8, 8)).astype(np.float32)
        window.record(x, rng.integers(0, 10, n), rng.uniform(0, 1, n), 0.007)
    body = window.close()
    assert body["count"] == 210 and sum(body["output"]["class_counts"]) == 210
    assert sum(body["output"]["confidence_hist"]) == 210
    d = body["drift"]
    assert d["available"] and d["input_psi"] < 0.1 and d["score"] is not None
    assert d["input_ks"][0]["p_value"] > 0.001
    lat = body["latency_ms"]
    assert lat["p50"] == pytest.approx(1.0) and lat["max"] == pytest.approx(1.0)
    shifted = Window(ref, 10)
    for _ in range(MIN_DRIFT_SAMPLES):
        x = rng.uniform(1.5, 2, (1, 1, 8, 8)).astype(np.float32)
        shifted.record(x, np.array([1]), np.array([0.5]), 0.001)
    assert shifted.close()["drift"]["input_psi"] > 0.25
