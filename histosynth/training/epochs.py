"""The epoch loop of the downstream tasks (segmentation, classification): train an epoch, validate,
stop early, keep the best model; and the reader of their saved model folders.

Each epoch draws its batches from the task (`batches(epoch)`, whose order and augmentation the
task fixes by seed and epoch), takes one optimiser step per batch on the task's loss, steps the
LR schedule (if any) and scores the validation set: its loss and one task score (Dice, accuracy).
Training stops after `patience` epochs without a validation loss better than the best by more than
`min_delta`, and the network ends up holding the best epoch's weights. Without a validation set
every epoch counts as the best, so the last one is kept.

One row per epoch (step, epoch, train_loss, val_loss, val_<score>, lr, seconds) is returned for
the run's loss.csv, which the report plots. The generators train through
histosynth.training.loop.fit instead: a step-counted loop with resume, EMA and multi-process
sharding, and no validation set to stop on; this loop is the epoch-counted one with early stopping.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from histosynth.files import MODEL_INFO

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    """What the loop did: one row per epoch run, the kept epoch and its validation loss."""

    history: list[dict]
    best_epoch: int
    best_val_loss: float
    seconds: float


def data_loader(
    dataset: Dataset, batch_size: int, shuffle_seed: int | None, num_workers: int, drop_last: bool = False
) -> DataLoader:
    """A loader in the dataset's order (shuffle_seed None), or shuffled by a generator seeded with shuffle_seed."""
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle_seed is not None,
        generator=generator,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )


def fit_epochs(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], Iterable],
    loss: Callable[[Any], tuple[torch.Tensor, int]],
    validate: Callable[[], tuple[float, float]] | None,
    *,
    epochs: int,
    patience: int,
    min_delta: float = 0.0,
    schedule=None,
    score: str,
    section: str,
    error: type[Exception] = RuntimeError,
    progress: bool = True,
) -> Fitted:
    """Train `net` for up to `epochs` epochs with early stopping; leave it holding the best epoch's weights.

    batches(epoch) yields the training batches of epoch 1, 2, ...; loss(batch) returns the batch's
    mean loss (on the device, with its graph) and its number of samples. validate() returns the
    validation loss and score (the row's `val_<score>`; it puts the network in eval mode itself);
    None = no validation set (NaN columns, the last epoch kept). schedule: stepped after every
    epoch (e.g. ExponentialLR), or None. `section` is the task's config section: the progress
    bar's label and the key a non-finite loss (raised as `error`) asks to lower."""
    if validate is None:
        log.warning("no validation rows: early stopping is off and the last epoch's model is kept")
    best = {"val_loss": math.inf, "epoch": 0, "state": None}
    history, step, started, waited = [], 0, time.perf_counter(), 0
    bar = tqdm(range(1, int(epochs) + 1), desc=section, unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        net.train()
        total, count = 0.0, 0
        for batch in batches(epoch):
            value, n = loss(batch)
            if not torch.isfinite(value):
                raise error(f"non-finite loss at epoch {epoch}, step {step}; lower {section}.lr")
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total, count, step = total + float(value.detach()) * n, count + n, step + 1
        lr = optimizer.param_groups[0]["lr"]
        if schedule is not None:
            schedule.step()
        val_loss, val_score = validate() if validate is not None else (math.nan, math.nan)
        row = {
            "step": step,
            "epoch": epoch,
            "train_loss": total / max(count, 1),
            "val_loss": val_loss,
            f"val_{score}": val_score,
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{val_loss:.4f}")
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, val %s %.3f (%.1f s)",
            epoch,
            row["train_loss"],
            val_loss,
            score,
            val_score,
            row["seconds"],
        )
        if validate is None or val_loss < best["val_loss"] - float(min_delta):
            best = {"val_loss": val_loss, "epoch": epoch, "state": copy.deepcopy(net.state_dict())}
            waited = 0
        else:
            waited += 1
            if waited >= int(patience):
                log.info(
                    "early stop after epoch %d: no better validation loss for %d epochs (best epoch %d)",
                    epoch,
                    waited,
                    best["epoch"],
                )
                break
    if best["state"] is None:  # every validation loss was NaN
        log.warning("no epoch had a finite validation loss; the last epoch's model is kept")
        best = {"val_loss": math.nan, "epoch": len(history), "state": None}
    else:
        net.load_state_dict(best["state"])
    return Fitted(history, best["epoch"], best["val_loss"], time.perf_counter() - started)


def read_model_folder(
    directory: str | Path, what: str, rule: str, error: type[Exception] = RuntimeError
) -> tuple[Path, dict]:
    """A task run's model/ folder (given it or the run folder holding it) and its histosynth.json;
    `error` naming `what` it should be and the `rule` that writes it when there is none."""
    directory = Path(directory)
    if (directory / "model").is_dir():
        directory = directory / "model"
    meta_path = directory / MODEL_INFO
    if not meta_path.is_file():
        raise error(f"{directory}: not a {what} folder (no {MODEL_INFO}); rerun rule {rule}")
    return directory, json.loads(meta_path.read_text())
