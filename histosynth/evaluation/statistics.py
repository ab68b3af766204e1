"""The statistics of the verdict: a ratio's effect on a pooled test metric, over training seeds and
test images at once, and what a run of a given size could detect.

Seeds play the part of readers and test images (or slides) of cases in a multi-reader multi-case
study (Obuchowski and Rockette 1995): for S paired runs with differences d_s = metric(ratio, s) -
metric(baseline, s), each a pooled metric over the same G test units, the effect is mean(d) and

    Var = s^2_d / S + max(C, 0),

where s^2_d is the sample variance of d over seeds and C the mean covariance, over pairs of
different seeds, of d_s and d_s' under resampling of the test units, estimated by the delete-one
jackknife (every seed and both arms leave out the same unit, which keeps the pairing). s^2_d / S
is the seed-only t variance; C adds what the seeds share, the test set. s^2_d is floored at W, the
test-image noise every seed's difference carries on its own (below), so that seeds agreeing by chance
(3 seeds are few) cannot make the interval narrower than the one of these very models scored on
another draw of the test set: Var >= W / S + C, the fixed-seed variance, as Hillis (2007) constrains
Obuchowski-Rockette's reader term. Each part gets the t
quantile of its own degrees of freedom (half_width: S - 1 for the seed part, G - 1 for the test
set's), which simulation showed to hold its level at 3 seeds where one pooled Satterthwaite df did
not (config/README.md); a floored seed part gets Hillis's (S - 1) (max(s^2_d, W) / s^2_d)^2, at most
G - 1. p is the level at which that interval reaches 0.

Variance components (per run of this size): the seed x arm variance sigma2_seed = s^2_d - W, where
W = mean_s jackknife Var(d_s) - C is the test-image noise that is not shared between seeds; the
shared image term C and W scale with 1/G. design_terms gives another design's variance terms from
them, mde the smallest effect detected with the given power.

Every function is vectorised over leading axes (simulated experiments).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats


def jackknife_cov(replicates: np.ndarray) -> np.ndarray:
    """(..., S, S) delete-one jackknife covariance of S statistics from their (..., S, G) leave-one-unit-out replicates."""
    g = replicates.shape[-1]
    centred = replicates - replicates.mean(axis=-1, keepdims=True)
    return (g - 1) / g * np.einsum("...sg,...tg->...st", centred, centred)


def variance_components(differences: np.ndarray, replicates: np.ndarray) -> dict[str, np.ndarray]:
    """Per-run variance components of paired differences (..., S) with jackknife replicates (..., S, G):
    seed_var (s^2_d, the seed-only variance of one run's difference), shared (C), within (W) and seed (sigma2_seed)."""
    n = differences.shape[-1]
    cov = jackknife_cov(replicates)
    diagonal = np.trace(cov, axis1=-2, axis2=-1) / n
    shared = (cov.sum(axis=(-2, -1)) - diagonal * n) / (n * (n - 1)) if n > 1 else np.zeros_like(diagonal)
    seed_var = differences.var(axis=-1, ddof=1) if n > 1 else np.full(differences.shape[:-1], np.nan)
    within = np.maximum(diagonal - shared, 0.0)
    return {"seed_var": seed_var, "shared": shared, "within": within, "seed": np.maximum(seed_var - within, 0.0)}


def half_width(seed_term: np.ndarray, shared: np.ndarray, seeds, units: int, level) -> np.ndarray:
    """sqrt(t^2_{seeds-1}(level) * seed_term + t^2_{units-1}(level) * shared): each variance term with
    the t quantile of its own degrees of freedom (level the upper quantile, e.g. 0.975; seeds may be
    an array, one per row)."""
    seed_q, unit_q = stats.t.ppf(level, seeds - 1), stats.t.ppf(level, max(units - 1, 1))
    return np.sqrt(seed_q**2 * seed_term + unit_q**2 * np.maximum(shared, 0.0))


def p_value(estimate: np.ndarray, seed_term: np.ndarray, shared: np.ndarray, seeds: int, units: int) -> np.ndarray:
    """Two-sided p of the interval family half_width: the alpha whose 1 - alpha interval just
    reaches 0 (bisection on log alpha, down to 1e-12)."""
    estimate = np.abs(np.asarray(estimate, float))
    low, high = np.full(estimate.shape, np.log(1e-12)), np.zeros(estimate.shape)
    for _ in range(50):
        mid = (low + high) / 2
        inside = half_width(seed_term, shared, seeds, units, 1 - np.exp(mid) / 2) >= estimate  # 0 is in the interval
        low, high = np.where(inside, mid, low), np.where(inside, high, mid)
    return np.where(estimate > 0, np.exp(high), 1.0)


def mde(
    seed_term: np.ndarray, shared: np.ndarray, seeds: int, units: int, confidence: float, power: float
) -> np.ndarray:
    """Minimal detectable effect at `power`: half_width at the test's quantile plus half_width at the power's."""
    return half_width(seed_term, shared, seeds, units, 0.5 + confidence / 2) + half_width(
        seed_term, shared, seeds, units, power
    )


def paired_effect(
    differences: np.ndarray, replicates: np.ndarray, *, confidence: float, power: float
) -> dict[str, np.ndarray]:
    """The effect of paired differences (..., S) over seeds and test units, their jackknife replicates
    (..., S, G): estimate, se, ci_low/ci_high, p, mde; the seed-only t interval (t_low, t_high, p_t:
    the same S differences, S - 1 df, no test-set term) and the variance components (var_*).
    Fewer than 2 seeds give NaN intervals and p."""
    d = np.asarray(differences, float)
    n, units = d.shape[-1], np.shape(replicates)[-1]
    parts = variance_components(d, np.asarray(replicates, float))
    estimate = d.mean(axis=-1)
    seed_term, shared = np.maximum(parts["seed_var"], parts["within"]) / n, np.maximum(parts["shared"], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # Hillis's df of the floored term, S - 1 up to G - 1
        seed_df = 1 + np.clip((n - 1) * (seed_term * n / parts["seed_var"]) ** 2, n - 1, units - 1)
    seed_df = np.where(np.isnan(seed_df), units, seed_df)
    out = {"estimate": estimate, "se": np.sqrt(seed_term + shared)}
    if n < 2:
        nan = np.full(estimate.shape, np.nan)
        return (
            out
            | {k: nan for k in ("ci_low", "ci_high", "p", "t_low", "t_high", "p_t", "mde")}
            | {"var_" + k: v for k, v in parts.items()}
        )
    half = half_width(seed_term, shared, seed_df, units, 0.5 + confidence / 2)
    seed_only = parts["seed_var"] / n
    t_half = stats.t.ppf(0.5 + confidence / 2, n - 1) * np.sqrt(seed_only)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_t = np.where(
            seed_only > 0,
            2 * stats.t.sf(np.abs(estimate) / np.sqrt(seed_only), n - 1),
            np.where(estimate == 0, 1.0, 0.0),
        )
    out |= {
        "ci_low": estimate - half,
        "ci_high": estimate + half,
        "p": p_value(estimate, seed_term, shared, seed_df, units),
        "t_low": estimate - t_half,
        "t_high": estimate + t_half,
        "p_t": p_t,
        "mde": mde(seed_term, shared, seed_df, units, confidence, power),
    }
    return out | {"var_" + k: v for k, v in parts.items()}


def design_terms(components: Mapping[str, float], seeds: int, units_factor: float = 1.0) -> tuple[float, float]:
    """(seed_term, shared) of a design with `seeds` paired runs and units_factor times this run's
    test units, from one run's variance components (seed, shared, within: the latter two scale with 1/units)."""
    return (
        (components["seed"] + components["within"] / units_factor) / seeds,
        max(components["shared"], 0.0) / units_factor,
    )


def needed(
    components: Mapping[str, float],
    target: float,
    *,
    seeds: int,
    units: int,
    confidence: float,
    power: float,
    max_seeds: int,
    max_factor: float,
) -> tuple[float, float]:
    """(seeds, test-unit factor) that would detect an effect of `target` with `power`: the fewest
    seeds at this run's test units (NaN beyond max_seeds), and the smallest power-of-2 multiple of
    the test units at this run's seeds (NaN beyond max_factor)."""

    def detects(s: int, factor: float) -> bool:
        seed_term, shared = design_terms(components, s, factor)
        return bool(mde(seed_term, shared, s, int(units * factor), confidence, power) <= abs(target))

    more_seeds = next((s for s in range(2, max_seeds + 1) if detects(s, 1.0)), np.nan)
    factors = 2.0 ** np.arange(0, int(np.log2(max_factor)) + 1)
    more_units = next((f for f in factors if seeds >= 2 and detects(seeds, f)), np.nan)
    return float(more_seeds), float(more_units)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), NaN kept out of the family."""
    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[order]), 1.0)
    return out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), NaN kept out of the family."""
    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out
