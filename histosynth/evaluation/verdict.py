"""The verdict: did synthetic data help? For every task metric x class x ratio, the difference to the
baseline ratio in the pooled test metric, averaged over paired runs (seed s of a ratio with seed s
of the baseline, which starts from the same weights; (fold f, seed s) under cross-validation), with
an interval over both sources of variation, the training seed and the test images
(histosynth.evaluation.statistics, from the per-image tables through
histosynth.evaluation.replicates).

One endpoint is primary (`verdict.primary`, by default segmentation Dice of the first class a
synthetic set targets): its rows (one per ratio) are tested at `verdict.confidence` and answer the
report's question. Every other row is secondary: beside its raw p, Holm's (family-wise) and
Benjamini-Hochberg's (false discovery) adjusted p over the secondary rows, and its word from the
one `verdict.adjustment` names. Words: helped (the difference is above 0 at that level), hurt
(below), no evidence. Every task metric here is higher-is-better. Each row carries the effect the
run could detect with `verdict.power`, and the primary rows the seeds and test units that would
detect `verdict.target_effect`. The seed-only t interval of earlier versions stays as t_low/t_high/p_t.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from histosynth.evaluation.replicates import classification_replicates, jackknife_units, segmentation_replicates
from histosynth.evaluation.statistics import benjamini_hochberg, holm, needed, paired_effect

COLUMNS = (
    "task",
    "ratio",
    "sources",
    "baseline",
    "class",
    "metric",
    "endpoint",
    "paired_by",
    "n",
    "units",
    "unit",
    "mean_baseline",
    "mean_ratio",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
    "p_bh",
    "verdict",
    "t_low",
    "t_high",
    "p_t",
    "mde",
    "var_seed",
    "var_shared",
    "var_within",
    "target_effect",
    "seeds_needed",
    "units_needed",
)
MAX_SEEDS, MAX_UNITS_FACTOR = 100, 64  # the planning's search limits
METRIC_NAMES = {"dice": "Dice", "f1": "F1", "auroc": "AUROC"}


def primary_endpoint(config: Mapping) -> dict:
    """verdict.primary, else segmentation Dice of the first class of `classes` that a synthetic set
    of the ratios targets (synthesis.inpaint/synthesize.target_class) among the segmented classes,
    else of the first segmented class; classification balanced accuracy (class 'all') without segmentation."""
    if config["verdict"]["primary"]:
        return dict(config["verdict"]["primary"])
    if not config["segmentation"]["enabled"]:
        return {"task": "classification", "class": "all", "metric": "balanced_accuracy"}
    segmented = config["segmentation"]["classes"] or config["classes"]
    sources = {s for r in config["mixing"]["ratios"] for s in (r.get("sources") or config["mixing"]["sources"])}
    targets = {
        config["synthesis"][key]["target_class"]
        for mode, key in (("synth", "synthesize"), ("inpaint", "inpaint"))
        if mode in sources
    }
    name = next((c for c in config["classes"] if c in targets and c in segmented), segmented[0])
    return {"task": "segmentation", "class": name, "metric": "dice"}


def _effect_rows(
    runs: Mapping[tuple, tuple[np.ndarray, np.ndarray]],
    keys: Sequence[tuple],
    *,
    task: str,
    baseline: str,
    order: Sequence[str],
    settings: Mapping,
    pair_names: Sequence[str],
    unit: str,
) -> list[dict]:
    """Rows of one task: runs maps (ratio, *pair) to (full (K,), replicates (K, G)) for the (class, metric) keys."""
    rows = []
    base = {key[1:]: value for key, value in runs.items() if key[0] == baseline}
    for ratio in [r for r in order if r != baseline and any(k[0] == r for k in runs)]:
        pairs = sorted(set(base) & {k[1:] for k in runs if k[0] == ratio})
        for k, (name, metric) in enumerate(keys):
            full = np.array([[runs[(ratio, *p)][0][k], base[p][0][k]] for p in pairs]).reshape(-1, 2)
            reps = np.array([[runs[(ratio, *p)][1][k], base[p][1][k]] for p in pairs])
            usable = ~np.isnan(full).any(axis=1)
            full, reps = full[usable], reps[usable]
            if len(full) == 0:
                continue
            reps = reps[
                ..., ~np.isnan(reps).any(axis=(0, 1))
            ]  # units whose removal leaves the metric undefined stay in
            effect = {
                key: float(v)
                for key, v in paired_effect(
                    full[:, 0] - full[:, 1],
                    reps[:, 0] - reps[:, 1],
                    confidence=settings["confidence"],
                    power=settings["power"],
                ).items()
            }
            rows.append(
                {
                    "task": task,
                    "ratio": ratio,
                    "baseline": baseline,
                    "class": name,
                    "metric": metric,
                    "paired_by": " x ".join(pair_names),
                    "n": len(full),
                    "units": reps.shape[-1],
                    "unit": unit,
                    "mean_baseline": float(full[:, 1].mean()),
                    "mean_ratio": float(full[:, 0].mean()),
                    "mean_diff": effect["estimate"],
                    **{c: effect[c] for c in ("ci_low", "ci_high", "p", "t_low", "t_high", "p_t", "mde")},
                    "var_seed": effect["var_seed"],
                    "var_shared": effect["var_shared"],
                    "var_within": effect["var_within"],
                }
            )
    return rows


def segmentation_effects(
    images: pd.DataFrame, metrics: Sequence[str], *, baseline: str, order: Sequence[str], settings: Mapping, seed: int
) -> list[dict]:
    """Verdict rows of the segmentation per-image tables (ratio, seed, patch_id, slide, class, tp, fp, fn)."""
    unit, unit_name = jackknife_units(
        images, min_slides=settings["min_slides"], groups=settings["jackknife_groups"], seed=seed
    )
    classes = sorted(images["class"].unique())
    runs = {}
    for (ratio, run_seed), part in images.groupby(["ratio", "seed"], sort=False):
        scored = [segmentation_replicates(part, unit, metric) for metric in metrics]
        runs[(ratio, run_seed)] = (np.concatenate([f for f, _ in scored]), np.concatenate([r for _, r in scored]))
    keys = [(name, metric) for metric in metrics for name in classes]
    return _effect_rows(
        runs,
        keys,
        task="segmentation",
        baseline=baseline,
        order=order,
        settings=settings,
        pair_names=["seed"],
        unit=unit_name,
    )


def classification_effects(
    predictions: pd.DataFrame,
    class_names: Sequence[str],
    metrics: Sequence[str],
    *,
    baseline: str,
    order: Sequence[str],
    settings: Mapping,
    seed: int,
) -> list[dict]:
    """Verdict rows of the classification prediction tables (ratio, fold, seed, patch_id, slide, true, prob_<i>);
    per metric the macro value (class 'all') and, for f1 and auroc, one per class."""
    unit, unit_name = jackknife_units(
        predictions, min_slides=settings["min_slides"], groups=settings["jackknife_groups"], seed=seed
    )
    keys = [("all", m) for m in metrics] + [
        (c, m) for m in metrics if m in ("f1", "auroc") for c in range(len(class_names))
    ]
    runs = {
        key: classification_replicates(part, unit, len(class_names), keys)
        for key, part in predictions.groupby(["ratio", "fold", "seed"], sort=False)
    }
    named = [(class_names[c] if c != "all" else c, m) for c, m in keys]
    pair_names = ["fold", "seed"] if predictions["fold"].nunique() > 1 else ["seed"]
    if pair_names == ["seed"]:
        runs = {(ratio, run_seed): value for (ratio, _, run_seed), value in runs.items()}
    return _effect_rows(
        runs,
        named,
        task="classification",
        baseline=baseline,
        order=order,
        settings=settings,
        pair_names=pair_names,
        unit=unit_name,
    )


def decide(
    rows: Sequence[dict], primary: Mapping, settings: Mapping, sources: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """The verdict table (COLUMNS) of effect rows: primary or secondary, adjusted p within each
    family, the word, and the primary rows' planning for verdict.target_effect."""
    table = pd.DataFrame(list(rows), columns=[c for c in COLUMNS if c not in ("endpoint", "p_holm", "p_bh", "verdict")])
    is_primary = (
        (table["task"] == primary["task"])
        & (table["class"] == primary["class"])
        & (table["metric"] == primary["metric"])
    ).to_numpy()
    table["sources"] = [(sources or {}).get(r, "") for r in table["ratio"]]
    table["endpoint"] = np.where(is_primary, "primary", "secondary")
    alpha = 1 - settings["confidence"]
    for family in (is_primary, ~is_primary):
        table.loc[family, "p_holm"] = holm(table.loc[family, "p"].to_numpy(float))
        table.loc[family, "p_bh"] = benjamini_hochberg(table.loc[family, "p"].to_numpy(float))
    deciding = np.where(is_primary, table["p"], table[f"p_{settings['adjustment']}"]).astype(float)
    table["verdict"] = [word(d, p, alpha) for d, p in zip(table["mean_diff"], deciding, strict=True)]
    table["target_effect"] = np.where(is_primary, settings["target_effect"], np.nan)
    plans = [
        needed(
            {"seed": r.var_seed, "shared": r.var_shared, "within": r.var_within},
            settings["target_effect"],
            seeds=int(r.n),
            units=int(r.units),
            confidence=settings["confidence"],
            power=settings["power"],
            max_seeds=MAX_SEEDS,
            max_factor=MAX_UNITS_FACTOR,
        )
        if p and r.n >= 2
        else (math.nan, math.nan)
        for r, p in zip(table.itertuples(), is_primary, strict=True)
    ]
    table["seeds_needed"] = [s for s, _ in plans]
    table["units_needed"] = [f * u for (_, f), u in zip(plans, table["units"], strict=True)]
    order = np.argsort(~is_primary, kind="stable")
    return table.iloc[order].reset_index(drop=True)[list(COLUMNS)]


