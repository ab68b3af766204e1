"""What `fit` draws each step: dataset checks, the per-epoch item order (shuffled or class-balanced,
sharded round-robin among processes), collation and per-item random draws shared across processes."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from histosynth.nets import dihedral
from histosynth.seeds import derive_seed
from histosynth.training.errors import DatasetError


def check_dataset(dataset: Dataset, name: str = "training") -> dict:
    """Fail clearly on an empty dataset or items without an image; return the first item's shapes."""
    if dataset is None or len(dataset) == 0:
        raise DatasetError(
            f"the {name} dataset is empty (0 items): no patches reached this split; check the "
            "patch index, the split assignment and the patch filters (min_tissue, min_label)"
        )
    item = dataset[0]
    if not isinstance(item, Mapping) or "image" not in item:
        raise DatasetError(
            f"{name} dataset items must be dicts with 'image' (and 'cond', 'label'); got {type(item).__name__}"
        )
    return {key: tuple(value.shape) for key, value in item.items() if torch.is_tensor(value) and value.ndim}


def dataset_labels(dataset) -> np.ndarray:
    """The class index of every item: the dataset's `labels` when it has them, else each item's 'label'."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i]["label"]) for i in range(len(dataset))]
    return np.asarray(labels, dtype=np.int64)


def shape_text(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape))


def collate(items: list[dict]) -> dict:
    """default_collate, after checking that every image (and cond map) has one size."""
    for key in ("image", "cond"):
        if key in items[0]:
            first = items[0][key]
            for item in items[1:]:
                if item[key].shape != first.shape:
                    raise DatasetError(
                        f"training {key}s of different sizes: {shape_text(first)} and {shape_text(item[key])}; "
                        "all patches must share one size (config patches.size)"
                    )
    return default_collate(items)


def epoch_order(
    n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, weights: torch.Tensor | None = None
) -> list[int]:
    """This process's item order for one epoch: a permutation fixed by (seed, epoch) or, with
    `weights`, n draws with replacement in proportion to them; padded by wrap-around to a multiple
    of the process count and dealt out round-robin."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    if weights is None:
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    order += order[: (-n) % world]
    return order[rank::world]


def batch_draw(draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
    """Random values for the n items of this process's batch, draw(k) -> k rows (e.g.
    `lambda k: torch.randn(k, *x.shape[1:], device=x.device)`): draw(n) in one process; under a
    multi-process `fit`, whose processes share one torch RNG stream and hold items p, p + N, ... of
    the step's global batch, rows rank::N of draw(n * N): what each item would get in a one-process
    run with that global batch. Every process must call it alike (same n, same order)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return draw(n)
    world = dist.get_world_size()
    return draw(n * world)[dist.get_rank() :: world]


def random_dihedral(images: torch.Tensor) -> torch.Tensor:
    """Each (square) image flipped and rotated by a random multiple of 90 degrees (histosynth.nets.dihedral),
    drawn from the global RNG per item of the global batch (batch_draw): label-safe for histology,
    whose classes do not depend on orientation."""
    ops = batch_draw(lambda m: torch.randint(0, 8, (m,), device=images.device), len(images))
    return dihedral(images, ops)


def balance_weights(labels, strength: float) -> torch.Tensor:
    """Sampling weight per item, 1 / count(label)^strength: 0 keeps the data's class frequencies,
    1 draws every class label equally often (the rare class as often as the common one)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    counts = torch.bincount(labels)
    return counts[labels].double().pow(-float(strength))


def loader(dataset, order: list[int], batch_size: int, num_workers: int, seed: int, epoch: int) -> DataLoader:
    # The explicit generator keeps the worker base seed off the global RNG (resumes stay identical).
    generator = torch.Generator().manual_seed(derive_seed(seed, "loader", epoch))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        collate_fn=collate,
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )
