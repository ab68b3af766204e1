"""Segmentation: an smp U-Net (attention decoder) trained on one mixed training set with one seed,
and its evaluation on the held-out slides.

Targets are multilabel: one sigmoid channel per segmented class, no background channel (the
thesis' binary blood-vessel set-up, generalised), trained with BCE + Dice (smp.losses,
mode "multilabel"); a pixel belongs to class c when its channel-c probability >= threshold. The
label masks are single-label (0 = background, n = n-th configured class), so the one-hot targets
never overlap; predictions may, and every class is scored on its own (binary TP/FP/FN).

Training: Adam, the LR multiplied by `lr_decay` after every epoch (ExponentialLR), early stopping
on the validation loss (`patience` epochs without improvement), the best-validation model kept.
The initial weights depend on the seed alone (not on the ratio), so runs of the same seed on
different ratios start from the same network and can be compared pairwise; data order and
augmentation (the 8 flips/rotations) are fixed by (seed, epoch).

A run folder holds model/ (smp save_pretrained: config.json + model.safetensors, plus
histosynth.json with classes, mask values, threshold and normalisation), loss.csv (one row per
epoch: step, epoch, train_loss, val_loss, val_dice, lr, seconds) and summary.json.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from histosynth.config import section_defaults
from histosynth.data.io import read_mask, read_patch_index, read_rgb, write_csv
from histosynth.data.patches import class_indices
from histosynth.device import autocast, channels_last, pick_device, prepare_model
from histosynth.files import MODEL_INFO, atomic_dir
from histosynth.nets import IMAGENET_MEAN, IMAGENET_STD, dihedral, normalise, random_ops, unet
from histosynth.overlap import overlap_scores
from histosynth.seeds import derive_seed, seed_everything
from histosynth.training.epochs import data_loader, fit_epochs, read_model_folder
from histosynth.weights import encoder_spec, read_state_dict, weights_file

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("step", "epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds")


class SegmentationError(RuntimeError):
    """A segmentation run that cannot start: empty data, unknown classes, missing weights."""


# ----------------------------------------------------------------------------- data


def target_classes(all_classes: Sequence[str], selected: Sequence[str] | None) -> dict[str, int]:
    """{class: mask value} of the segmented classes (config `segmentation.classes`, default all)."""
    values = class_indices(list(all_classes))
    selected = list(selected) if selected else list(all_classes)
    unknown = [c for c in selected if c not in values]
    if unknown:
        raise SegmentationError(f"segmentation.classes names {unknown}, which are not in classes {list(all_classes)}")
    return {c: values[c] for c in selected}


def one_hot(mask: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """(C, H, W) float32 one-hot of a label mask for the given mask values (no background)."""
    return (mask[None] == np.asarray(values, mask.dtype).reshape(-1, 1, 1)).astype(np.float32)


class SegmentationDataset(Dataset):
    """Items {'image': (3, H, W) uint8, 'target': (C, H, W) float32, 'index': int} of manifest rows
    (absolute image and mask paths); normalisation happens on the device."""

    def __init__(self, table: pd.DataFrame, mask_values: Sequence[int]):
        self.images = table["image"].tolist()
        self.masks = table["mask"].tolist()
        self.values = list(mask_values)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = read_rgb(self.images[i])
        mask = read_mask(self.masks[i])
        if mask.shape != image.shape[:2]:
            raise SegmentationError(f"{self.masks[i]}: mask {mask.shape} and image {image.shape[:2]} differ in size")
        return {
            "image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
            "target": torch.from_numpy(one_hot(mask, self.values)),
            "index": i,
        }


# ----------------------------------------------------------------------------- model


def build_model(settings: Mapping, n_classes: int):
    """The U-Net of the segmentation settings (see unet), its decoder checked against them."""
    depth = int(settings["encoder_depth"])
    channels = list(settings["decoder_channels"])
    if len(channels) != depth:
        raise SegmentationError(f"segmentation.decoder_channels needs encoder_depth={depth} entries, got {channels}")
    if settings["attention"] == "scse" and min(channels) < 16:
        raise SegmentationError(
            f"segmentation.attention 'scse' needs decoder_channels >= 16 (its squeeze divides by 16), got {channels}"
        )
    return unet(settings["encoder"], depth, channels, n_classes, settings["attention"])


def encoder_weights_file(settings: Mapping, weights_dir: str | Path) -> tuple[Path | None, str]:
    """The encoder state-dict file to start from and a line saying what was chosen: the configured
    encoder_weights_path (which must exist), else (encoder_weights: imagenet) smp's ImageNet file in
    weights_dir (histosynth.weights), else None (random init) with how to provide it."""
    configured = settings["encoder_weights_path"]
    if configured and not Path(configured).is_file():
        raise SegmentationError(f"segmentation.encoder_weights_path={configured} does not exist")
    if configured:
        return Path(configured), f"encoder weights from {configured}"
    encoder = settings["encoder"]
    if settings["encoder_weights"] != "imagenet":
        return None, f"encoder {encoder}: random init (segmentation.encoder_weights is {settings['encoder_weights']!r})"
    spec = encoder_spec(encoder)
    if spec is None:
        return None, (
            f"encoder {encoder}: smp has no ImageNet weights file for it; random init. To start from "
            "pretrained weights, save smp's encoder state dict (model.encoder.state_dict()) to a file and "
            "set segmentation.encoder_weights_path to it"
        )
    path, note = weights_file(spec, None, weights_dir)
    return path, (f"encoder {encoder}: ImageNet {note}" if path else f"{note}; random init")


def load_encoder_weights(model, path: Path) -> None:
    state = {
        k.removeprefix("encoder."): v
        for k, v in read_state_dict(path).items()
        if not k.startswith(("fc.", "classifier."))
    }
    own = model.encoder.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise SegmentationError(
            f"{path}: none of its tensors match encoder {type(model.encoder).__name__}; "
            "it must be an smp encoder state dict (model.encoder.state_dict())"
        )
    # smp encoders override load_state_dict (and some return None), so match keys here.
    torch.nn.Module.load_state_dict(model.encoder, matching, strict=False)
    log.info(
        "loaded %d of the encoder's %d tensors from %s (%d in the file unused)",
        len(matching),
        len(own),
        path,
        len(state) - len(matching),
    )


class BceDiceLoss(torch.nn.Module):
    """bce_weight * BCE + dice_weight * soft Dice over the multilabel channels."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss

        self.bce, self.dice = SoftBCEWithLogitsLoss(), DiceLoss(mode="multilabel", from_logits=True)
        self.weights = (float(bce_weight), float(dice_weight))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return self.weights[0] * self.bce(logits, target) + self.weights[1] * self.dice(logits, target)


