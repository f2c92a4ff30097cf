"""The rollout judge: is a canary worse than its control? One nonparametric test per metric
over telemetry windows from the same time span, and a verdict per stage.

The test is the Mann-Whitney U test (Wilcoxon rank-sum): each arm's samples are its
devices' window values of one metric (a window's p95 latency, error rate, mean confidence,
drift score, accuracy from feedback), so it needs no assumption about their distribution,
which for p95 latencies and error rates is anything but normal. It asks the one-sided
question "does the canary tend to be worse?": exact p-values for small samples without ties,
the normal approximation with tie and continuity corrections otherwise. A metric counts
against the canary only when that p-value is below alpha divided by the number of metrics
judged (Bonferroni: five metrics at alpha 0.05 test at 0.01 each) AND the medians differ by
more than the metric's tolerance in the worse direction: with hundreds of windows a
difference too small to matter would otherwise be significant. (Canary analysis in Kayenta
and Argo Rollouts' Kayenta step use the same test on the same kind of data.)

Verdicts: "rollback" when a metric is worse (or the canary misses the p95 budget its
control meets); "hold" when an arm has fewer than `min_windows` windows with a metric that
must be judged; "promote" otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

EXACT_MAX_N = 40  # both arms together: the exact distribution is cheap up to here


@dataclass(frozen=True)
class MannWhitney:
    u: float  # the canary's U: pairs (canary, control) with canary > control, ties half
    p_greater: float  # one-sided: the canary's values tend to be greater
    p_less: float  # one-sided: the canary's values tend to be smaller
    exact: bool


def mann_whitney(canary: Sequence[float], control: Sequence[float]) -> MannWhitney:
    """The Mann-Whitney U test of `canary` against `control` (both non-empty)."""
    n1, n2 = len(canary), len(control)
    if not n1 or not n2:
        raise ValueError("the Mann-Whitney test needs samples in both arms")
    pooled = sorted([(v, 0) for v in canary] + [(v, 1) for v in control])
    rank_sum, ties, i = 0.0, 0, 0
    while i < len(pooled):  # average ranks over runs of equal values
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        run = j - i + 1
        mid = (i + j) / 2 + 1
        rank_sum += mid * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        ties += run ** 3 - run
        i = j + 1
    u = rank_sum - n1 * (n1 + 1) / 2
    n = n1 + n2
    if not ties and n <= EXACT_MAX_N:
        dist = _u_distribution(n1, n2)
        total = math.comb(n, n1)
        k = round(u)  # U is a whole number without ties
        p_greater = sum(dist[k:]) / total
        p_less = sum(dist[:k + 1]) / total
        return MannWhitney(u, min(p_greater, 1.0), min(p_less, 1.0), True)
    mean = n1 * n2 / 2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:  # every value equal: nothing tells the arms apart
        return MannWhitney(u, 1.0, 1.0, False)
    sd = math.sqrt(var)
    p_greater = 0.5 * math.erfc((u - mean - 0.5) / sd / math.sqrt(2))
    p_less = 0.5 * math.erfc((mean - u - 0.5) / sd / math.sqrt(2))
    return MannWhitney(u, min(p_greater, 1.0), min(p_less, 1.0), False)


@functools.lru_cache(maxsize=256)
def _u_distribution(n1: int, n2: int) -> tuple[int, ...]:
    """How many of the C(n1+n2, n1) orderings give U = 0, 1, ..., n1*n2 (no ties): the
    recurrence f(m, n, u) = f(m-1, n, u-n) + f(m, n-1, u) on the largest value's arm."""
    if n1 == 0 or n2 == 0:
        return (1,)
    out = [0] * (n1 * n2 + 1)
    for u, ways in enumerate(_u_distribution(n1 - 1, n2)):  # the largest is the canary's
        out[u + n2] += ways
    for u, ways in enumerate(_u_distribution(n1, n2 - 1)):  # the largest is the control's
        out[u] += ways
    return tuple(out)


@dataclass(frozen=True)
class Metric:
    """One judged metric: a windows column for each arm, which direction is worse, and how
    far apart the medians must be to matter (relative: a ratio, else a difference)."""
    name: str
    canary_column: str
    control_column: str
    worse: str  # "higher" or "lower"
    tolerance: float
    relative: bool = False
    required: bool = True  # False: judged only where both arms report it


# canary and control windows from the same time span, each arm on its own bundle
STAGE_METRICS = (
    Metric("p95_ms", "p95_ms", "p95_ms", "higher", 0.25, relative=True),
    Metric("error_rate", "error_rate", "error_rate", "higher", 0.01),
    Metric("confidence_mean", "confidence_mean", "confidence_mean", "lower", 0.05),
    Metric("drift_score", "drift_score", "drift_score", "higher", 0.05, required=False),
    Metric("accuracy", "accuracy", "accuracy", "lower", 0.02, required=False),
)
# a shadow stage: the candidate against the served model in the same windows, on the same
# inputs; the candidate runs on a throttled background thread, so its latency is noisier
SHADOW_METRICS = (
    Metric("p95_ms", "shadow_p95_ms", "p95_ms", "higher", 0.5, relative=True),
    Metric("confidence_mean", "shadow_confidence_mean", "confidence_mean", "lower", 0.05),
    Metric("accuracy", "shadow_accuracy", "shadow_served_accuracy", "lower", 0.02,
           required=False),
)


