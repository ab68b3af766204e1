"""Classification: a timm image classifier (EfficientNet-B0 by default) trained on one mixed
training set, fold and seed, and its evaluation on the held-out slides (seeds 003 and 004).

Model (histosynth.evaluation.classifier): the timm backbone's globally pooled features (num_classes=0), then BatchNorm, dropout and
a linear layer to one logit per class (seed 004's GAP -> BN -> dropout 0.2 -> dense softmax);
`freeze` trains the head alone, the backbone fixed and its BatchNorm statistics too. ImageNet
weights are read offline only (classifier_weights_file), else the network starts at random. The
initial weights depend on the seed alone (not on the ratio or fold's data), so same-seed runs of
different ratios start from the same network and can be compared pairwise; data order and
augmentation (the 8 flips/rotations) are fixed by (seed, epoch).

Training: cross-entropy (optionally weighted by inverse training-class frequency), Adam, early
stopping on the validation loss (`patience` epochs without improvement; the one epoch loop of
histosynth.training.epochs), the best-validation model kept. Before each validation the
BatchNorm statistics are recomputed at the epoch's weights (recalibrate_batchnorm), so the
validated and the saved model are scored with statistics of their own weights. Which rows train
and validate (the slide-grouped folds) is histosynth.evaluation.classification_stage's, with the
rule entries.

Metrics (histosynth.evaluation.classification_metrics, all higher-is-better) on the test slides: accuracy, balanced
accuracy (= macro recall), macro precision, recall and F1 (class 'all'), F1 per class, and
one-vs-rest AUROC per class and macro. A class absent from the test targets has NaN recall, F1
(unless it was predicted: then 0) and AUROC, and the macro recall, balanced accuracy and AUROC
average the classes present; macro precision and F1 average the classes present in the targets
or the predictions (torchmetrics' rule, a never-predicted present class counting 0 precision).

A run folder holds model/ (model.safetensors + histosynth.json with class names, timm model,
image size, dropout, normalisation, seed and best epoch), loss.csv (one row per epoch: step,
epoch, train_loss, val_loss, val_accuracy, lr, seconds) and summary.json.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from histosynth.config import section_defaults
from histosynth.data.io import write_csv
from histosynth.device import autocast, channels_last, pick_device, prepare_model
from histosynth.evaluation.classification_metrics import classification_metrics
from histosynth.evaluation.classifier import (
    ClassificationDataset,
    ClassificationError,
    ClassifierModel,
    class_targets,
    initial_model,
    normalisation,
    save_classifier,
)
from histosynth.files import atomic_dir
from histosynth.nets import dihedral, random_ops
from histosynth.seeds import derive_seed
from histosynth.training.epochs import data_loader, fit_epochs

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("step", "epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds")
PRECISE_BN_IMAGES = 256  # training images the BatchNorm statistics are recomputed on before each validation


# ----------------------------------------------------------------------------- data


def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """Cross-entropy class weights n / (k * n_c) for the k classes present among the n training
    targets (inverse frequency, scikit-learn's 'balanced': the mean weight per image is 1); 0 for
    a class without training images."""
    counts = np.bincount(np.asarray(targets, np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


# ----------------------------------------------------------------------------- training


def recalibrate_batchnorm(net: torch.nn.Module, loader, device, max_images: int = PRECISE_BN_IMAGES) -> None:
    """Recompute the running statistics of the BatchNorm layers that train (not a frozen
    backbone's) as plain averages over up to max_images training images at the current weights
    ("precise BN"). The running averages training keeps lag behind weights that still change fast:
    a network trained from random init for a few epochs otherwise predicts one class in eval mode."""
    net.train()
    layers = [
        m
        for m in net.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    seen = 0
    with torch.no_grad():
        for images, _ in loader:
            x = images.to(device)
            x = channels_last(x)
            with autocast(device):
                net(x)
            seen += len(x)
            if seen >= max_images:
                break
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    net.eval()


def _validate(net, loader, weight: torch.Tensor | None, device) -> tuple[float, float]:
    """The (class-weighted) mean cross-entropy over a loader, as training's loss averages it, and the accuracy."""
    net.eval()
    total, norm, correct, count = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            x, y = batch["image"].to(device), batch["target"].to(device)
            x = channels_last(x)
            with autocast(device):
                logits = net(x).float()
            total += float(F.cross_entropy(logits, y, weight=weight, reduction="sum"))
            norm += float(weight[y].sum()) if weight is not None else len(y)
            correct, count = correct + int((logits.argmax(1) == y).sum()), count + len(y)
    return total / norm if norm else math.nan, correct / max(count, 1)


def train(
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    settings: Mapping,
    seed: int,
    weights_dir: str | Path,
    progress: bool = True,
) -> dict:
    """Train one classifier on rows with an absolute `image` path and a `class` label name, and
    write the run folder out_dir (model/, loss.csv, summary.json) atomically; return the summary.
    `settings` override the `classification` section's defaults; the ImageNet file is looked up
    in weights_dir."""
    s = section_defaults("classification", settings)
    names = list(class_names)
    if len(names) < 2:
        raise ClassificationError(f"classification needs at least two classes, got {names}")
    if int(s["batch_size"]) < 2:
        raise ClassificationError(
            f"classification.batch_size={s['batch_size']}: the head's BatchNorm needs batches of 2 or more"
        )
    if len(train_rows) < 2:
        raise ClassificationError(
            f"{len(train_rows)} training images: the head's BatchNorm needs at least 2; check rule mix_dataset's output"
        )
    for table, what in ((train_rows, "training"), (val_rows, "validation")):
        if len(table) and "class" not in table:
            raise ClassificationError(f"the {what} rows have no `class` column (the label names)")
    device = pick_device(s["device"])
    net, note = initial_model(s, len(names), seed, weights_dir)
    mean, std = normalisation(net)
    net = prepare_model(net, device)
    train_set = ClassificationDataset(train_rows, names, s["image_size"], mean, std)
    weight = class_weights(train_set.targets, len(names)).to(device) if s["class_weighted"] else None
    counts = np.bincount(train_set.targets, minlength=len(names))
    if s["class_weighted"]:
        log.info("class weights %s", dict(zip(names, weight.tolist(), strict=True)))
    if (counts == 0).any():
        log.warning("classes without training images: %s", [n for n, c in zip(names, counts, strict=True) if c == 0])
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    optimizer = torch.optim.Adam(
        [p for p in net.parameters() if p.requires_grad], lr=float(s["lr"]), weight_decay=float(s["weight_decay"])
    )
    val_loader = (
        data_loader(
            ClassificationDataset(val_rows, names, s["image_size"], mean, std), s["batch_size"], None, s["num_workers"]
        )
        if len(val_rows)
        else None
    )
    drop_last = len(train_set) % int(s["batch_size"]) == 1  # a batch of one breaks the head's BatchNorm

    def batches(epoch: int):
        augment = torch.Generator().manual_seed(derive_seed(seed, "classification", "augment", epoch))
        for batch in data_loader(
            train_set,
            s["batch_size"],
            derive_seed(seed, "classification", "epoch", epoch),
            s["num_workers"],
            drop_last=drop_last,
        ):
            yield (
                dihedral(batch["image"], random_ops(len(batch["image"]), augment)) if s["augment"] else batch["image"],
                batch["target"],
            )

    def batch_loss(batch) -> tuple[torch.Tensor, int]:
        x, y = batch[0].to(device), batch[1].to(device)
        x = channels_last(x)
        with autocast(device):
            logits = net(x)
        return loss_fn(logits.float(), y), len(x)

    def calibration_batches():
        loader = data_loader(
            train_set,
            s["batch_size"],
            derive_seed(seed, "classification", "batchnorm"),
            s["num_workers"],
            drop_last=drop_last,
        )
        return ((b["image"], b["target"]) for b in loader)

    def validate() -> tuple[float, float]:
        recalibrate_batchnorm(net, calibration_batches(), device)
        return _validate(net, val_loader, weight, device)

    fitted = fit_epochs(
        net,
        optimizer,
        batches,
        batch_loss,
        validate if val_loader else None,
        epochs=s["epochs"],
        patience=s["patience"],
        score="accuracy",
        section="classification",
        error=ClassificationError,
        progress=progress,
    )
    if val_loader is None:  # the last epoch's model is kept, with statistics of its own weights
        recalibrate_batchnorm(net, calibration_batches(), device)
    summary = {
        "seed": seed,
        "model": s["model"],
        "epochs_run": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "best_val_loss": fitted.best_val_loss,
        "n_train": len(train_rows),
        "n_val": len(val_rows),
        "train_class_counts": dict(zip(names, counts.tolist(), strict=True)),
    }
    if "source" in train_rows:
        summary["n_train_real"] = int((train_rows["source"] == "real").sum())
        summary["n_train_synthetic"] = int((train_rows["source"] == "synthetic").sum())
    summary.update(
        {
            "seconds": fitted.seconds,
            "seconds_per_epoch": fitted.seconds / max(len(fitted.history), 1),
            "device": str(device),
            "weights": note,
        }
    )
    with atomic_dir(out_dir) as tmp:
        save_classifier(net, tmp / "model", names, s, {"seed": seed, "best_epoch": fitted.best_epoch})
        write_csv(pd.DataFrame(fitted.history, columns=LOSS_COLUMNS), tmp / "loss.csv")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ----------------------------------------------------------------------------- metrics


def evaluate(
    model: ClassifierModel, rows: pd.DataFrame, class_names: Sequence[str], *, batch_size: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores on test rows (absolute `image` paths, `class` label names) pooled over their slides:
    (tidy metrics with columns slide ('all'), class, metric, value; predictions with columns
    patch_id (the image path where rows have none), slide, true and pred (class indices), prob_<i>
    (the probability of class_names[i]))."""
    if list(class_names) != model.class_names:
        raise ClassificationError(
            f"the classes {list(class_names)} differ from the model's {model.class_names} "
            "(names or order); retrain with the run's labels"
        )
    if rows.empty:
        raise ClassificationError("no test rows: no slide has split 'test'; set one in the slide sheet")
    target = class_targets(rows["class"], class_names)
    probs = model.predict_proba(rows, batch_size)
    metrics = classification_metrics(target, probs, class_names)
    metrics.insert(0, "slide", "all")
    predictions = pd.DataFrame(
        {
            "patch_id": rows["patch_id"].astype(str).to_numpy()
            if "patch_id" in rows
            else rows["image"].astype(str).to_numpy(),
            "slide": rows["slide"].astype(str).to_numpy() if "slide" in rows else "all",
            "true": target,
            "pred": probs.argmax(1),
            **{f"prob_{i}": probs[:, i] for i in range(len(class_names))},
        }
    )
    return metrics, predictions
