"""The rollout judge and cohorts, without devices: the Mann-Whitney test against SciPy's,
the verdicts, and the stable, sticky buckets."""

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from toolchain.errors import UsageError
from toolchain.fleet import judge
from toolchain.fleet.rollout import BUCKETS, RolloutConfig, bucket, cohort


@pytest.mark.parametrize("n1, n2, ties", [(3, 4, False), (8, 8, False), (12, 20, False),
                                          (9, 7, True), (40, 60, False), (50, 45, True)])
def test_mann_whitney_matches_scipy(n1, n2, ties):
    rng = np.random.default_rng(n1 * 100 + n2)
    a, b = rng.normal(0.4, 1, n1), rng.normal(0, 1, n2)
    if ties:
        a, b = np.round(a), np.round(b)
    ours = judge.mann_whitney(a.tolist(), b.tolist())
    method = "exact" if ours.exact else "asymptotic"
    for alternative, p in (("greater", ours.p_greater), ("less", ours.p_less)):
        ref = mannwhitneyu(a, b, alternative=alternative, method=method)
        assert ours.u == pytest.approx(ref.statistic)
        assert p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12)
    assert ours.exact == (not ties and n1 + n2 <= judge.EXACT_MAX_N)


def test_mann_whitney_on_identical_values_finds_nothing():
    r = judge.mann_whitney([0.0] * 10, [0.0] * 12)
    assert r.p_greater == 1.0 and r.p_less == 1.0


def _windows(rng, n, **columns):
    """n windows; each column from (mean, sd) or a constant."""
    out = []
    for _ in range(n):
        row = {}
        for name, spec in columns.items():
            row[name] = (float(rng.normal(*spec)) if isinstance(spec, tuple) else spec)
        out.append(row)
    return out


BASE = {"p95_ms": (2.0, 0.2), "error_rate": 0.0, "confidence_mean": (0.9, 0.02),
        "drift_score": (0.05, 0.01)}


def test_a_canary_like_its_control_is_promoted():
    rng = np.random.default_rng(1)
    v = judge.judge(_windows(rng, 20, **BASE), _windows(rng, 20, **BASE))
    assert v.decision == "promote", v.reason
    assert {m.metric: m.status for m in v.metrics}["accuracy"] == "absent"


def test_worse_accuracy_rolls_back_and_better_accuracy_is_named():
    rng = np.random.default_rng(2)
    control = _windows(rng, 20, **BASE, accuracy=(0.9, 0.03))
    bad = judge.judge(_windows(rng, 20, **BASE, accuracy=(0.2, 0.05)), control)
    assert bad.decision == "rollback" and "accuracy" in bad.reason
    acc = next(m for m in bad.metrics if m.metric == "accuracy")
    assert acc.status == "worse" and acc.p_worse < acc.alpha and acc.test == "exact"
    good = judge.judge(_windows(rng, 20, **BASE, accuracy=(0.97, 0.01)), control)
    assert good.decision == "promote" and "better: accuracy" in good.reason


def test_a_significant_but_tiny_difference_is_not_held_against_the_canary():
    # 200 windows each make a 5% latency difference significant; the tolerance is 25%
    rng = np.random.default_rng(3)
    canary = _windows(rng, 200, **{**BASE, "p95_ms": (2.1, 0.05)})
    control = _windows(rng, 200, **BASE)
    p95 = next(m for m in judge.judge(canary, control).metrics if m.metric == "p95_ms")
    assert p95.p_worse < 1e-6 and p95.status == "same"


def test_too_few_windows_hold_and_say_how_many():
    rng = np.random.default_rng(4)
    v = judge.judge(_windows(rng, 3, **BASE), _windows(rng, 20, **BASE), min_windows=8)
    assert v.decision == "hold" and "3/20 windows" in v.reason


def test_the_budget_the_control_meets_binds_the_canary():
    rng = np.random.default_rng(5)
    canary = _windows(rng, 10, **{**BASE, "p95_ms": (2.2, 0.05)})
    control = _windows(rng, 10, **BASE)
    v = judge.judge(canary, control, budget_p95_ms=2.1)
    assert v.decision == "rollback" and "budget" in \
        next(m for m in v.metrics if m.metric == "p95_ms").note
    # over budget on both arms (a busy host): not the canary's fault
    assert judge.judge(canary, control, budget_p95_ms=1.0).decision == "promote"


def test_a_shadow_stage_compares_columns_of_the_same_windows():
    rng = np.random.default_rng(6)
    rows = _windows(rng, 12, **BASE, shadow_p95_ms=(2.1, 0.2),
                    shadow_confidence_mean=(0.9, 0.02), shadow_accuracy=(0.4, 0.05),
                    shadow_served_accuracy=(0.9, 0.05))
    v = judge.judge(rows, rows, metrics=judge.SHADOW_METRICS)
    assert v.decision == "rollback" and "accuracy" in v.reason


def test_buckets_are_stable_and_spread():
    ids = [f"dev-{i}" for i in range(2000)]
    first = [bucket("demo", d) for d in ids]
    assert first == [bucket("demo", d) for d in ids]  # no salted hash()
    assert all(0 <= b < BUCKETS for b in first)
    share = sum(b < BUCKETS // 4 for b in first) / len(ids)
    assert 0.2 < share < 0.3
    assert [bucket("other", d) for d in ids] != first  # each model has its own order


def test_cohorts_grow_stickily_and_keep_a_control():
    members = [{"device_id": f"d{i}", "bucket": bucket("demo", f"d{i}")} for i in range(6)]
    five, half, every = cohort(members, 5), cohort(members, 50), cohort(members, 100)
    assert len(five) >= 1 and five <= half <= every  # a device stays once in
    assert len(every) == 6 and len(half) < 6
    assert len(cohort(members[:2], 99)) == 1  # one canary, one control
    assert cohort([], 50) == set()


@pytest.mark.parametrize("stages, problem", [((50.0,), "ending at 100"),
                                             ((50.0, 25.0, 100.0), "rising"),
                                             ((0.0, 100.0), "(0, 100]")])
def test_bad_stages_are_refused(stages, problem):
    with pytest.raises(UsageError, match=problem.replace("(", r"\(").replace("]", r"\]")):
        RolloutConfig(stages=stages).check()
