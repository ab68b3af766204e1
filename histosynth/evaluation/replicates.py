"""A run's pooled test metrics rebuilt from its per-image table, on the whole test set and with each
test unit left out (the delete-one jackknife the verdict's interval needs).

Test units are the test slides when there are at least `min_slides` of them, else the test images;
with more units than `groups`, they are dealt at random (fixed by a seed) into that many groups
(the delete-a-group jackknife), and a group is the unit left out. Every run is cut into the same
units, so leaving one out keeps the pairing of seeds and arms.

Segmentation: Dice, precision and recall of a class from its TP/FP/FN pixels summed over the
images (histosynth.overlap), as rule evaluate_segmentation pools them. Classification: accuracy,
balanced accuracy (mean recall over the classes present), F1 (macro over the classes present in
the targets or the predictions; per class NaN unless present or predicted) and one-vs-rest AUROC
(the Mann-Whitney statistic, ties counting half; NaN without positives or negatives; macro over
the defined ones), as classification_metrics computes them with torchmetrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from histosynth.overlap import overlap_scores

SEGMENTATION_COUNTS = ("tp", "fp", "fn")


def jackknife_units(images: pd.DataFrame, *, min_slides: int, groups: int, seed: int) -> tuple[pd.Series, str]:
    """{image id: unit index} of a per-image table (columns patch_id, slide) and the units' name
    ('slides' or 'images'); more units than `groups` are dealt into `groups` groups at random."""
    table = images.drop_duplicates("patch_id").set_index("patch_id")
    by_slide = table["slide"].nunique() >= min_slides
    names = table["slide"] if by_slide else pd.Series(table.index, index=table.index)
    units = sorted(set(names))
    index = {u: i for i, u in enumerate(units)}
    unit = names.map(index).astype(int)
    if len(units) > groups:
        deal = np.random.default_rng(seed).permutation(len(units)) % groups
        unit = unit.map(dict(enumerate(deal))).astype(int)
    return unit, "slides" if by_slide else "images"


def segmentation_replicates(images: pd.DataFrame, unit: pd.Series, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(full, replicates) of one run's per-image counts (columns patch_id, class, tp, fp, fn): the
    metric per class on all units (C,) and with each unit left out (C, G), classes sorted by name."""
    n_units = int(unit.max()) + 1
    table = images.assign(unit=images["patch_id"].map(unit).to_numpy())
    sums = table.groupby(["class", "unit"])[list(SEGMENTATION_COUNTS)].sum()
    classes = sorted(table["class"].unique())
    cube = np.zeros((len(classes), n_units, 3))
    for (name, u), row in zip(sums.index, sums.to_numpy(), strict=True):
        cube[classes.index(name), u] = row
    total = cube.sum(axis=1)
    left_out = total[:, None, :] - cube
    full = overlap_scores(*total.T)[metric]
    return np.asarray(full, float), np.asarray(overlap_scores(*np.moveaxis(left_out, -1, 0))[metric], float)


def confusion(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows the true class, columns the predicted one."""
    return np.bincount(true * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def auroc(true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC per class (C,) of class indices (n,) and probabilities (n, C); NaN without positives or negatives."""
    from scipy.stats import rankdata

    n, n_classes = probs.shape
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        positive = true == c
        n_pos = int(positive.sum())
        if 0 < n_pos < n:
            ranks = rankdata(probs[:, c])
            out[c] = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))
    return out


def classification_scores(true: np.ndarray, probs: np.ndarray) -> dict[tuple[str, str], float]:
    """{(class index or 'all', metric): value} of class indices (n,) and probabilities (n, C)."""
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    matrix = confusion(true, pred, n_classes)
    tp, support, predicted = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    present, either = support > 0, (support > 0) | (predicted > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / np.maximum(support, 1), np.nan)
        f1 = np.where(either, 2 * tp / np.maximum(support + predicted, 1), np.nan)
    roc = auroc(true, probs)
    out = {
        ("all", "accuracy"): float(tp.sum() / max(len(true), 1)),
        ("all", "balanced_accuracy"): _nanmean(recall),
        ("all", "f1"): _nanmean(f1),
        ("all", "auroc"): _nanmean(roc),
    }
    for c in range(n_classes):
        out[(c, "f1")], out[(c, "auroc")] = float(f1[c]), float(roc[c])
    return out


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def classification_replicates(
    predictions: pd.DataFrame, unit: pd.Series, n_classes: int, keys: Sequence[tuple]
) -> tuple[np.ndarray, np.ndarray]:
    """(full (K,), replicates (K, G)) of one run's predictions (columns patch_id, true, prob_<i>) for
    the (class index or 'all', metric) keys: on every image and with each unit left out."""
    true = predictions["true"].to_numpy(int)
    probs = predictions[[f"prob_{i}" for i in range(n_classes)]].to_numpy(float)
    units = predictions["patch_id"].map(unit).to_numpy()
    n_units = int(unit.max()) + 1

    def scores(keep: np.ndarray) -> list[float]:
        values = classification_scores(true[keep], probs[keep])
        return [values[k] for k in keys]

    full = np.asarray(scores(np.ones(len(true), bool)))
    return full, np.asarray([scores(units != u) for u in range(n_units)]).T.reshape(len(keys), n_units)
