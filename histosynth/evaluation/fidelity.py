"""Image sets through the pretrained networks behind FID/KID/IS and LPIPS diversity.

- FID/KID/IS: torch-fidelity's InceptionV3 (the 2015-12-05 TF weights every FID paper uses,
  histosynth.nets.load_inception), one pass per image giving pool features (quality.feature:
  64/192/768/2048) and unbiased logits, which histosynth.distances scores.
- LPIPS diversity: mean LPIPS (torchmetrics' AlexNet LPIPS; its linear layers ship with
  torchmetrics, the AlexNet backbone is torchvision's ImageNet file) over random pairs of distinct
  images; higher = more diverse. Images under 64 px are upsampled to 64 for AlexNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from histosynth.data.io import read_rgb
from histosynth.nets import inception_embeddings

LPIPS_MIN_SIDE = 64


# ----------------------------------------------------------------------------- image sets


def read_images(paths: Sequence[str | Path]) -> torch.Tensor:
    """uint8 (N, 3, H, W) of same-sized RGB images."""
    arrays = [read_rgb(path) for path in paths]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def inception_features(paths: Sequence[str | Path], net, batch_size: int, device=None) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) float64 arrays for the images at `paths`."""
    device = device or torch.device("cpu")
    chunks = [
        inception_embeddings(read_images(paths[start : start + batch_size]), net, device)
        for start in range(0, len(paths), batch_size)
    ]
    if not chunks:
        return np.empty((0, 0)), np.empty((0, 0))
    return np.concatenate([f for f, _ in chunks]), np.concatenate([lg for _, lg in chunks])


@torch.no_grad()
def lpips_diversity(paths: Sequence[str | Path], net, pairs: int, seed: int, batch_size: int, device=None) -> float:
    """Mean LPIPS over `pairs` random pairs of distinct images (all pairs when fewer exist)."""
    device = device or torch.device("cpu")
    n = len(paths)
    if n < 2:
        raise ValueError("LPIPS diversity needs at least 2 images")
    every = [(i, j) for i in range(n) for j in range(i + 1, n)] if n * (n - 1) // 2 <= pairs else None
    if every is None:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, pairs)
        second = (first + rng.integers(1, n, pairs)) % n  # never the same image
        every = list(zip(first.tolist(), second.tolist(), strict=True))
    net = net.to(device)
    cache: dict[int, torch.Tensor] = {}

    def image(i):
        if i not in cache:
            x = read_images([paths[i]]).float() / 127.5 - 1
            if min(x.shape[-2:]) < LPIPS_MIN_SIDE:
                x = torch.nn.functional.interpolate(
                    x, size=(LPIPS_MIN_SIDE, LPIPS_MIN_SIDE), mode="bilinear", align_corners=False
                )
            cache[i] = x[0]
        return cache[i]

    scores = []
    for start in range(0, len(every), batch_size):
        chunk = every[start : start + batch_size]
        a = torch.stack([image(i) for i, _ in chunk]).to(device)
        b = torch.stack([image(j) for _, j in chunk]).to(device)
        scores.append(net(a, b).flatten().cpu())
    return float(torch.cat(scores).mean())
