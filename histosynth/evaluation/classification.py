"""Classification: a timm image classifier (EfficientNet-B0 by default) trained on one mixed
training set, fold and seed, and its evaluation on the held-out slides (seeds 003 and 004).

Model: the timm backbone's globally pooled features (num_classes=0), then BatchNorm, dropout and
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
validated and the saved model are scored with statistics of their own weights. With `folds: 1` the training set
is the ratio's manifest and the val slides validate; with k folds (slide-grouped and stratified,
fold_assignment) fold f's slides validate and the other folds' real patches plus the ratio's
synthetic images train.

Metrics (classification_metrics, all higher-is-better) on the test slides: accuracy, balanced
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

import copy
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from histosynth.config import section_defaults
from histosynth.data.io import atomic_dir, read_patch_index, read_rgb, write_csv, write_table
from histosynth.data.labels import label_index, patch_labels
from histosynth.device import autocast, pick_device, prepare_model
from histosynth.nets import IMAGENET_MEAN, IMAGENET_STD, dihedral, normalise, random_ops
from histosynth.seeds import derive_seed, seed_everything
from histosynth.training.epochs import data_loader, fit_epochs, read_model_folder
from histosynth.weights import classifier_spec, read_state_dict, weights_file

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("step", "epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds")
METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc")  # every one higher-is-better
PRECISE_BN_IMAGES = 256  # training images the BatchNorm statistics are recomputed on before each validation


class ClassificationError(RuntimeError):
    """A classification run that cannot start: empty data, unknown labels, bad weights or folds."""


# ----------------------------------------------------------------------------- data

def class_targets(names: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Class indices (positions in class_names) of label names; an error naming unknown ones."""
    return label_index(names, {"classes": list(class_names)})


def prepare(images: torch.Tensor, image_size: int | None, mean: Sequence[float] = IMAGENET_MEAN,
            std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the network's float input: normalised (mean/std), resized to
    image_size x image_size (bilinear, antialiased) when set and different."""
    x = normalise(images, mean, std)
    if image_size and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


class ClassificationDataset(Dataset):
    """Items {'image': (3, H, W) float32 network input (prepare), 'target': int64 class index (-1
    without a `class` column), 'index': int} of rows with an absolute `image` path."""

    def __init__(self, table: pd.DataFrame, class_names: Sequence[str], image_size: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.images = table["image"].tolist()
        self.targets = class_targets(table["class"], class_names) if "class" in table else np.full(len(table), -1)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(read_rgb(self.images[i]).transpose(2, 0, 1).copy())
        return {"image": prepare(image[None], self.image_size, self.mean, self.std)[0],
                "target": torch.tensor(int(self.targets[i])), "index": i}


def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """Cross-entropy class weights n / (k * n_c) for the k classes present among the n training
    targets (inverse frequency, scikit-learn's 'balanced': the mean weight per image is 1); 0 for
    a class without training images."""
    counts = np.bincount(np.asarray(targets, np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def fold_assignment(rows: pd.DataFrame, k: int, seed: int) -> dict[str, int]:
    """{slide: fold} for k folds over patch rows (columns slide and class): scikit-learn's
    StratifiedGroupKFold (shuffled by seed), so no slide is in two folds and every fold's class
    mix is as close to the whole's as whole slides allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    slides = rows["slide"].astype(str).to_numpy()
    n_slides = len(set(slides))
    if n_slides < k:
        raise ClassificationError(f"classification.folds={k} needs at least {k} slides among the train and val slides, "
                                  f"found {n_slides}; lower classification.folds or give more slides split train or val")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
    assignment = {}
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(rows)), rows["class"].astype(str).to_numpy(), slides)):
        assignment.update(dict.fromkeys(slides[held].tolist(), fold))
    return dict(sorted(assignment.items()))


# ----------------------------------------------------------------------------- model

