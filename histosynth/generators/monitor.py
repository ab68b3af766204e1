"""Fidelity of a generator while it trains: the Fréchet distance and KID of its images against a
fixed sample of real training images, in the quality stage's feature spaces that need no model
trained downstream (a timm model with local weights as quality.extractor, giving `fd`/`kd`; and
Inception when its weights are present, giving `fid`/`kid`), written into the training's loss
table every `eval_every` steps (GAN training: gan.train.eval_every). The segmenter's space
(quality.extractor 'segmentation') is measured after training only, by the quality stage: a
generator that waited for the downstream segmenter would retrain whenever its settings change.

Values on a few hundred images are biased upwards against the final quality table's (more images)
but comparable from step to step, which is what a training curve needs. Nothing here draws from
the global random generators, so a resumed training stays bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histosynth.distances import fid, kid
from histosynth.nets import SEGMENTATION, FeatureError, inception_embeddings, load_inception, timm_encoder
from histosynth.weights import WEIGHTS, weights_file

log = logging.getLogger(__name__)

COLUMNS = ("fd", "kd", "fid", "kid")


@dataclass(frozen=True)
class FeatureSpace:
    name: str  # logged once when the monitor starts
    distance: str  # loss-table column of the Fréchet distance (fd | fid)
    kernel: str  # loss-table column of KID (kd | kid)
    embed: Callable[[torch.Tensor], np.ndarray]  # uint8 (N, 3, H, W) -> float64 (N, D)


def feature_spaces(quality: Mapping, weights_dir: str | Path) -> list[FeatureSpace]:
    """The quality stage's feature spaces that can be built here (the `quality` config section);
    each one that cannot is logged with how to enable it."""
    spaces = []
    if quality["extractor"] == SEGMENTATION:
        log.info(
            "fidelity during training: no fd/kd (quality.extractor 'segmentation' is the downstream segmenter's "
            "space, measured after training by rule image_quality; a timm extractor with local weights gives "
            "fd/kd during training)"
        )
    else:
        try:
            extractor = timm_encoder(quality["extractor"], quality["extractor_weights"], quality["device"])
            spaces.append(FeatureSpace(extractor.name, "fd", "kd", lambda x: extractor.embed(x).double().numpy()))
        except FeatureError as err:
            log.info("fidelity during training: no fd/kd (%s)", err)
    inception_path, note = weights_file(WEIGHTS["inception"], quality["inception_weights"], weights_dir)
    if inception_path is None:
        log.info("fidelity during training: no fid/kid (%s)", note)
    else:
        net = load_inception(inception_path, quality["feature"])
        spaces.append(
            FeatureSpace(
                f"inception-v3 pool {quality['feature']}", "fid", "kid", lambda x: inception_embeddings(x, net)[0]
            )
        )
    return spaces


class FidelityMonitor:
    """FD and KID of generated images against `real` (uint8 (N, 3, H, W)) in each space, the real
    features computed once; KID over `kid_subsets` subsets of min(kid_subset_size, N) images."""

    def __init__(
        self,
        real: torch.Tensor,
        spaces: Sequence[FeatureSpace],
        *,
        batch_size: int,
        kid_subsets: int,
        kid_subset_size: int,
        seed: int,
    ):
        self.spaces, self.batch_size, self.seed = list(spaces), batch_size, seed
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.real = [self._features(space, real) for space in self.spaces]
        for space in self.spaces:
            log.info(
                "fidelity during training: %s and %s of %d images in %s",
                space.distance,
                space.kernel,
                len(real),
                space.name,
            )

    def _features(self, space: FeatureSpace, images: torch.Tensor) -> np.ndarray:
        return np.concatenate(
            [space.embed(images[start : start + self.batch_size]) for start in range(0, len(images), self.batch_size)]
        )

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        """{fd, kd, fid, kid: value} of the generated uint8 (N, 3, H, W) images, for the spaces present."""
        values = {}
        for space, real in zip(self.spaces, self.real):
            features = self._features(space, images)
            values[space.distance] = fid(real, features)
            values[space.kernel] = kid(real, features, self.kid_subsets, self.kid_subset_size, self.seed)[0]
        return values
