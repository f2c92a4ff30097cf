"""Build recipes: which compression stages run and how. Plain TOML, every value optional:

    [train]     epochs, lr
    [distill]   enabled, teacher, student, temperature, alpha, epochs, lr
    [prune]     enabled, criterion, scope, target, ratio, macs, params, latency_ms, steps,
                finetune_epochs, keep_layers, max_ratio, search_step
    [quantize]  precision, calibration_samples, fallback, max_float_layers, qat_epochs,
                float_layers (torch module names for LiteRT, ONNX node names for ONNX Runtime)
    [gate]      max_accuracy_drop_points

Values come from, lowest first: the profile's defaults, the recipe file, `--set a.b=value`.
Fine-tuning defaults (prune.finetune_epochs, distill.epochs) are capped at train.epochs.
Without a recipe the profile decides: its precision, and pruning when it names a
`[compression] prune_ratio` (a smart speaker prunes and quantizes; a cloud GPU does neither).
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.errors import UsageError
from toolchain.profiles import PRECISIONS, HardwareProfile

PRUNE_TARGETS = ("ratio", "macs", "params", "latency")
_CHOICES = {
    ("prune", "criterion"): ("l2", "taylor", "bn-scale"),
    ("prune", "scope"): ("global", "uniform"),
    ("prune", "target"): PRUNE_TARGETS,
    ("quantize", "precision"): PRECISIONS,
}


def defaults(profile: HardwareProfile) -> dict[str, dict[str, Any]]:
    prune_ratio = profile.prune_ratio
    return {
        "train": {"epochs": 15, "lr": 3e-3},
        "distill": {"enabled": prune_ratio > 0, "teacher": "", "student": "",
                    "temperature": 4.0, "alpha": 0.7, "epochs": 10, "lr": 1e-3},
        "prune": {"enabled": prune_ratio > 0, "criterion": "l2", "scope": "global",
                  "target": "ratio", "ratio": prune_ratio or 0.5, "macs": 0, "params": 0,
                  "latency_ms": 0.0, "steps": 2, "finetune_epochs": 6, "keep_layers": [],
                  "max_ratio": 0.9, "search_step": 0.1},
        "quantize": {"precision": profile.precision, "calibration_samples": 256,
                     "fallback": True, "max_float_layers": 3, "qat_epochs": 3,
                     "float_layers": []},
        "gate": {"max_accuracy_drop_points": profile.budgets.max_accuracy_drop_points},
    }


@dataclass(frozen=True)
class Recipe:
    values: dict[str, dict[str, Any]]
    sources: tuple[str, ...]  # where the values came from, for the report

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    def to_dict(self) -> dict[str, Any]:
        return {**copy.deepcopy(self.values), "sources": list(self.sources)}


def _check(section: str, key: str, value: Any, default: Any, where: str) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise UsageError(f"{where}: {section}.{key} must be {expected.__name__}, got {value!r}")
    if expected is list and not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: {section}.{key} must list layer names (strings)")
    if (choices := _CHOICES.get((section, key))) and value not in choices:
        raise UsageError(f"{where}: {section}.{key} is {value!r}; valid: {', '.join(choices)}")
    if expected in (int, float) and value < 0:
        raise UsageError(f"{where}: {section}.{key} must not be negative, got {value!r}")
    return value


def _merge(base: dict, layer: dict, where: str, explicit: set[tuple[str, str]]) -> None:
    for section, table in layer.items():
        if section not in base:
            raise UsageError(f"{where}: unknown section [{section}]; valid: {', '.join(base)}")
        if not isinstance(table, dict):
            raise UsageError(f"{where}: [{section}] must be a table")
        for key, value in table.items():
            if key not in base[section]:
                raise UsageError(f"{where}: unknown key {section}.{key}; valid: "
                                 f"{', '.join(base[section])}")
            base[section][key] = _check(section, key, value, base[section][key], where)
            explicit.add((section, key))


def parse_override(text: str) -> dict[str, dict[str, Any]]:
    """`section.key=value`, the value read as TOML (a bare word is a string)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise UsageError(f"--set {text!r}: expected section.key=value, e.g. prune.ratio=0.6")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return {section: {key: value}}


def _fine_tune_within_training(values: dict, explicit: set[tuple[str, str]],
                               sources: list[str]) -> None:
    """Fine-tuning defaults never exceed the training epochs: a model trained for 2 epochs
    is not fine-tuned for 16 after pruning (that was most of a big model's build time).
    Values the recipe or --set name are kept as given."""
    epochs = values["train"]["epochs"]
    for section, key in (("prune", "finetune_epochs"), ("distill", "epochs")):
        if (section, key) not in explicit and values[section][key] > epochs:
            values[section][key] = epochs
            sources.append(f"{section}.{key} = train.epochs ({epochs}): fine-tuning by default "
                           "no longer than training")


def load_recipe(profile: HardwareProfile, path: Path | None = None,
                overrides: tuple[str, ...] = (),
                data_defaults: tuple[str, dict] | None = None) -> Recipe:
    """`data_defaults`: (the data's name, {section: {key: value}}) a built-in demo's data
    brings, over the profile's defaults and under the recipe file and --set."""
    values = defaults(profile)
    sources = [f"profile {profile.name}"]
    explicit: set[tuple[str, str]] = set()
    if data_defaults:
        name, layer = data_defaults
        _merge(values, layer, f"data {name}", set())
        sources.append(f"data {name}")
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise UsageError(f"recipe {path} not found") from exc
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"recipe {path}: cannot be read as TOML: {exc}") from exc
        _merge(values, data, f"recipe {path}", explicit)
        sources.append(f"recipe {path}")
    for text in overrides:
        _merge(values, parse_override(text), f"--set {text}", explicit)
        sources.append(f"--set {text}")
    _fine_tune_within_training(values, explicit, sources)
    prune = values["prune"]
    if prune["enabled"] and prune["target"] == "ratio" and not 0 < prune["ratio"] < 1:
        raise UsageError(f"prune.ratio must be between 0 and 1, got {prune['ratio']}")
    if prune["enabled"] and prune["target"] in ("macs", "params", "latency"):
        key = "latency_ms" if prune["target"] == "latency" else prune["target"]
        if prune["target"] == "latency" and not prune[key]:
            prune[key] = profile.budgets.p95_latency_ms
        if not prune[key]:
            raise UsageError(f"prune.target = {prune['target']!r} needs prune.{key} > 0")
    if prune["steps"] < 1 or not 0 < prune["max_ratio"] < 1 or not 0 < prune["search_step"] < 1:
        raise UsageError("prune.steps must be >= 1; prune.max_ratio and prune.search_step "
                         "between 0 and 1")
    if not 0 <= values["distill"]["alpha"] <= 1:
        raise UsageError("distill.alpha must be between 0 and 1")
    if values["quantize"]["calibration_samples"] < 1:
        raise UsageError("quantize.calibration_samples must be at least 1")
    return Recipe(values, tuple(sources))
