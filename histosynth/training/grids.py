"""Preview grids of images in [-1, 1], written while a model trains or samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histosynth.files import atomic_file


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images[:, :3].permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """Write rows of images in [-1, 1] (each (N, 3, H, W), same H and W) as one PNG grid, atomically."""
    from PIL import Image

    rows = [to_uint8(r) for r in rows]
    n, (h, w) = max(len(r) for r in rows), rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = image
    with atomic_file(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return Path(path)
