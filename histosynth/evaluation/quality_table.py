"""The quality table's columns and rows, each image's label, and the seeded sample of a set the quality rules score."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from histosynth.data.labels import patch_labels

COLUMNS = ("set", "metric", "class", "value", "n_real", "n_synthetic", "status", "note", "extractor")


def image_classes(table: pd.DataFrame, labels: Mapping) -> np.ndarray:
    """Label per row (histosynth.data.labels): a synthetic manifest's `class`, else the patch's
    label (the sheet's, or its dominant region class)."""
    return table["class"].astype(str).to_numpy() if "class" in table else patch_labels(table, labels)


def quality_row(
    set_name: str, metric: str, name: str, value, n_real: int, n_synthetic: int, status="ok", note="", extractor=""
) -> dict:
    """One row of the quality table (COLUMNS)."""
    return dict(
        zip(COLUMNS, (set_name, metric, name, value, n_real, n_synthetic, status, note, extractor), strict=True)
    )


def sample_rows(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most n rows of table, drawn without replacement by seed, in their order."""
    if len(table) <= n:
        return table.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(seed).choice(len(table), n, replace=False))
    return table.iloc[keep].reset_index(drop=True)
