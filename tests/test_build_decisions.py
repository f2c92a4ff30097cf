"""The build's decisions on their own (backend choice and fallback, precision, budgets, the
accuracy gate), with fake backends registered for the test: no export, no training, so this
runs in the fast tier and a new rule is checked in milliseconds."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

import targets
from targets.base import Backend, Capabilities
from toolchain.budgets import missed
from toolchain.build.assess import Candidate
from toolchain.build.decisions import budget_rows, choose_backend, choose_precision, gate_outcome
from toolchain.build.recipe import load_recipe
from toolchain.errors import ToolchainError
from toolchain.profiles import load_profile
from toolchain.progress import Progress


def _fake(name: str, *, reason: str | None = None, from_onnx: bool = True,
          precisions: tuple[str, ...] = ("fp32", "int8")) -> Backend:
    """A backend whose run half is a module made here: it says `reason` when asked why it
    cannot run."""
    module = types.ModuleType(f"fake_backend_{name.replace('-', '_')}")
    module.unavailable_reason = lambda: reason
    sys.modules[module.__name__] = module
    return Backend(name=name, description=f"fake {name}",
                   capabilities=Capabilities(precisions=precisions, dynamic_batch=True,
                                             run_needs_torch=False, from_onnx=from_onnx,
                                             extra="none", layer_profiler=False),
                   model_file="model.fake", run_module=module.__name__,
                   export_module=module.__name__)


@pytest.fixture
def fakes():
    made = [_fake("fake-no-library", reason="fakelib is not installed"),
            _fake("fake-torch-only", from_onnx=False),
            _fake("fake-fp32-only", precisions=("fp32",)),
            _fake("fake-int8")]
    for backend in made:
        targets.register(backend)
    yield {b.name: b for b in made}
    for backend in made:
        targets.unregister(backend.name)
        sys.modules.pop(backend.run_module, None)


def _profile(backends: tuple[str, ...], **changes):
    return dataclasses.replace(load_profile("smart-speaker"), backends=backends, **changes)


def _candidate(stage: str, accuracy: float, p50: float = 1.0, p95: float = 2.0) -> Candidate:
    return Candidate(stage, "int8", Path("m"), None, accuracy, accuracy, 1000, 10_000, 2048,
                     {"p50": p50, "p95": p95, "source": "measured-host"}, 50.0, 5.0, "")


def test_first_usable_backend_is_chosen_and_every_skip_is_said(fakes):
    notes: list[str] = []
    profile = _profile(("not-built-yet", "fake-no-library", "fake-torch-only", "fake-int8"))
    chosen = choose_backend(profile, SimpleNamespace(kind="onnx"), notes, Progress(quiet=True))
    assert chosen.name == "fake-int8"
    (note,) = notes
    assert "not-built-yet (not implemented yet)" in note
    assert "fake-no-library (fakelib is not installed)" in note
    assert "fake-torch-only (it is made from a PyTorch model, not an ONNX file)" in note
    assert note.endswith("fell back to fake-int8")


def test_a_torch_model_takes_the_torch_only_backend_without_a_note(fakes):
    notes: list[str] = []
    chosen = choose_backend(_profile(("fake-torch-only", "fake-int8")),
                            SimpleNamespace(kind="torch"), notes, Progress(quiet=True))
    assert chosen.name == "fake-torch-only" and notes == []


def test_no_usable_backend_is_an_error_naming_each(fakes):
    with pytest.raises(ToolchainError, match="fake-no-library .fakelib is not installed.") as e:
        choose_backend(_profile(("fake-no-library", "fake-torch-only")),
                       SimpleNamespace(kind="onnx"), [], Progress(quiet=True))
    assert "fake-torch-only" in str(e.value) and e.value.exit_code == 1


def test_precision_falls_back_to_fp32_where_the_backend_cannot_quantize(fakes):
    recipe = load_recipe(load_profile("smart-speaker"))  # asks for int8
    notes: list[str] = []
    assert choose_precision(recipe, fakes["fake-int8"], notes) == "int8" and not notes
    assert choose_precision(recipe, fakes["fake-fp32-only"], notes) == "fp32"
    assert notes == ["int8 is not available for fake-fp32-only; the bundle is fp32"]


def test_budgets_check_the_host_measurement_or_the_estimate_and_name_the_miss():
    recipe = load_recipe(load_profile("smart-speaker"))
    reference, final = _candidate("reference", 0.98), _candidate("quantize", 0.975, 1.0, 30.0)
    on_host = _profile(("litert",), measurable_on_host=True)
    rows = {r["name"]: r for r in budget_rows(on_host, recipe, reference, final, 4096, None)}
    assert rows["p95_latency_ms"]["value"] == 30.0 and rows["p95_latency_ms"]["ok"] is False
    assert rows["max_accuracy_drop_points"]["value"] == pytest.approx(0.5)
    assert rows["max_accuracy_drop_points"]["ok"] is True
    assert "p95_latency_ms is 30, over its limit 25 by 5" == missed(list(rows.values()))
    estimate = {"p50": 3.0, "p95": 4.0, "why": "not this host"}
    elsewhere = _profile(("litert",), measurable_on_host=False)
    rows = {r["name"]: r for r in budget_rows(elsewhere, recipe, reference, final, 4096,
                                              estimate)}
    assert rows["p95_latency_ms"]["value"] == 4.0 and rows["p95_latency_ms"]["ok"] is True
    assert "estimated" in rows["p95_latency_ms"]["note"]
    big = budget_rows(elsewhere, recipe, reference, final, 3 * 2**20, estimate)
    assert "bundle_size_mb is 3" in missed(big)


def test_the_gate_names_the_fastest_stage_within_it():
    recipe = load_recipe(load_profile("smart-speaker"), None,
                         ("gate.max_accuracy_drop_points=1.0",))
    reference = _candidate("reference", 0.98, p50=3.0)
    pruned = _candidate("prune", 0.975, p50=1.5)
    quantized = _candidate("quantize", 0.95, p50=0.5)
    held = gate_outcome(recipe, reference, pruned, [reference, pruned])
    assert held.passed and held.drop_points == pytest.approx(0.5) and held.best_within is None
    broke = gate_outcome(recipe, reference, quantized, [reference, pruned, quantized])
    assert not broke.passed and broke.drop_points == pytest.approx(3.0)
    assert broke.best_within is pruned
    recipe = load_recipe(load_profile("smart-speaker"), None,
                         ("gate.max_accuracy_drop_points=0.1",))
    nothing = gate_outcome(recipe, reference, quantized, [pruned, quantized])
    assert not nothing.passed and nothing.best_within is None
