"""Fleet rules: a per-window condition held for K consecutive windows on at least M devices
running one model version fires a trigger; the trigger stays active (and its command does
not run again) until the condition clears.

A rules file (TOML):

    [[rule]]
    name = "input-drift"
    metric = "drift_score"      # a window column, see METRICS (or SWEEP_METRICS)
    above = 0.25                # or below = ...; for p95_ms/p99_ms, above = "budget"
    consecutive = 3             # K windows in a row on one device
    min_devices = 1             # M devices of one model version
    command = ["toolchain", "build", "--target", "smart-speaker", "--data", "fresh.npz"]
"""

from __future__ import annotations

import shlex
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.errors import UsageError

MIN_FEEDBACK = 5  # labels a window needs before its accuracy counts for a rule
# a metric that means something only over enough samples: its count column and minimum (a
# window with fewer counts as one without the metric: it neither extends nor breaks a streak)
METRIC_MIN_COUNT = {"accuracy": ("feedback_count", MIN_FEEDBACK)}
METRICS = {
    "drift_score": "the larger PSI of input values and predicted classes",
    "input_psi": "PSI of the input value histogram",
    "class_psi": "PSI of the predicted-class mix",
    "confidence_psi": "PSI of the confidence histogram",
    "input_ks_p": "smallest two-sample KS p-value over input channels (use below =)",
    "confidence_ks_p": "two-sample KS p-value of confidences (use below =)",
    "p50_ms": "window median latency", "p95_ms": "window p95 latency",
    "p99_ms": "window p99 latency", "error_rate": "errors / inferences in the window",
    "accuracy": f"share of feedback labels matching the served prediction (none when the "
                f"window got fewer than {MIN_FEEDBACK} labels; use below =)",
    "shadow_agreement": "share of sampled inputs where a shadow candidate agreed with the "
                        "served model (use below =)",
    "confidence_mean": "mean top-1 confidence of the window's inferences (use below =)",
}
# Metrics of a device's silence, not of a window: the listener computes them for every
# device every few seconds (a sweep), so `consecutive` does not apply to them.
SWEEP_METRICS = {
    "silence": "window periods since the device's last message (devices send a window, "
               "empty when idle, every period)",
    "offline_s": "seconds since the device said it is offline (its status, or the broker's "
                 "last will when its connection died)",
}
RULE_KEYS = {"name", "metric", "above", "below", "consecutive", "min_devices", "command",
             "budget_factor"}


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    above: float | str | None = None
    below: float | None = None
    consecutive: int = 3
    min_devices: int = 1
    command: tuple[str, ...] | None = None
    budget_factor: float = 1.0

    def threshold(self, row: dict[str, Any]) -> float | None:
        if self.above == "budget":
            budget = row.get("budget_p95_ms")
            return None if budget is None else budget * self.budget_factor
        return self.above if self.above is not None else self.below

    def value(self, row: dict[str, Any]) -> Any:
        """The row's value of the metric; None where it has none or too few samples for it
        (METRIC_MIN_COUNT)."""
        value = row.get(self.metric)
        if value is not None and self.metric in METRIC_MIN_COUNT:
            column, least = METRIC_MIN_COUNT[self.metric]
            if (row.get(column) or 0) < least:
                return None
        return value

    def breaches(self, row: dict[str, Any]) -> bool:
        value, limit = self.value(row), self.threshold(row)
        if value is None or limit is None:
            return False
        return value > limit if self.above is not None else value < limit

    def describe(self) -> str:
        op = f"> {self.above}" if self.above is not None else f"< {self.below}"
        if self.above == "budget":
            op = "> budget" + (f" x {self.budget_factor}" if self.budget_factor != 1 else "")
        return (f"{self.metric} {op} for {self.consecutive} consecutive windows on >= "
                f"{self.min_devices} device(s)")


DEFAULT_RULES = (
    Rule("drift", "drift_score", above=0.25, consecutive=3, min_devices=1),
    Rule("latency-budget", "p95_ms", above="budget", consecutive=3, min_devices=1),
    Rule("error-rate", "error_rate", above=0.05, consecutive=2, min_devices=1),
    Rule("silent", "silence", above=3.0, consecutive=1, min_devices=1),
)