def word(difference: float, p: float, alpha: float) -> str:
    """helped (p < alpha, difference above 0), hurt (below 0) or no evidence (also without a p)."""
    if math.isnan(p) or p >= alpha:
        return "no evidence"
    return "helped" if difference > 0 else "hurt"


def verdict_table(
    *,
    images: pd.DataFrame | None,
    predictions: pd.DataFrame | None,
    class_names: Sequence[str],
    segmentation_metrics: Sequence[str],
    classification_metrics: Sequence[str],
    baseline: str,
    order: Sequence[str],
    settings: Mapping,
    primary: Mapping,
    seed: int,
    sources: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The verdict of both tasks' per-image tables (either may be None or empty)."""
    rows = []
    for task, table in (("segmentation", images), ("classification", predictions)):
        if table is not None and len(table) and not (table["ratio"] == baseline).any():
            raise ValueError(
                f"no {task} results for the baseline ratio {baseline!r}; ratios present: {sorted(table['ratio'].unique())}"
            )
    if images is not None and len(images):
        rows += segmentation_effects(
            images, segmentation_metrics, baseline=baseline, order=order, settings=settings, seed=seed
        )
    if predictions is not None and len(predictions):
        rows += classification_effects(
            predictions,
            class_names,
            classification_metrics,
            baseline=baseline,
            order=order,
            settings=settings,
            seed=seed,
        )
    return decide(rows, primary, settings, sources)


def effect(row: pd.Series | Mapping) -> str:
    """A verdict row's difference and interval in words, e.g. '-0.030 [-0.060, +0.000]'."""
    interval = f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" if not math.isnan(row["ci_low"]) else "(no interval)"
    return f"{row['mean_diff']:+.3f} {interval}"


def sentence(row: pd.Series | Mapping) -> str:
    """One verdict row in words, e.g. 'syn64 vs real, Blood vessel dice: -0.030 [-0.060, +0.000] over
    3 seeds and 120 test images: no evidence (p 0.210; detectable ±0.045)'."""
    runs = f"seed{'s' if row['n'] != 1 else ''}" if row["paired_by"] == "seed" else f"runs ({row['paired_by']})"
    p = (
        f"p {row['p']:.3f}"
        if row["endpoint"] == "primary"
        else f"p {row['p']:.3f}, Holm {row['p_holm']:.3f}, BH {row['p_bh']:.3f}"
    )
    return (
        f"{row['ratio']} vs {row['baseline']}, {row['class']} {row['metric']}: {effect(row)} over "
        f"{row['n']} {runs} and {row['units']} test {row['unit']}: {row['verdict']} ({p}; detectable ±{row['mde']:.3f})"
    )


def answer(table: pd.DataFrame) -> str:
    """The report's first sentence: the primary endpoint's answer per ratio, what the run could
    detect and what would detect the target effect."""
    rows = table[table["endpoint"] == "primary"]
    if rows.empty:
        return "No primary endpoint was scored (verdict.primary names a task, class or metric without results)."
    first = rows.iloc[0]
    name = f"{first['task']} {METRIC_NAMES.get(first['metric'], first['metric'].replace('_', ' '))}" + (
        f" of {first['class']}" if first["class"] != "all" else ""
    )
    parts = [f"{r['ratio']} {r['verdict']} ({effect(r)})" for r in rows.to_dict("records")]
    text = f"Did synthetic data help {name} against {first['baseline']}? " + "; ".join(parts) + "."
    if not math.isnan(rows["mde"].max()):
        text += f" This run could see a change of ±{rows['mde'].max():.3f} or more"
        plan = rows.loc[rows["mde"].idxmax()]
        target = plan["target_effect"]
        if plan["mde"] > target:
            ways = ([f"{int(plan['seeds_needed'])} seeds"] if not math.isnan(plan["seeds_needed"]) else []) + (
                [f"{int(plan['units_needed'])} test {plan['unit']} with {plan['n']} seeds"]
                if not math.isnan(plan["units_needed"])
                else []
            )
            text += (
                f"; to see ±{target:g} run " + " or ".join(ways)
                if ways
                else f"; ±{target:g} is out of reach of up to {MAX_SEEDS} seeds or {MAX_UNITS_FACTOR}x the test {plan['unit']}"
            )
        text += "."
    return text
