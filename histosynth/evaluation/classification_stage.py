"""Rules train_classifier and evaluate_classifier: the rows a run trains, validates and is tested on.

With `folds: 1` the training set is the ratio's manifest and the val slides validate; with k folds
(slide-grouped and stratified, fold_assignment) fold f's slides validate and the other folds' real
patches plus the ratio's synthetic images train. Training and evaluation are
histosynth.evaluation.classification's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.config import section_defaults
from histosynth.data.io import read_patch_index, write_table
from histosynth.data.labels import patch_labels
from histosynth.evaluation.classification import evaluate, train
from histosynth.evaluation.classifier import ClassificationError, load_classifier
from histosynth.seeds import derive_seed

log = logging.getLogger(__name__)


def fold_assignment(rows: pd.DataFrame, k: int, seed: int) -> dict[str, int]:
    """{slide: fold} for k folds over patch rows (columns slide and class): scikit-learn's
    StratifiedGroupKFold (shuffled by seed), so no slide is in two folds and every fold's class
    mix is as close to the whole's as whole slides allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    slides = rows["slide"].astype(str).to_numpy()
    n_slides = len(set(slides))
    if n_slides < k:
        raise ClassificationError(
            f"classification.folds={k} needs at least {k} slides among the train and val slides, "
            f"found {n_slides}; lower classification.folds or give more slides split train or val"
        )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
    assignment = {}
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(rows)), rows["class"].astype(str).to_numpy(), slides)):
        assignment.update(dict.fromkeys(slides[held].tolist(), fold))
    return dict(sorted(assignment.items()))


def labelled_rows(indexes: Sequence[str | Path], labels: Mapping, splits: Sequence[str]) -> pd.DataFrame:
    """Rows of the given splits of the patch indexes, paths absolute, with `class` (patch_labels)
    and `source` 'real'."""
    tables = [read_patch_index(p) for p in indexes]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["split"])
    table = table[table["split"].isin(list(splits))].reset_index(drop=True)
    return table.assign(**{"class": patch_labels(table, labels) if len(table) else [], "source": "real"})


def training_sets(
    manifest: pd.DataFrame, real: pd.DataFrame, *, folds: int, fold: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val) rows of one run. folds 1: the manifest trains and the real rows of split val
    validate. folds k >= 2: the real rows (splits train and val) are split by fold_assignment
    (shuffled by seed); fold `fold`'s slides validate and the manifest's synthetic rows plus the
    other folds' real rows train (so the manifest's own real rows are replaced), except synthetic
    images made from a validating slide's maps, which would let early stopping see near-copies of
    its own patches."""
    if not 0 <= fold < folds:
        raise ClassificationError(f"fold {fold} is not one of classification.folds={folds} (0 to {folds - 1})")
    if folds == 1:
        return manifest, real[real["split"] == "val"].reset_index(drop=True)
    assignment = fold_assignment(real, folds, seed)
    held = real["slide"].astype(str).map(assignment).to_numpy() == fold
    if not held.any():
        raise ClassificationError(f"fold {fold} of {folds} has no slide; lower classification.folds")
    synthetic = manifest[manifest["source"] == "synthetic"]
    validating = set(real.loc[held, "slide"].astype(str))
    from_validating = synthetic["source_slide"].astype(str).isin(validating)
    if from_validating.any():
        log.info(
            "fold %d: %d of %d synthetic images come from its validation slides' maps and are left out of training",
            fold,
            int(from_validating.sum()),
            len(synthetic),
        )
    train_rows = pd.concat([real[~held], synthetic[~from_validating]], ignore_index=True)
    return train_rows, real[held].reset_index(drop=True)


def train_classifier(
    manifest: str | Path, indexes: Sequence[str | Path], out_dir: str | Path, *, config: Mapping, seed: int, fold: int
) -> dict:
    """Entry of rule train_classifier: one run on a ratio's manifest (its `class` column holds the
    label names) and the train/val patch indexes; config holds sections classification, labels
    (resolved, histosynth.data.labels.resolve_labels), seed (the master seed, which fixes the
    folds) and weights_dir."""
    from histosynth.evaluation.mixing import read_mix

    s, labels = section_defaults("classification", config["classification"]), config["labels"]
    mixed = read_mix(manifest)
    if "class" not in mixed:
        raise ClassificationError(f"{manifest} has no `class` column (the label of every row); rerun rule mix_dataset")
    real = labelled_rows(indexes, labels, ("train", "val"))
    train_rows, val_rows = training_sets(
        mixed, real, folds=int(s["folds"]), fold=int(fold), seed=derive_seed(config["seed"], "classification", "folds")
    )
    return train(
        train_rows, val_rows, labels["classes"], out_dir, settings=s, seed=seed, weights_dir=config["weights_dir"]
    )


def evaluate_classifier(
    run_dir: str | Path,
    indexes: Sequence[str | Path],
    metrics_out: str | Path,
    predictions_out: str | Path,
    *,
    config: Mapping,
    ratio: str,
    fold: int,
    seed: int,
) -> pd.DataFrame:
    """Entry of rule evaluate_classifier: score one run on the test slides; write the tidy metrics
    (columns task, ratio, seed, fold, slide, class, metric, value) and the predictions (ratio,
    seed, fold and evaluate's columns) as parquet."""
    s, labels = section_defaults("classification", config["classification"]), config["labels"]
    model = load_classifier(run_dir, s["device"])
    metrics, predictions = evaluate(
        model, labelled_rows(indexes, labels, ("test",)), labels["classes"], batch_size=s["batch_size"]
    )
    for table in (metrics, predictions):
        for name, value in (("fold", fold), ("seed", seed), ("ratio", ratio)):
            table.insert(0, name, value)
    metrics.insert(0, "task", "classification")
    write_table(metrics, metrics_out)
    write_table(predictions, predictions_out)
    return metrics