@dataclass(frozen=True)
class MetricResult:
    metric: str
    status: str  # "worse", "better", "same", "insufficient" or "absent"
    canary_n: int
    control_n: int
    canary_median: float | None
    control_median: float | None
    u: float | None = None
    p_worse: float | None = None
    p_better: float | None = None
    alpha: float | None = None
    test: str | None = None  # "exact" or "normal"
    note: str = ""


@dataclass(frozen=True)
class Verdict:
    decision: str  # "promote", "hold" or "rollback"
    reason: str
    metrics: tuple[MetricResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "reason": self.reason,
                "metrics": [asdict(m) for m in self.metrics]}


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _beyond(metric: Metric, canary: float, control: float, direction: str) -> bool:
    """Whether the canary's median differs from the control's by more than the tolerance,
    in `direction` ("higher" or "lower")."""
    if metric.relative:
        if control <= 0:
            return canary > 0 if direction == "higher" else False
        ratio = canary / control
        return ratio > 1 + metric.tolerance if direction == "higher" \
            else ratio < 1 - metric.tolerance
    diff = canary - control
    return diff > metric.tolerance if direction == "higher" else diff < -metric.tolerance


def judge_metric(metric: Metric, canary: Sequence[float], control: Sequence[float],
                 min_windows: int, alpha: float) -> MetricResult:
    """One metric's result; `alpha` is this metric's share of the stage's alpha."""
    n1, n2 = len(canary), len(control)
    med1 = median(canary) if n1 else None
    med2 = median(control) if n2 else None
    if not metric.required and (not n1 or not n2):
        return MetricResult(metric.name, "absent", n1, n2, med1, med2,
                            note="not reported by both arms")
    if n1 < min_windows or n2 < min_windows:
        return MetricResult(metric.name, "insufficient", n1, n2, med1, med2,
                            note=f"needs {min_windows} windows per arm")
    mw = mann_whitney(canary, control)
    worse_high = metric.worse == "higher"
    p_worse = mw.p_greater if worse_high else mw.p_less
    p_better = mw.p_less if worse_high else mw.p_greater
    better_dir = "lower" if worse_high else "higher"
    assert med1 is not None and med2 is not None
    if p_worse < alpha and _beyond(metric, med1, med2, metric.worse):
        status = "worse"
    elif p_better < alpha and _beyond(metric, med1, med2, better_dir):
        status = "better"
    else:
        status = "same"
    return MetricResult(metric.name, status, n1, n2, med1, med2, mw.u, p_worse, p_better,
                        alpha, "exact" if mw.exact else "normal")


def judge(canary: Sequence[dict[str, Any]], control: Sequence[dict[str, Any]], *,
          metrics: Sequence[Metric] = STAGE_METRICS, min_windows: int = 8,
          alpha: float = 0.05, budget_p95_ms: float | None = None) -> Verdict:
    """The verdict on a stage from its windows (dicts of windows columns): `canary` from the
    devices on the new bundle, `control` from those on the old one, over the same span (for a
    shadow stage, both are the shadowing devices' windows and the metrics' columns differ)."""
    def values(rows: Sequence[dict[str, Any]], column: str) -> list[float]:
        return [float(r[column]) for r in rows if r.get(column) is not None]

    samples = [(m, values(canary, m.canary_column), values(control, m.control_column))
               for m in metrics]
    judged = [s for s in samples if s[0].required or (s[1] and s[2])]
    share = alpha / max(len(judged), 1)
    results = [judge_metric(m, a, b, min_windows, share) for m, a, b in samples]
    worse = [r for r in results if r.status == "worse"]
    if budget_p95_ms is not None:
        p95 = next((r for r in results if r.metric == "p95_ms"), None)
        if p95 is not None and p95.status not in ("insufficient", "absent") and \
                p95.canary_median is not None and p95.control_median is not None and \
                p95.canary_median > budget_p95_ms >= p95.control_median:
            results = [r if r is not p95 else MetricResult(
                **{**asdict(r), "status": "worse",
                   "note": f"median p95 {r.canary_median:.3g} ms over the budget "
                           f"{budget_p95_ms:g} ms that the control meets"})
                for r in results]
            worse = [r for r in results if r.status == "worse"]
    if worse:
        named = ", ".join(f"{r.metric} (canary {r.canary_median:.4g} vs control "
                          f"{r.control_median:.4g}"
                          + (f", p={r.p_worse:.2g}" if r.p_worse is not None else "")
                          + ")" for r in worse)
        return Verdict("rollback", f"worse: {named}", tuple(results))
    short = [r for r in results if r.status == "insufficient"]
    if short:
        named = ", ".join(f"{r.metric} ({r.canary_n}/{r.control_n} windows)" for r in short)
        return Verdict("hold", f"not enough data: {named}; needs {min_windows} windows per "
                               f"arm", tuple(results))
    better = [r.metric for r in results if r.status == "better"]
    return Verdict("promote", "no metric worse" + (f"; better: {', '.join(better)}"
                                                   if better else ""), tuple(results))
