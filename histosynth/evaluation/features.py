"""Image feature spaces that need no download, for Fréchet distance, KID and diversity offline.

An extractor maps uint8 RGB images (N, 3, H, W) to one feature vector each:

- `segmentation_encoder`: the encoder of a segmentation model trained in the same run (by
  default the real-only one), global-average-pooled at every stage and concatenated, so colour,
  texture and structure all count. Always available once the baseline segmenter is trained.
- `timm_encoder` (histosynth.nets): any timm model (num_classes=0: its pooled features) with weights from a local
  file, e.g. an ImageNet ResNet or a pathology foundation model in timm format.

Inception (FID/KID/IS) stays in histosynth.evaluation.quality; these spaces sit beside it, and every quality
row names the extractor it used (`FeatureExtractor.name`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histosynth.data.io import read_rgb
from histosynth.nets import SEGMENTATION, FeatureError, FeatureExtractor, normalise, timm_encoder


def segmentation_encoder(model) -> FeatureExtractor:
    """The encoder of a loaded segmentation model (histosynth.evaluation.segmentation.load_model, the same
    object that re-segments for mask consistency): each stage's feature map average-pooled,
    concatenated (resnet18 at depth 4: 512 values)."""
    encoder = model.net.encoder

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        stages = encoder(normalise(images.to(model.device)))[1:]  # [0] is the input itself
        return torch.cat([F.adaptive_avg_pool2d(s.float(), 1).flatten(1) for s in stages], 1).cpu()

    return FeatureExtractor(
        f"segmentation encoder ({getattr(model.net, 'name', type(model.net).__name__)}, {model.source})", embed
    )


def build_extractor(
    name: str, weights: str | Path | None, segmentation=None, device: str | torch.device = "auto"
) -> FeatureExtractor:
    """The configured extractor: 'segmentation' (needs the loaded real-only segmentation model)
    or a timm model name with its weights file."""
    if name == SEGMENTATION:
        if segmentation is None:
            raise FeatureError("quality.extractor='segmentation' needs the real-only segmentation run")
        return segmentation_encoder(segmentation)
    return timm_encoder(name, weights, device)


def pixel_features(pixels: np.ndarray, extractor: FeatureExtractor) -> np.ndarray:
    """(N, D) float64 features of (N, H, W, 3) uint8 images (one batch)."""
    return extractor.embed(torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))).double().numpy()


def configured_extractor(quality: Mapping, segmentation=None) -> tuple[FeatureExtractor | None, str]:
    """The `quality` config section's offline feature space (quality.extractor; the loaded real-only
    segmentation model when it is 'segmentation'), or None and why it cannot be built."""
    try:
        return build_extractor(quality["extractor"], quality["extractor_weights"], segmentation, quality["device"]), ""
    except FeatureError as err:
        return None, str(err)


def image_features(paths: Sequence[str | Path], extractor: FeatureExtractor, batch_size: int) -> np.ndarray:
    """(N, D) float64 features of the same-sized RGB images at `paths`, read batch by batch."""
    chunks = [
        pixel_features(np.stack([read_rgb(p) for p in paths[start : start + batch_size]]), extractor)
        for start in range(0, len(paths), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.empty((0, 0))


def pairwise_diversity(features: np.ndarray, pairs: int, seed: int) -> float:
    """Mean Euclidean distance between the unit-normalised features of random distinct pairs (all
    pairs when fewer exist): 0 when every image looks alike, up to 2."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    n = len(unit)
    if n < 2:
        raise ValueError("feature diversity needs at least 2 images")
    if n * (n - 1) // 2 <= pairs:
        first, second = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, pairs)
        second = (first + rng.integers(1, n, pairs)) % n
    return float(np.linalg.norm(unit[first] - unit[second], axis=1).mean())