class Classifier(torch.nn.Module):
    """A timm backbone's pooled features -> BatchNorm1d -> Dropout -> Linear (one logit per class)."""

    def __init__(self, model: str, n_classes: int, dropout: float = 0.2, freeze: bool = False):
        super().__init__()
        import timm

        try:
            self.backbone = timm.create_model(model, pretrained=False, num_classes=0)
        except RuntimeError as err:
            raise ClassificationError(f"classification.model={model!r} is not a timm model name ({err})") from err
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features  # pooled width
        self.head = torch.nn.Sequential(torch.nn.BatchNorm1d(features), torch.nn.Dropout(dropout),
                                        torch.nn.Linear(features, n_classes))
        self.frozen = bool(freeze)
        self.backbone.requires_grad_(not self.frozen)

    def train(self, mode: bool = True):
        """As nn.Module.train, except that a frozen backbone stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(settings: Mapping, n_classes: int) -> Classifier:
    """The classifier of the `classification` settings with random weights (timm never downloads here)."""
    return Classifier(settings["model"], n_classes, float(settings["dropout"]), bool(settings["freeze"]))


def normalisation(net: Classifier) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std of the timm model's pretrained config (ImageNet's unless it says otherwise)."""
    cfg = getattr(net.backbone, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def hub_cache_file(model: str) -> Path | None:
    """The timm model's pretrained file in the local Hugging Face cache, if it is there (looked up
    on disk only, huggingface_hub.try_to_load_from_cache: never the network)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def classifier_weights_file(settings: Mapping, weights_dir: str | Path) -> tuple[Path | None, str]:
    """The timm state-dict file to start the backbone from and a line saying what was chosen: the
    configured weights_path (which must exist), else (pretrained) weights_dir/timm-<model>.safetensors
    (histosynth.weights; `snakemake fetch_weights` puts it there), else timm's file in the local
    Hugging Face cache, else None (random init) with how to provide it."""
    model, configured = settings["model"], settings["weights_path"]
    if configured and not Path(configured).is_file():
        raise ClassificationError(f"classification.weights_path={configured} does not exist")
    if configured:
        return Path(configured), f"classifier {model}: weights from {configured}"
    if not settings["pretrained"]:
        return None, f"classifier {model}: random init (classification.pretrained is false)"
    spec = classifier_spec(model)
    if spec is None:
        return None, (f"classifier {model}: timm has no ImageNet weights for it on the Hugging Face Hub; random init. "
                      "To start from pretrained weights, save a state dict of the timm model to a file and set "
                      "classification.weights_path to it")
    path, note = weights_file(spec, None, weights_dir)
    if path is not None:
        return path, f"classifier {model}: ImageNet {note}"
    cached = hub_cache_file(model)
    if cached is not None:
        return cached, f"classifier {model}: ImageNet weights {cached} (local Hugging Face cache)"
    return None, (f"{note}, or on a machine with network run `python -c \"import timm; timm.create_model('{model}', "
                  "pretrained=True)\"` and copy its Hugging Face cache (~/.cache/huggingface/hub) to the same place here; "
                  "random init")


def load_backbone_weights(net: Classifier, path: str | Path) -> None:
    """Load a timm state dict (or a histosynth classifier's, keys under backbone.) into the
    backbone: every backbone tensor must be in the file; the file's classifier head is ignored."""
    state = {k.removeprefix("backbone."): v for k, v in read_state_dict(path).items()}
    try:
        missing, unused = net.backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise ClassificationError(f"{path} does not fit timm model {type(net.backbone).__name__}: {err}") from err
    if missing:
        raise ClassificationError(f"{path} does not fit the timm backbone {type(net.backbone).__name__}: {len(missing)} "
                                  f"of its tensors are missing, e.g. {missing[:3]}; it must be that timm model's state dict")
    log.info("loaded the backbone's %d tensors from %s (%d in the file unused: its classifier head)",
             len(net.backbone.state_dict()), path, len(unused))


def initial_model(settings: Mapping, n_classes: int, seed: int, weights_dir: str | Path) -> tuple[Classifier, str]:
    """The network a run starts from, fixed by the seed alone (and the weights file), and the weights note."""
    weights, note = classifier_weights_file(settings, weights_dir)
    log.info(note)
    seed_everything(derive_seed(seed, "classification", "init"))
    net = build_classifier(settings, n_classes)
    if weights is not None:
        load_backbone_weights(net, weights)
    return net, note


@dataclass
class ClassifierModel:
    """A trained classifier with what is needed to apply it."""

    net: Classifier
    class_names: list[str]
    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    source: Path | None = None  # the model folder it was loaded from

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor | np.ndarray | pd.DataFrame, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, C) of uint8 images (N, 3, H, W), or of rows with an absolute `image` path."""
        self.net.eval()
        if isinstance(images, pd.DataFrame):
            dataset = ClassificationDataset(images, self.class_names, self.image_size, self.mean, self.std)
            batches = (b["image"] for b in data_loader(dataset, batch_size, None, 0))
        else:
            images = torch.as_tensor(images)
            batches = (prepare(images[i:i + batch_size], self.image_size, self.mean, self.std)
                       for i in range(0, len(images), batch_size))
        out = [self._softmax(x) for x in batches]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.class_names)), np.float32)

    def _softmax(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            return torch.softmax(self.net(x).float(), 1).cpu()


def save_classifier(net: Classifier, directory: Path, class_names: Sequence[str], settings: Mapping, extra: Mapping) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    net = copy.deepcopy(net).cpu().to(memory_format=torch.contiguous_format)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / "model.safetensors"))
    mean, std = normalisation(net)
    meta = {"class_names": list(class_names), "model": settings["model"], "image_size": settings["image_size"],
            "dropout": settings["dropout"], "normalisation": {"mean": mean, "std": std, "input": "RGB uint8 / 255"},
            "settings": dict(settings), **extra}
    (directory / "histosynth.json").write_text(json.dumps(meta, indent=2, default=str))


def load_classifier(directory: str | Path, device: str | torch.device = "auto") -> ClassifierModel:
    """Load a run's model/ folder (or the run folder holding it)."""
    from safetensors.torch import load_file

    directory, meta = read_model_folder(directory, "classifier", "train_classifier", ClassificationError)
    net = Classifier(meta["model"], len(meta["class_names"]), float(meta["dropout"]))
    net.load_state_dict(load_file(str(directory / "model.safetensors")))
    device = device if isinstance(device, torch.device) else pick_device(device)
    norm = meta["normalisation"]
    return ClassifierModel(prepare_model(net.eval(), device), list(meta["class_names"]), meta["image_size"],
                           tuple(norm["mean"]), tuple(norm["std"]), device, directory)


# ----------------------------------------------------------------------------- training

def recalibrate_batchnorm(net: torch.nn.Module, loader, device, max_images: int = PRECISE_BN_IMAGES) -> None:
    """Recompute the running statistics of the BatchNorm layers that train (not a frozen
    backbone's) as plain averages over up to max_images training images at the current weights
    ("precise BN"). The running averages training keeps lag behind weights that still change fast:
    a network trained from random init for a few epochs otherwise predicts one class in eval mode."""
    net.train()
    layers = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
              and m.track_running_stats]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    seen = 0
    with torch.no_grad():
        for images, _ in loader:
            x = images.to(device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
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
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                logits = net(x).float()
            total += float(F.cross_entropy(logits, y, weight=weight, reduction="sum"))
            norm += float(weight[y].sum()) if weight is not None else len(y)
            correct, count = correct + int((logits.argmax(1) == y).sum()), count + len(y)
    return total / norm if norm else math.nan, correct / max(count, 1)


def train(train_rows: pd.DataFrame, val_rows: pd.DataFrame, class_names: Sequence[str], out_dir: str | Path, *,
          settings: Mapping, seed: int, weights_dir: str | Path, progress: bool = True) -> dict:
    """Train one classifier on rows with an absolute `image` path and a `class` label name, and
    write the run folder out_dir (model/, loss.csv, summary.json) atomically; return the summary.
    `settings` override the `classification` section's defaults; the ImageNet file is looked up
    in weights_dir."""
    s = section_defaults("classification", settings)
    names = list(class_names)
    if len(names) < 2:
        raise ClassificationError(f"classification needs at least two classes, got {names}")
    if int(s["batch_size"]) < 2:
        raise ClassificationError(f"classification.batch_size={s['batch_size']}: the head's BatchNorm needs batches of 2 or more")
    if len(train_rows) < 2:
        raise ClassificationError(f"{len(train_rows)} training images: the head's BatchNorm needs at least 2; "
                                  "check rule mix_dataset's output")
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
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=float(s["lr"]),
                                 weight_decay=float(s["weight_decay"]))
    val_loader = (data_loader(ClassificationDataset(val_rows, names, s["image_size"], mean, std), s["batch_size"], None,
                              s["num_workers"]) if len(val_rows) else None)
    drop_last = len(train_set) % int(s["batch_size"]) == 1  # a batch of one breaks the head's BatchNorm

    def batches(epoch: int):
        augment = torch.Generator().manual_seed(derive_seed(seed, "classification", "augment", epoch))
        for batch in data_loader(train_set, s["batch_size"], derive_seed(seed, "classification", "epoch", epoch),
                                 s["num_workers"], drop_last=drop_last):
            yield dihedral(batch["image"], random_ops(len(batch["image"]), augment)) if s["augment"] else batch["image"], batch["target"]

    def batch_loss(batch) -> tuple[torch.Tensor, int]:
        x, y = batch[0].to(device), batch[1].to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits = net(x)
        return loss_fn(logits.float(), y), len(x)

    def calibration_batches():
        loader = data_loader(train_set, s["batch_size"], derive_seed(seed, "classification", "batchnorm"),
                             s["num_workers"], drop_last=drop_last)
        return ((b["image"], b["target"]) for b in loader)

    def validate() -> tuple[float, float]:
        recalibrate_batchnorm(net, calibration_batches(), device)
        return _validate(net, val_loader, weight, device)

    fitted = fit_epochs(net, optimizer, batches, batch_loss, validate if val_loader else None, epochs=s["epochs"],
                        patience=s["patience"], score="accuracy", section="classification", error=ClassificationError,
                        progress=progress)
    if val_loader is None:  # the last epoch's model is kept, with statistics of its own weights
        recalibrate_batchnorm(net, calibration_batches(), device)
    summary = {"seed": seed, "model": s["model"], "epochs_run": len(fitted.history), "best_epoch": fitted.best_epoch,
               "best_val_loss": fitted.best_val_loss, "n_train": len(train_rows), "n_val": len(val_rows),
               "train_class_counts": dict(zip(names, counts.tolist(), strict=True))}
    if "source" in train_rows:
        summary["n_train_real"] = int((train_rows["source"] == "real").sum())
        summary["n_train_synthetic"] = int((train_rows["source"] == "synthetic").sum())
    summary.update({"seconds": fitted.seconds, "seconds_per_epoch": fitted.seconds / max(len(fitted.history), 1),
                    "device": str(device), "weights": note})
    with atomic_dir(out_dir) as tmp:
        save_classifier(net, tmp / "model", names, s, {"seed": seed, "best_epoch": fitted.best_epoch})
        write_csv(pd.DataFrame(fitted.history, columns=LOSS_COLUMNS), tmp / "loss.csv")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ----------------------------------------------------------------------------- metrics

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
    pooled = {"accuracy": multiclass_accuracy(pred, t, n, average="micro"), "balanced_accuracy": recall.nanmean(),
              "precision": multiclass_precision(pred, t, n, average="macro"), "recall": recall.nanmean(),
              "f1": multiclass_f1_score(pred, t, n, average="macro"), "auroc": auroc.nanmean()}
    rows = [{"class": "all", "metric": m, "value": float(v)} for m, v in pooled.items()]
    for metric, values in (("f1", f1), ("auroc", auroc)):
        rows += [{"class": name, "metric": metric, "value": float(v)} for name, v in zip(class_names, values, strict=True)]
    return pd.DataFrame(rows)


