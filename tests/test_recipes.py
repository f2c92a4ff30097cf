"""Recipes: every shipped example loads and validates; values layer as documented."""

from pathlib import Path

import pytest

from tests.conftest import REPO
from toolchain.build.recipe import load_recipe, parse_override
from toolchain.errors import UsageError
from toolchain.profiles import load_profile

EXAMPLES = sorted((REPO / "examples" / "recipes").glob("*.toml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_recipe_is_valid(path):
    recipe = load_recipe(load_profile("smart-speaker"), path)
    assert f"recipe {path}" in recipe.sources


def test_profile_decides_without_a_recipe():
    speaker = load_recipe(load_profile("smart-speaker"))
    assert speaker["prune"]["enabled"] and speaker["quantize"]["precision"] == "int8"
    gpu = load_recipe(load_profile("cloud-gpu"))
    assert not gpu["prune"]["enabled"] and gpu["quantize"]["precision"] == "fp16"
    assert gpu["gate"]["max_accuracy_drop_points"] == 0.5


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[prune]\nratio = 0.3\ncriterion = 'taylor'\n")
    recipe = load_recipe(load_profile("smart-speaker"), path, ("prune.ratio=0.6",))
    assert recipe["prune"]["ratio"] == 0.6 and recipe["prune"]["criterion"] == "taylor"


def test_latency_target_defaults_to_the_profile_budget():
    recipe = load_recipe(load_profile("smart-speaker"), None, ("prune.target=latency",))
    assert recipe["prune"]["latency_ms"] == load_profile("smart-speaker").budgets.p95_latency_ms


@pytest.mark.parametrize("text, message", [
    ("[prune]\nratio = 'half'\n", "prune.ratio must be float"),
    ("[prune]\ncriterion = 'random'\n", "valid: l2, taylor, bn-scale"),
    ("[prunning]\nratio = 0.5\n", "unknown section [prunning]"),
    ("[prune]\nratoi = 0.5\n", "unknown key prune.ratoi"),
    ("[prune]\nratio = 1.5\n", "between 0 and 1"),
    ("[quantize]\nprecision = 'int4'\n", "valid: fp32, fp16, int8"),
    ("[prune]\ntarget = 'macs'\n", "needs prune.macs > 0"),
    ("[prune\n", "cannot be read as TOML"),
])
def test_bad_recipes_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        load_recipe(load_profile("smart-speaker"), path)


def test_override_syntax():
    assert parse_override("prune.ratio=0.6") == {"prune": {"ratio": 0.6}}
    assert parse_override("prune.criterion=taylor") == {"prune": {"criterion": "taylor"}}
    assert parse_override('prune.keep_layers=["a", "b"]') == {"prune": {"keep_layers": ["a", "b"]}}
    with pytest.raises(UsageError, match="section.key=value"):
        parse_override("ratio")


def test_missing_recipe_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_recipe(load_profile("smart-speaker"), Path(tmp_path / "none.toml"))


def test_a_demo_datas_defaults_sit_between_the_profile_and_the_user():
    speaker = load_profile("smart-speaker")
    demo = ("keywords", {"prune": {"ratio": 0.4}})
    assert load_recipe(speaker)["prune"]["ratio"] == 0.5
    assert load_recipe(speaker, data_defaults=demo)["prune"]["ratio"] == 0.4
    assert "data keywords" in load_recipe(speaker, data_defaults=demo).to_dict()["sources"]
    assert load_recipe(speaker, None, ("prune.ratio=0.6",),
                       data_defaults=demo)["prune"]["ratio"] == 0.6
