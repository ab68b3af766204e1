"""A loaded diffusion model as the synthesis stages run it: device, space, conditioning, labels; RePaint of a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from histosynth.device import autocast
from histosynth.generators.autoencoder import decode, encode, latent_factor
from histosynth.generators.diffusion import Diffusion, num_classes
from histosynth.generators.inpaint_regions import dilate, latent_region
from histosynth.generators.sampling import repaint, resize_cond
from histosynth.generators.set_files import SynthesisError, to_model
from histosynth.nuclei.conditioning import conditioning_channels
from histosynth.training.grids import to_uint8


class Runner:
    """What synthesize and inpaint (histosynth.generators.synthesis) need from a loaded model: device, space,
    conditioning channels, labels."""

    def __init__(self, diffusion: Diffusion, classes: Sequence[str], conditioning_cfg: Mapping):
        self.model, self.autoencoder, meta = diffusion.model, diffusion.autoencoder, diffusion.meta
        self.space = meta.get("space", "pixel")
        if self.space == "latent" and self.autoencoder is None:
            raise SynthesisError(
                "this is a latent-space diffusion model but no autoencoder was loaded with it; "
                "load it with histosynth.generators.diffusion.load_diffusion (its recorded autoencoder, or autoencoder=)"
            )
        self.device = next(self.model.parameters()).device
        self.n_regions = len(classes)
        self.channels = {
            f"use_{key}": bool(conditioning_cfg.get(key, True)) for key in ("regions", "nuclei", "boundaries")
        }
        self.expected = meta.get("cond_channels")
        self.size = meta.get("image_size")
        self.num_classes = num_classes(self.model)
        self.prediction = diffusion.scheduler.config.get("prediction_type", "epsilon")
        self.autoencoder_hash = (meta.get("autoencoder") or {}).get("sha256", "") if self.space == "latent" else ""

    def cond(self, encoded: list[np.ndarray]) -> torch.Tensor:
        cond = torch.from_numpy(conditioning_channels(np.stack(encoded), self.n_regions, **self.channels))
        if self.expected is not None and cond.shape[1] != self.expected:
            raise SynthesisError(
                f"the conditioning settings give {cond.shape[1]} channels {self.channels} for "
                f"{self.n_regions} region classes, but the model was trained on {self.expected}; "
                "use the classes and conditioning settings the model was trained with"
            )
        if self.size is not None and list(cond.shape[-2:]) != list(self.size):
            raise SynthesisError(
                f"source patches are {tuple(cond.shape[-2:])} px but the model was trained on "
                f"{tuple(self.size)} px patches"
            )
        return cond.to(self.device)

    def labels(self, labels: np.ndarray) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if labels.max(initial=0) >= self.num_classes:
            raise SynthesisError(
                f"class index {int(labels.max())} is outside the model's class embedding "
                f"(num_classes={self.num_classes}); the model was trained with other labels"
            )
        return torch.as_tensor(labels, dtype=torch.long, device=self.device)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, so image i's noise depends only on its seed (on any device)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def paint(
    runner: Runner,
    scheduler,
    pixels: np.ndarray,
    regions: list[np.ndarray],
    encoded: list[np.ndarray],
    labels: np.ndarray,
    generators,
    *,
    steps: int,
    jump_length: int,
    jump_n_sample: int,
    guidance: float,
    grow: int,
    latent_dilation: int,
) -> np.ndarray:
    """RePaint one batch of sources (N, H, W, 3) uint8 inside their regions (grown by `grow` px)
    under the edited maps, in the model's space; (N, H, W, 3) uint8 with the source's bytes outside."""
    region = dilate(torch.from_numpy(np.stack(regions)[:, None]).float(), grow).to(runner.device)
    known, keep, cond, ae = to_model(pixels, runner.device), 1 - region, runner.cond(encoded), runner.autoencoder
    if ae is not None:
        known, keep = encode(ae, known).float(), 1 - latent_region(region, latent_factor(ae), latent_dilation)
        cond = resize_cond(cond, known.shape[-2:])
    with autocast(runner.device):
        x = repaint(
            runner.model,
            scheduler,
            known,
            keep,
            cond,
            runner.labels(labels),
            steps=steps,
            jump_length=jump_length,
            jump_n_sample=jump_n_sample,
            guidance=guidance,
            generator=generators,
            prediction=runner.prediction,
        )
        x = decode(ae, x) if ae is not None else x.clamp(-1, 1)
    return np.where(region[:, 0].bool().cpu().numpy()[..., None], to_uint8(x), pixels)