def load_rules(path: Path | None) -> tuple[Rule, ...]:
    if path is None:
        return DEFAULT_RULES
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read rules file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"rules file {path} is not valid TOML: {exc}") from exc
    entries = doc.get("rule")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"rules file {path} has no [[rule]] tables")
    rules, names = [], set()
    for i, entry in enumerate(entries):
        where = f"{path}: rule {i + 1}"
        rule = _parse_rule(entry, where)
        if rule.name in names:
            raise UsageError(f"{where}: the name {rule.name!r} is used twice")
        names.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def _parse_rule(entry: dict[str, Any], where: str) -> Rule:
    unknown = set(entry) - RULE_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(sorted(RULE_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name or "|" in name:
        raise UsageError(f"{where}: needs a name (text without '|')")
    metric = entry.get("metric")
    if metric not in METRICS and metric not in SWEEP_METRICS:
        raise UsageError(f"{where} ({name}): metric {metric!r} is not one of "
                         f"{', '.join([*METRICS, *SWEEP_METRICS])}")
    if metric in SWEEP_METRICS and entry.get("consecutive", 1) != 1:
        raise UsageError(f"{where} ({name}): {metric} is measured on the device, not per "
                         f"window: leave out consecutive")
    above, below = entry.get("above"), entry.get("below")
    if (above is None) == (below is None):
        raise UsageError(f"{where} ({name}): give exactly one of above = or below =")
    if above == "budget" and metric not in ("p50_ms", "p95_ms", "p99_ms"):
        raise UsageError(f"{where} ({name}): above = \"budget\" works for latency metrics only")
    for key, value in (("above", above), ("below", below)):
        if value is not None and value != "budget" and not isinstance(value, int | float):
            raise UsageError(f"{where} ({name}): {key} must be a number"
                             + (' or "budget"' if key == "above" else ""))
    ints = {}
    for key in ("consecutive", "min_devices"):
        value = entry.get(key, 3 if key == "consecutive" and metric in METRICS else 1)
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{where} ({name}): {key} must be a whole number >= 1")
        ints[key] = value
    command = entry.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    if command is not None and (not isinstance(command, list) or not command
                                or not all(isinstance(c, str) for c in command)):
        raise UsageError(f"{where} ({name}): command must be a string or a list of strings")
    factor = entry.get("budget_factor", 1.0)
    if not isinstance(factor, int | float) or factor <= 0:
        raise UsageError(f"{where} ({name}): budget_factor must be a positive number")
    return Rule(name, metric, above=above if above is None or above == "budget" else
                float(above), below=None if below is None else float(below),
                command=tuple(command) if command else None, budget_factor=float(factor),
                **ints)


@dataclass(frozen=True)
class Transition:
    kind: str  # "fired" or "cleared"
    trigger_id: str
    rule: Rule
    scope: str
    devices: list[str]
    detail: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What one window means for one rule: whether its device now breaches, and whether the
    rule's trigger in the window's scope should fire or clear (None: leave it as it is)."""
    breaching: bool
    devices: list[str]  # the scope's breaching devices, this one included when it breaches
    action: str | None  # "fire", "clear" or None
    detail: dict[str, Any]


def scope_of(row: dict[str, Any]) -> str:
    """A rule counts devices per model version."""
    return f"{row['model']}@{row['model_version']}"


def streak_breaches(rule: Rule, recent: Sequence[dict[str, Any]]) -> bool:
    """`recent`: one device's windows in one scope, newest first. Windows without the
    metric (too few inferences for drift) neither extend nor break a streak."""
    with_metric = [r for r in recent if rule.value(r) is not None][:rule.consecutive]
    return len(with_metric) == rule.consecutive and all(rule.breaches(r) for r in with_metric)


def evaluate(rule: Rule, row: dict[str, Any], recent: Sequence[dict[str, Any]],
             breaching: Iterable[str], active: bool) -> Outcome:
    """Decide what window `row` means for `rule`, given its device's recent windows (newest
    first, `row` among them), the devices that breached in its scope before it, and whether
    the scope's trigger is active. No I/O: the store fetches the rows and writes the result
    in the ingest transaction."""
    return decide(rule, row, streak_breaches(rule, recent), breaching, active)


def decide(rule: Rule, row: dict[str, Any], now_breaching: bool, breaching: Iterable[str],
           active: bool) -> Outcome:
    """evaluate() once the device's streak is known: whether it now breaches."""
    device = row["device_id"]
    devices = sorted(set(breaching) - {device} | ({device} if now_breaching else set()))
    scope = scope_of(row)
    if len(devices) >= rule.min_devices:
        if active:
            return Outcome(now_breaching, devices, None, {})
        return Outcome(now_breaching, devices, "fire", {
            "rule": rule.name, "condition": rule.describe(), "scope": scope,
            "metric": rule.metric, "threshold": rule.threshold(row),
            "latest_value": rule.value(row), "devices": devices})
    if active:
        return Outcome(now_breaching, devices, "clear", {"rule": rule.name, "scope": scope})
    return Outcome(now_breaching, devices, None, {})
