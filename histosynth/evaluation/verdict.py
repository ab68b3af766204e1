"""The verdict: did synthetic data help? For every task metric x class x ratio, the paired
difference to the baseline ratio over seeds (runs with the same seed start from the same weights,
so seed s of a ratio is paired with seed s of the baseline; with cross-validation folds, run
(fold f, seed s) with the baseline's (f, s)), scored on the pooled test slides.

Per comparison: n seeds, the means, the mean difference with a t-based 95 % interval and a
bootstrap one (seeds resampled with replacement, percentile interval), the paired t-test and
Wilcoxon signed-rank p-values, and a word: `helped` when the t interval lies above 0, `hurt` when
it lies below, else `no evidence` (also whenever fewer than 2 seeds give no interval). Every task
metric here is higher-is-better (Dice, precision, recall, accuracy, F1, AUROC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
PAIR_KEYS = ("fold", "seed")  # what identifies a run across ratios, where the scores have it
COLUMNS = ("task", "ratio", "baseline", "class", "metric", "paired_by", "n", "mean_baseline", "mean_ratio", "mean_diff",
           "ci_low", "ci_high", "boot_low", "boot_high", "p_ttest", "p_wilcoxon", "verdict")


def paired_difference(ratio: np.ndarray, baseline: np.ndarray, seed: int) -> dict:
    """The comparison of paired scores (one pair per seed): means, mean difference, t and bootstrap
    intervals, p-values and the verdict word."""
    d = np.asarray(ratio, float) - np.asarray(baseline, float)
    n = len(d)
    out = {"n": n, "mean_baseline": float(np.mean(baseline)) if n else math.nan,
           "mean_ratio": float(np.mean(ratio)) if n else math.nan, "mean_diff": float(np.mean(d)) if n else math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "boot_low": math.nan, "boot_high": math.nan,
           "p_ttest": math.nan, "p_wilcoxon": math.nan}
    if n >= 2:
        sd = float(np.std(d, ddof=1))
        sd = sd if sd > 1e-12 * max(1.0, abs(out["mean_diff"])) else 0.0  # round-off of equal differences
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
        out.update(ci_low=out["mean_diff"] - half, ci_high=out["mean_diff"] + half)
        out["p_ttest"] = float(stats.ttest_rel(ratio, baseline).pvalue) if sd > 0 else (1.0 if out["mean_diff"] == 0 else 0.0)
        out["p_wilcoxon"] = float(stats.wilcoxon(ratio, baseline, zero_method="wilcox").pvalue) if np.any(d != 0) else 1.0
        means = d[np.random.default_rng(seed).integers(0, n, (BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
        tail = (1 - CONFIDENCE) / 2 * 100
        out["boot_low"], out["boot_high"] = (float(v) for v in np.percentile(means, [tail, 100 - tail]))
    out["verdict"] = verdict_word(out["ci_low"], out["ci_high"])
    return out


def verdict_word(low: float, high: float) -> str:
    """helped (interval above 0), hurt (below 0) or no evidence (it holds 0, or there is none)."""
    if math.isnan(low) or math.isnan(high):
        return "no evidence"
    return "helped" if low > 0 else "hurt" if high < 0 else "no evidence"


def verdict(scores: pd.DataFrame, baseline: str, metrics: Sequence[str], *, task: str, seed: int,
            order: Sequence[str] | None = None) -> pd.DataFrame:
    """The verdict rows (COLUMNS) of one task's tidy scores (ratio, seed, slide, class, metric,
    value, optionally fold): pooled rows (slide 'all') where a slide column exists; pairs are
    matched by seed (and fold) and pairs with a missing value are dropped."""
    pooled = scores[scores["slide"] == "all"] if "slide" in scores else scores
    pooled = pooled[pooled["metric"].isin(metrics)]
    pair = [key for key in PAIR_KEYS if key in pooled and (key == "seed" or pooled[key].nunique() > 1)]
    keys = [*pair, "class", "metric"]
    base = pooled[pooled["ratio"] == baseline].set_index(keys)["value"]
    if base.empty:
        raise ValueError(f"no {task} results for the baseline ratio {baseline!r}; ratios present: {sorted(pooled['ratio'].unique())}")
    ratios = [r for r in (order or dict.fromkeys(pooled["ratio"])) if r != baseline and (pooled["ratio"] == r).any()]
    rows = []
    for ratio in ratios:
        other = pooled[pooled["ratio"] == ratio].set_index(keys)["value"]
        joined = pd.concat({"baseline": base, "ratio": other}, axis=1, join="inner").dropna().reset_index()
        for (name, metric), group in joined.groupby(["class", "metric"], sort=False):
            group = group.sort_values(pair)
            rows.append({"task": task, "ratio": ratio, "baseline": baseline, "class": name, "metric": metric,
                         "paired_by": " x ".join(pair),
                         **paired_difference(group["ratio"].to_numpy(), group["baseline"].to_numpy(), seed)})
    return pd.DataFrame(rows, columns=COLUMNS)


def sentence(row: pd.Series | dict) -> str:
    """One verdict row in words, e.g. 'syn64 vs real, Blood vessel dice: -0.030 [-0.060, 0.000] over 3 seeds: no evidence'."""
    interval = (f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" if not math.isnan(row["ci_low"])
                else "(no interval)")
    runs = f"seed{'s' if row['n'] != 1 else ''}" if row.get("paired_by", "seed") == "seed" else f"runs ({row['paired_by']})"
    return (f"{row['ratio']} vs {row['baseline']}, {row['class']} {row['metric']}: {row['mean_diff']:+.3f} {interval} "
            f"over {row['n']} {runs}: {row['verdict']}")
