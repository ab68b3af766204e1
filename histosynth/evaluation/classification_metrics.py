"""The classification task's test metrics (all higher-is-better) and its confusion matrix."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from histosynth.evaluation.classifier import ClassificationError

METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc")  # every one higher-is-better


def classification_metrics(target: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Tidy (class, metric, value) scores of class probabilities (n, C) against class indices (n,):
    accuracy, balanced_accuracy, macro precision/recall/f1 and macro auroc under class 'all', f1
    and one-vs-rest auroc per class; NaN where a class is absent (see the module docstring)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    n = len(class_names)
    t = torch.as_tensor(np.asarray(target), dtype=torch.long)
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    if p.shape != (len(t), n):
        raise ClassificationError(f"probabilities of shape {tuple(p.shape)} for {len(t)} targets and {n} classes")
    pred = p.argmax(1)
    support = torch.bincount(t, minlength=n)
    present = support > 0
    predicted = torch.bincount(pred, minlength=n) > 0
    recall = torch.where(present, multiclass_recall(pred, t, n, average="none"), torch.nan)
    f1 = torch.where(present | predicted, multiclass_f1_score(pred, t, n, average="none"), torch.nan)
    # one-vs-rest AUROC needs positives and negatives of the class
    with warnings.catch_warnings():  # torchmetrics warns of the classes without positives, which are NaN here
        warnings.filterwarnings("ignore", message="No positive samples in targets")
        auroc = torch.where(present & (support < len(t)), multiclass_auroc(p, t, n, average="none"), torch.nan)
    pooled = {
        "accuracy": multiclass_accuracy(pred, t, n, average="micro"),
        "balanced_accuracy": recall.nanmean(),
        "precision": multiclass_precision(pred, t, n, average="macro"),
        "recall": recall.nanmean(),
        "f1": multiclass_f1_score(pred, t, n, average="macro"),
        "auroc": auroc.nanmean(),
    }
    rows = [{"class": "all", "metric": m, "value": float(v)} for m, v in pooled.items()]
    for metric, values in (("f1", f1), ("auroc", auroc)):
        rows += [
            {"class": name, "metric": metric, "value": float(v)} for name, v in zip(class_names, values, strict=True)
        ]
    return pd.DataFrame(rows)


def confusion(target: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows the true class, columns the predicted one."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    t, p = torch.as_tensor(np.asarray(target), dtype=torch.long), torch.as_tensor(np.asarray(pred), dtype=torch.long)
    return multiclass_confusion_matrix(p, t, n_classes).numpy()