@dataclass
class SegmentationModel:
    """A trained network with what is needed to apply it."""

    net: torch.nn.Module
    classes: dict[str, int]  # {class: mask value}, in channel order
    threshold: float
    device: torch.device
    source: Path | None = None  # the model folder it was loaded from

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float (N, C, H, W) on the CPU. Sides must be multiples of 2**encoder_depth."""
        x = normalise(images.to(self.device))
        x = channels_last(x)
        with autocast(self.device):
            return torch.sigmoid(self.net(x).float()).cpu()

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """Label mask (H, W) uint8 of one RGB image: the mask value of the most probable class
        whose probability passes the threshold, 0 elsewhere (for mask-consistency checks)."""
        probs = self.probabilities(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None])[0]
        values = torch.tensor(list(self.classes.values()), dtype=torch.uint8)
        best = probs.argmax(0)
        return torch.where(probs.max(0).values >= self.threshold, values[best], 0).numpy().astype(np.uint8)


def save_model(net, directory: Path, classes: Mapping[str, int], settings: Mapping, extra: Mapping) -> None:
    net = copy.deepcopy(net).cpu().to(memory_format=torch.contiguous_format)
    net.save_pretrained(str(directory))
    meta = {
        "classes": dict(classes),
        "threshold": settings["threshold"],
        "normalisation": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input": "RGB uint8 / 255"},
        "settings": dict(settings),
        **extra,
    }
    (directory / MODEL_INFO).write_text(json.dumps(meta, indent=2, default=str))


def load_model(directory: str | Path, device: str | torch.device = "auto") -> SegmentationModel:
    """Load a run's model/ folder (or the run folder holding it)."""
    import segmentation_models_pytorch as smp

    directory, meta = read_model_folder(directory, "segmentation model", "train_segmentation", SegmentationError)
    device = device if isinstance(device, torch.device) else pick_device(device)
    net = prepare_model(smp.from_pretrained(str(directory)).eval(), device)
    return SegmentationModel(net, dict(meta["classes"]), float(meta["threshold"]), device, directory)


# ----------------------------------------------------------------------------- training


def _evaluate_loss(net, loader, loss_fn, device, threshold: float) -> tuple[float, float]:
    """Mean loss and mean per-class Dice (pooled counts, pixels with probability >= threshold) over a loader."""
    net.eval()
    total, count, tp, fp, fn = 0.0, 0, 0, 0, 0
    with torch.no_grad():
        for batch in loader:
            x = normalise(batch["image"].to(device))
            y = batch["target"].to(device)
            with autocast(device):
                logits = net(x)
            total += float(loss_fn(logits, y)) * len(x)
            count += len(x)
            pred, truth = torch.sigmoid(logits.float()) >= threshold, y > 0.5
            tp = tp + (pred & truth).sum((0, 2, 3)).cpu().numpy()
            fp = fp + (pred & ~truth).sum((0, 2, 3)).cpu().numpy()
            fn = fn + (~pred & truth).sum((0, 2, 3)).cpu().numpy()
    dice = overlap_scores(tp, fp, fn)["dice"]
    return total / max(count, 1), float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan


def batch_loss(net, loss_fn, images: torch.Tensor, targets: torch.Tensor, ops, device) -> torch.Tensor:
    """The training loss of one batch (uint8 images, float targets): both turned by the dihedral
    `ops` (None: as they are), the images normalised, channels_last, the net under the device's autocast."""
    if ops is not None:
        images, targets = dihedral(images, ops), dihedral(targets, ops)
    x, y = channels_last(normalise(images.to(device))), targets.to(device)
    with autocast(device):
        logits = net(x)
    return loss_fn(logits, y)


def train(
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    all_classes: Sequence[str],
    out_dir: str | Path,
    *,
    settings: Mapping,
    seed: int,
    weights_dir: str | Path,
    progress: bool = True,
) -> dict:
    """Train one model on manifest rows (absolute image/mask paths) and write the run folder
    out_dir (model/, loss.csv, summary.json) atomically; return the summary. `settings` override
    the `segmentation` section's defaults; the ImageNet encoder file is looked up in weights_dir."""
    s = section_defaults("segmentation", settings)
    classes = target_classes(all_classes, s["classes"])
    if train_rows.empty:
        raise SegmentationError("the training manifest is empty; check rule mix_dataset's output")
    device = pick_device(s["device"])
    weights, note = encoder_weights_file(s, weights_dir)
    log.info(note)
    seed_everything(derive_seed(seed, "segmentation", "init"))
    net = build_model(s, len(classes))
    if weights is not None:
        load_encoder_weights(net, weights)
    net = prepare_model(net, device)
    loss_fn = BceDiceLoss(s["bce_weight"], s["dice_weight"])
    optimizer = torch.optim.Adam(net.parameters(), lr=float(s["lr"]))
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=float(s["lr_decay"]))
    values = list(classes.values())
    train_set = SegmentationDataset(train_rows, values)
    val_loader = (
        data_loader(SegmentationDataset(val_rows, values), s["batch_size"], None, s["num_workers"])
        if len(val_rows)
        else None
    )
    augment = torch.Generator().manual_seed(derive_seed(seed, "segmentation", "augment"))

    def batches(epoch: int):
        return data_loader(
            train_set, s["batch_size"], derive_seed(seed, "segmentation", "epoch", epoch), s["num_workers"]
        )

    def step_loss(batch: dict) -> tuple[torch.Tensor, int]:
        n = len(batch["image"])
        ops = random_ops(n, augment) if s["augment"] else None
        return batch_loss(net, loss_fn, batch["image"], batch["target"], ops, device), n

    def validate() -> tuple[float, float]:
        return _evaluate_loss(net, val_loader, loss_fn, device, float(s["threshold"]))

    fitted = fit_epochs(
        net,
        optimizer,
        batches,
        step_loss,
        validate if val_loader else None,
        epochs=s["epochs"],
        patience=s["patience"],
        min_delta=s["min_delta"],
        schedule=schedule,
        score="dice",
        section="segmentation",
        error=SegmentationError,
        progress=progress,
    )
    history, seconds = fitted.history, fitted.seconds
    summary = {
        "seed": seed,
        "epochs_run": len(history),
        "best_epoch": fitted.best_epoch,
        "best_val_loss": fitted.best_val_loss,
        "n_train": len(train_rows),
        "n_val": len(val_rows),
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(len(history), 1),
        "device": str(device),
        "encoder_weights": note,
    }
    with atomic_dir(out_dir) as tmp:
        save_model(net, tmp / "model", classes, s, {"seed": seed, "best_epoch": fitted.best_epoch})
        write_csv(pd.DataFrame(history, columns=LOSS_COLUMNS), tmp / "loss.csv")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ----------------------------------------------------------------------------- rule entries


def split_rows(indexes: Sequence[str | Path], split: str) -> pd.DataFrame:
    """Rows of one split of the patch indexes, paths absolute."""
    tables = [read_patch_index(p) for p in indexes]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return table[table["split"] == split].reset_index(drop=True) if len(table) else table


def train_segmentation(
    manifest: str | Path, indexes: Sequence[str | Path], out_dir: str | Path, *, config: Mapping, seed: int
) -> dict:
    """Entry of rule train_segmentation: the mixed manifest's rows, validation rows from the patch
    indexes. A manifest with rows without a label mask (a GAN set's images) is refused."""
    from histosynth.evaluation.mixing import read_mix, without_masks

    rows = read_mix(manifest)
    if without_masks(rows):
        raise SegmentationError(
            f"{manifest}: {without_masks(rows)} synthetic images have no label mask (the GAN set draws "
            "images only); segmentation cannot train on them. Ratios drawing from gan feed "
            "classification only: give segmentation's ratios the sources synth or inpaint"
        )
    return train(
        rows,
        split_rows(indexes, "val"),
        config["classes"],
        out_dir,
        settings=config["segmentation"],
        seed=seed,
        weights_dir=config["weights_dir"],
    )
