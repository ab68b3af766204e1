"""Toy data and settings the tests of several modules share (tests import this module, never another test module)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from histosynth.generators.diffusion import build_model


class Shapes(Dataset):
    """Learnable toy data: a square whose colour follows the mask (red inside, blue outside);
    cond = one-hot [background, square, boundary]; label = which half the square is in."""

    def __init__(self, n: int = 10, size: int = 16, nan_at: int | None = None, sizes: dict | None = None):
        self.n, self.size, self.nan_at, self.sizes = n, size, nan_at, sizes or {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = self.sizes.get(i, self.size)
        g = torch.Generator().manual_seed(i)
        y, x = torch.randint(0, s // 2, (2,), generator=g).tolist()
        mask = torch.zeros(s, s)
        mask[y : y + s // 2, x : x + s // 2] = 1
        edge = mask + torch.nn.functional.max_pool2d(-mask[None, None], 3, 1, 1)[0, 0]  # mask - erosion
        image = torch.stack([2 * mask - 1, -torch.ones(s, s), 1 - 2 * mask]) + 0.05 * torch.randn(3, s, s, generator=g)
        if i == self.nan_at:
            image = torch.full_like(image, float("nan"))
        cond = torch.stack([1 - mask, mask, edge])
        return {
            "image": image.clamp(-1, 1) if i != self.nan_at else image,
            "cond": cond,
            "label": torch.tensor(int(x >= s // 4)),
        }


class Toy(Dataset):
    """Items {'image', 'label'} as PatchDataset gives them: class 0 reddish, class 1 bluish 32 px
    patches with noise (the GAN resizes them to gan.size); `labels` per item for class balance."""

    def __init__(self, n: int = 6, size: int = 32):
        self.n, self.size = n, size
        self.labels = np.arange(n) % 2

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        colour = torch.tensor([0.8, -0.6, -0.6]) if self.labels[i] == 0 else torch.tensor([-0.6, -0.6, 0.8])
        image = colour.view(3, 1, 1) + 0.1 * torch.randn(3, self.size, self.size, generator=g)
        return {"image": image.clamp(-1, 1), "label": torch.tensor(int(self.labels[i]))}


def tiny(**train) -> dict:
    """A tiny diffusion config (a few steps, checkpoints every 2) with `train` settings overriding the defaults."""
    return {
        "channels": 8,
        "multipliers": [1, 2],
        "attention_head_dim": 8,
        "norm_groups": 4,
        "spade_hidden": 8,
        "num_classes": 2,
        "cond_dropout": 0.2,
        "train": {
            "steps": 6,
            "batch_size": 4,
            "lr": 1e-3,
            "checkpoint_every": 2,
            "keep_checkpoints": 2,
            "log_every": 1,
            "sample_every": 0,
            "ema_decay": 0.9,
            "sample_count": 2,
            **train,
        },
    }


def tiny_model(conditioning="spade", image_channels=3, cond_channels=3, num_classes=0):
    """A tiny diffusion U-Net (16 px) with seeded weights, in eval mode."""
    torch.manual_seed(0)
    return build_model(
        {**tiny(), "conditioning": conditioning, "num_classes": num_classes}, image_channels, cond_channels, 16
    ).eval()


def assert_identical(a: dict, b: dict):
    """Two state dicts hold the same tensors, bit for bit."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def shapes_factory(indexes, split, config):
    """A dataset factory as the trainers' --dataset expects, (indexes, split, config) -> Dataset: Shapes."""
    return Shapes(n=4 if split == "train" else 2)


def toy_factory(indexes, split, config):
    """A dataset factory as the trainers' --dataset expects, (indexes, split, config) -> Dataset: Toy, no val set."""
    return Toy(n=4 if split == "train" else 0)
