"""Pixel overlap scores of binary masks, the one implementation every stage uses: Dice, IoU,
precision and recall from true-positive, false-positive and false-negative pixel counts."""

from __future__ import annotations

import numpy as np


def overlap_counts(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """(tp, fp, fn) pixel counts of two boolean masks."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    return int(np.sum(truth & pred)), int(np.sum(~truth & pred)), int(np.sum(truth & ~pred))


def overlap_scores(tp, fp, fn, empty: float = np.nan) -> dict:
    """Dice 2tp / (2tp + fp + fn), IoU tp / (tp + fp + fn), precision tp / (tp + fp) and recall
    tp / (tp + fn) of counts (scalars give floats, arrays arrays); a ratio whose denominator is 0
    is `empty` (NaN: undefined; 1.0 suits 'both masks empty agree')."""
    tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))

    def ratio(num, den):
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, num / np.where(den > 0, den, 1), empty)
        return float(out) if out.ndim == 0 else out

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }
