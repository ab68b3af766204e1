"""The report's tables: every task and quality metric in one tidy table, and the mean, sd and
count over runs that the task plots draw."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from histosynth.evaluation.figures import ratio_order

SEGMENTATION_METRICS = ("dice", "precision", "recall")
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc")  # the verdict's and the plot's
QUALITY_METRICS = ("fd", "kd", "feature_diversity", "fid", "kid", "is", "lpips_diversity")
TABLE_COLUMNS = (
    "kind",
    "ratio",
    "fold",
    "seed",
    "slide",
    "set",
    "class",
    "metric",
    "value",
    "status",
    "note",
    "extractor",
)


def read_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    tables = [pd.read_parquet(p) for p in paths]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def metrics_table(
    segmentation: pd.DataFrame, quality: pd.DataFrame | None = None, classification: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One tidy table: task rows (kind 'segmentation' or 'classification': ratio, fold, seed,
    slide or 'all', class, metric, value) and image-quality rows (kind 'quality': set, class,
    metric, value, status, note)."""
    parts = []
    for kind, scores in (("segmentation", segmentation), ("classification", classification)):
        if scores is not None and len(scores):
            task = scores.assign(kind=kind, set=None, status="ok", note="")
            task.loc[task["value"].isna(), "status"] = "nan"
            parts.append(task.reindex(columns=TABLE_COLUMNS))
    if quality is not None and len(quality):
        parts.append(quality.assign(kind="quality", ratio=None, seed=None, slide=None).reindex(columns=TABLE_COLUMNS))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TABLE_COLUMNS)


def seed_summary(scores: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, sd and count over runs (seeds, and folds where there are) of the pooled ('all')
    scores per task, ratio, class and metric."""
    pooled = scores[scores["slide"] == "all"]
    if "task" not in pooled:
        pooled = pooled.assign(task="segmentation")
    out = (
        pooled.groupby(["task", "ratio", "class", "metric"], sort=False)["value"]
        .agg(mean="mean", sd=lambda v: v.std(ddof=1) if v.notna().sum() > 1 else math.nan, n="count")
        .reset_index()
    )
    if order:
        out["ratio"] = pd.Categorical(out["ratio"], categories=ratio_order(out["ratio"], order), ordered=True)
        out = out.sort_values(["task", "ratio", "class", "metric"], kind="stable").reset_index(drop=True)
        out["ratio"] = out["ratio"].astype(str)
    return out
