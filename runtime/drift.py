"""Drift statistics against the bundle's reference distributions, numpy only.

Population stability index (PSI) compares binned proportions: sum((o - r) * ln(o / r)).
Common reading: below 0.1 stable, 0.1-0.25 a shift worth watching, above 0.25 a shift.
Small windows inflate PSI: a window of n samples over k bins scores about (k - 1) / (2 n)
even when nothing moved, so windows should hold a few hundred inferences for a threshold
near 0.25, and `psi` smooths empty bins (see there).

The two-sample Kolmogorov-Smirnov test compares a window's per-sample values (each sample's
mean per input channel, the confidences) with the reference samples the bundle carries;
the p-value uses the asymptotic Kolmogorov distribution with Stephens' small-sample
correction (Numerical Recipes, 3rd ed., section 14.3.3).
"""

from __future__ import annotations

import math

import numpy as np

PRIOR_WEIGHT = 1.0


def psi(reference: np.ndarray | list[float], counts: np.ndarray | list[float],
        reference_count: int | None = None) -> float:
    """PSI of observed `counts` against `reference` proportions over the same bins.

    Both sides are smoothed so that empty bins do not blow up the logarithm: the reference
    gets half a count per bin (it came from `reference_count` samples), the observation a
    prior of PRIOR_WEIGHT samples shaped like the reference. A window of n samples that
    follows the reference then scores about (bins - 1) / (2 n) (the chi-square bias), not
    the several tenths that flat smoothing gives a peaked histogram such as confidence."""
    ref = np.asarray(reference, dtype=np.float64)
    k = len(ref)
    n_ref = reference_count or 1000
    ref = (ref / max(ref.sum(), 1e-12) * n_ref + 0.5) / (n_ref + 0.5 * k)
    obs = np.asarray(counts, dtype=np.float64)
    obs = (obs + PRIOR_WEIGHT * ref) / (obs.sum() + PRIOR_WEIGHT)
    return float(np.sum((obs - ref) * np.log(obs / ref)))


def kolmogorov_p(statistic: float, n: int, m: int) -> float:
    """P(D >= statistic) for two samples of sizes n and m, asymptotically."""
    if n == 0 or m == 0:
        return 1.0
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * statistic
    if lam < 1e-3:
        return 1.0
    total, sign = 0.0, 1.0
    for k in range(1, 101):
        term = sign * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-10:
            break
        sign = -sign
    return float(min(1.0, max(0.0, 2.0 * total)))


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic D and its p-value."""
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if not len(a) or not len(b):
        return 0.0, 1.0
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    return d, kolmogorov_p(d, len(a), len(b))


def psi_quantile(reference: np.ndarray | list[float], observed: np.ndarray,
                 bins: int = 10) -> float:
    """PSI over bins that each hold an equal share of the reference samples (the textbook
    choice: fixed-width bins on a peaked distribution such as confidence leave most bins
    nearly empty, and small windows then look drifted when nothing moved). Ties in the
    reference merge bins."""
    return psi_binned(quantile_bins(reference, bins), observed)


def quantile_bins(reference: np.ndarray | list[float],
                  bins: int = 10) -> tuple[np.ndarray, np.ndarray, int]:
    """psi_quantile's reference side, to work out once for many windows: the inner bin
    edges, the reference's proportion in each bin, and the reference's size."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1)
    return edges, ref_counts / ref_counts.sum(), len(ref)


def psi_binned(binned: tuple[np.ndarray, np.ndarray, int], observed: np.ndarray) -> float:
    """PSI of `observed` over quantile_bins' bins."""
    edges, proportions, n_ref = binned
    obs_counts = np.bincount(np.searchsorted(edges, np.asarray(observed, dtype=np.float64)
                                             .ravel(), side="right"), minlength=len(edges) + 1)
    return psi(proportions, obs_counts, n_ref)