def confusion(target: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows the true class, columns the predicted one."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    t, p = torch.as_tensor(np.asarray(target), dtype=torch.long), torch.as_tensor(np.asarray(pred), dtype=torch.long)
    return multiclass_confusion_matrix(p, t, n_classes).numpy()


def evaluate(model: ClassifierModel, rows: pd.DataFrame, class_names: Sequence[str], *,
             batch_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores on test rows (absolute `image` paths, `class` label names) pooled over their slides:
    (tidy metrics with columns slide ('all'), class, metric, value; predictions with columns
    patch_id (the image path where rows have none), slide, true and pred (class indices), prob_<i>
    (the probability of class_names[i]))."""
    if list(class_names) != model.class_names:
        raise ClassificationError(f"the classes {list(class_names)} differ from the model's {model.class_names} "
                                  "(names or order); retrain with the run's labels")
    if rows.empty:
        raise ClassificationError("no test rows: no slide has split 'test'; set one in the slide sheet")
    target = class_targets(rows["class"], class_names)
    probs = model.predict_proba(rows, batch_size)
    metrics = classification_metrics(target, probs, class_names)
    metrics.insert(0, "slide", "all")
    predictions = pd.DataFrame({
        "patch_id": rows["patch_id"].astype(str).to_numpy() if "patch_id" in rows else rows["image"].astype(str).to_numpy(),
        "slide": rows["slide"].astype(str).to_numpy() if "slide" in rows else "all",
        "true": target, "pred": probs.argmax(1),
        **{f"prob_{i}": probs[:, i] for i in range(len(class_names))},
    })
    return metrics, predictions


# ----------------------------------------------------------------------------- rule entries

def labelled_rows(indexes: Sequence[str | Path], labels: Mapping, splits: Sequence[str]) -> pd.DataFrame:
    """Rows of the given splits of the patch indexes, paths absolute, with `class` (patch_labels)
    and `source` 'real'."""
    tables = [read_patch_index(p) for p in indexes]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["split"])
    table = table[table["split"].isin(list(splits))].reset_index(drop=True)
    return table.assign(**{"class": patch_labels(table, labels) if len(table) else [], "source": "real"})


def training_sets(manifest: pd.DataFrame, real: pd.DataFrame, *, folds: int, fold: int,
                  seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
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
        log.info("fold %d: %d of %d synthetic images come from its validation slides' maps and are left out of training",
                 fold, int(from_validating.sum()), len(synthetic))
    train_rows = pd.concat([real[~held], synthetic[~from_validating]], ignore_index=True)
    return train_rows, real[held].reset_index(drop=True)


def train_classifier(manifest: str | Path, indexes: Sequence[str | Path], out_dir: str | Path, *, config: Mapping,
                     seed: int, fold: int) -> dict:
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
    train_rows, val_rows = training_sets(mixed, real, folds=int(s["folds"]), fold=int(fold),
                                         seed=derive_seed(config["seed"], "classification", "folds"))
    return train(train_rows, val_rows, labels["classes"], out_dir, settings=s, seed=seed, weights_dir=config["weights_dir"])


def evaluate_classifier(run_dir: str | Path, indexes: Sequence[str | Path], metrics_out: str | Path,
                        predictions_out: str | Path, *, config: Mapping, ratio: str, fold: int, seed: int) -> pd.DataFrame:
    """Entry of rule evaluate_classifier: score one run on the test slides; write the tidy metrics
    (columns task, ratio, seed, fold, slide, class, metric, value) and the predictions (ratio,
    seed, fold and evaluate's columns) as parquet."""
    s, labels = section_defaults("classification", config["classification"]), config["labels"]
    model = load_classifier(run_dir, s["device"])
    metrics, predictions = evaluate(model, labelled_rows(indexes, labels, ("test",)), labels["classes"],
                                    batch_size=s["batch_size"])
    for table in (metrics, predictions):
        for name, value in (("fold", fold), ("seed", seed), ("ratio", ratio)):
            table.insert(0, name, value)
    metrics.insert(0, "task", "classification")
    write_table(metrics, metrics_out)
    write_table(predictions, predictions_out)
    return metrics
