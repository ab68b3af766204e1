"""Torch datasets over the workflow's tables: patches with their conditioning maps, as the
autoencoder and diffusion trainings consume them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from histosynth.data.io import read_file_table, read_rgb
from histosynth.data.labels import label_index, patch_labels, run_labels
from histosynth.nuclei.conditioning import conditioning_channels, read_conditioning


def read_indexes(paths: Sequence[str | Path], split: str | None = None) -> pd.DataFrame:
    """Rows of patch indexes or conditioning indexes (patch rows plus a `conditioning` path),
    file paths made absolute, restricted to one split when given."""
    tables = [read_file_table(path) for path in paths]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return table[table["split"] == split].reset_index(drop=True) if split and len(table) else table


class PatchDataset(Dataset):
    """Items {'image': (3, H, W) float in [-1, 1], 'label': int64 (the patch's class index under
    resolved `labels`, histosynth.data.labels)} plus 'cond': (C, H, W) float when the table has
    conditioning maps (conditioning indexes do, patch indexes do not), whose channels `conditioning`
    (the config section) selects: only their readers need it."""

    def __init__(self, table: pd.DataFrame, classes: Sequence[str], conditioning: dict | None, labels: dict):
        self.table = table.reset_index(drop=True)
        self.n_regions = len(classes)
        if "conditioning" in self.table and conditioning is None:
            raise ValueError(
                "these indexes hold conditioning maps, but the job's config has no `conditioning` section "
                "to select their channels; pass it (the workflow's training_params gives it to diffusion)"
            )
        self.channels = (
            {f"use_{key}": bool(conditioning[key]) for key in ("regions", "nuclei", "boundaries")}
            if conditioning is not None
            else {}
        )
        self.labels = (
            label_index(patch_labels(self.table, labels), labels) if len(self.table) else np.empty(0, np.int64)
        )

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        row = self.table.iloc[i]
        pixels = read_rgb(row["image"]).astype(np.float32)
        item = {
            "image": torch.from_numpy(pixels.transpose(2, 0, 1) / 127.5 - 1.0),
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
        }
        if "conditioning" in row:
            encoded = read_conditioning(row["conditioning"])
            item["cond"] = torch.from_numpy(conditioning_channels(encoded, self.n_regions, **self.channels))
        return item


def patch_dataset(indexes: Sequence[str | Path], split: str, config: dict) -> PatchDataset:
    """The training entry points' dataset factory: one split of the given indexes; `config` the
    job's (labels resolved by the workflow) or a validated one (labels resolved from the indexes)."""
    table = read_indexes(indexes, split)
    sheet_labels = table.drop_duplicates("slide")["label"].fillna("").tolist() if "label" in table else []
    return PatchDataset(table, config["classes"], config.get("conditioning"), run_labels(config, sheet_labels))
