"""RePaint's geometry (histosynth.generators.synthesis.inpaint): a donor's target-class region pasted
into a clean patch's mask and conditioning map, and a pixel-space region carried to the latent grid."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from histosynth.generators.set_files import SynthesisError


def paste_region(
    clean_mask: np.ndarray, clean_encoded: np.ndarray, donor_mask: np.ndarray, target_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The donor's target-class region pasted at the same location: (label mask, encoded map,
    region bool mask). In the map the region channel is the class inside the region and the
    nucleus class and boundary channels are cleared there (pixel-wise), for the model to draw
    new nuclei."""
    if clean_mask.shape != donor_mask.shape or clean_encoded.shape[:2] != clean_mask.shape:
        raise SynthesisError(
            f"patch sizes differ: clean mask {clean_mask.shape}, its map {clean_encoded.shape[:2]}, "
            f"donor mask {donor_mask.shape}"
        )
    region = donor_mask == target_index
    mask = np.where(region, np.uint8(target_index), clean_mask).astype(np.uint8)
    encoded = clean_encoded.copy()
    encoded[region, 0] = target_index
    encoded[region, 1:] = 0
    return mask, encoded, region


def dilate(region: torch.Tensor, pixels: int) -> torch.Tensor:
    """Binary dilation of (N, 1, H, W) by `pixels` (square structuring element)."""
    return F.max_pool2d(region, 2 * pixels + 1, 1, pixels) if pixels > 0 else region


def latent_region(region: torch.Tensor, factor: int, dilation: int) -> torch.Tensor:
    """A pixel-space region (N, 1, H, W) on the latent grid: every latent pixel covering a region
    pixel, dilated by `dilation` latent pixels so the seam falls inside the regenerated area."""
    return dilate(F.max_pool2d(region, factor, factor), dilation)
