"""Stage train_autoencoder: a VQ-VAE (diffusers VQModel) or KL autoencoder (AutoencoderKL) that
maps patches to the latent space the latent diffusion model works in.

    python -m histosynth.generators.autoencoder train --config CONFIG --out DIR --dataset MODULE:FUNC --index ...

Outputs in DIR: model/ (save_pretrained; its config's scaling_factor is measured on the
training latents), loss.csv, metrics.json (validation PSNR and SSIM), reconstructions.png.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.config import section_defaults
from histosynth.device import autocast
from histosynth.files import atomic_dir, atomic_file
from histosynth.generators.launch import cli
from histosynth.nets import WeightsError, load_lpips
from histosynth.seeds import seed_everything
from histosynth.training.batches import check_dataset
from histosynth.training.errors import TrainingError
from histosynth.training.grids import save_grid
from histosynth.training.loop import fit, make_accelerator

log = logging.getLogger("histosynth.generators.autoencoder")  # not __main__ under python -m


# ----------------------------------------------------------------------------- model


def build_autoencoder(config: Mapping, image_channels: int = 3, sample_size: int = 64) -> nn.Module:
    """VQModel or AutoencoderKL from the `autoencoder` config section."""
    from diffusers import AutoencoderKL, VQModel

    c = section_defaults("autoencoder", config)
    factor, channels = int(c["factor"]), [int(w) for w in c["channels"]]
    if factor not in (2, 4, 8, 16):
        raise TrainingError(f"autoencoder.factor must be a power of two (4 or 8), got {factor}")
    blocks = int(math.log2(factor)) + 1
    if len(channels) != blocks:
        raise TrainingError(
            f"autoencoder.channels needs log2(factor) + 1 = {blocks} widths for factor {factor}, "
            f"got {len(channels)}: {channels}"
        )
    bad = [w for w in channels if w % c["norm_groups"]]
    if bad:
        raise TrainingError(f"autoencoder.norm_groups={c['norm_groups']} must divide every width; {bad} do not")
    common = dict(
        in_channels=image_channels,
        out_channels=image_channels,
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=c["layers_per_block"],
        latent_channels=c["latent_channels"],
        norm_num_groups=c["norm_groups"],
        sample_size=sample_size,
        mid_block_add_attention=c["mid_attention"],
    )
    if c["kind"] == "vq":
        return VQModel(**common, num_vq_embeddings=c["codebook_size"], scaling_factor=1.0)
    if c["kind"] == "kl":
        return AutoencoderKL(**common, scaling_factor=1.0)
    raise TrainingError(f"autoencoder.kind must be 'vq' or 'kl', got {c['kind']!r}")


def is_vq(autoencoder) -> bool:
    from diffusers import VQModel

    return isinstance(autoencoder, VQModel)


def latent_factor(autoencoder) -> int:
    return 2 ** (len(autoencoder.config.block_out_channels) - 1)


def raw_latents(autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Unscaled latents: quantized for VQ, the posterior mean for KL."""
    if is_vq(autoencoder):
        return autoencoder.quantize(autoencoder.encode(images).latents)[0]
    return autoencoder.encode(images).latent_dist.mean


def encode(autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> latents scaled to about unit variance (config scaling_factor)."""
    return raw_latents(autoencoder, images) * autoencoder.config.scaling_factor


def decode(autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (VQ latents are snapped to the codebook first)."""
    return autoencoder.decode(latents / autoencoder.config.scaling_factor).sample.clamp(-1, 1)


def load_autoencoder(path: str | Path):
    """The VQModel or AutoencoderKL saved in `path` (by train_autoencoder), in eval mode."""
    from diffusers import AutoencoderKL, VQModel

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TrainingError(f"no autoencoder at {path} (no config.json); train it first (rule train_autoencoder)")
    name = json.loads(config_file.read_text()).get("_class_name")
    classes = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}
    if name not in classes:
        raise TrainingError(f"{path} holds a {name}, not an autoencoder (VQModel or AutoencoderKL)")
    return classes[name].from_pretrained(path).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- training


class _Posterior:
    """Captures the KL autoencoder's posterior moments (quant_conv output) during forward, so the
    loss goes through model.forward (required for DDP) and still sees the posterior."""

    def __init__(self, autoencoder):
        self.moments = None
        autoencoder.quant_conv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.moments = output

    def kl(self) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.moments).kl().mean()


def _measure_scale(autoencoder, dataset, n: int, device, batch_size: int) -> float:
    """1 / std of the unscaled latents of up to n training items."""
    latents = []
    with torch.no_grad(), autocast(device):
        for start in range(0, min(n, len(dataset)), batch_size):
            images = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, n, len(dataset)))])
            latents.append(raw_latents(autoencoder, images.to(device)).float().cpu())
    std = torch.cat(latents).std().item()
    return 1.0 / std if std > 0 and math.isfinite(std) else 1.0


def evaluate(autoencoder, dataset, device, n: int, batch_size: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """PSNR and SSIM (torchmetrics, images in [0, 1]) of reconstructions of up to n items; also
    returns the first batch of real images and reconstructions for the grid."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    psnr, ssim = (
        PeakSignalNoiseRatio(data_range=1.0).to(device),
        StructuralSimilarityIndexMeasure(data_range=1.0).to(device),
    )
    first = None
    count = min(n, len(dataset))
    with torch.no_grad():
        for start in range(0, count, batch_size):
            images = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, count))]).to(device)
            with autocast(device):
                recon = decode(autoencoder, encode(autoencoder, images)).float()
            psnr.update((recon + 1) / 2, (images + 1) / 2)
            ssim.update((recon + 1) / 2, (images + 1) / 2)
            first = first or (images[:8].cpu(), recon[:8].cpu())
    return {"psnr": psnr.compute().item(), "ssim": ssim.compute().item(), "n_images": count}, *first


def train_autoencoder(
    dataset,
    out: str | Path,
    config: Mapping | None = None,
    *,
    seed: int = 0,
    val_dataset=None,
    checkpoint_dir: str | Path | None = None,
    accelerator=None,
) -> dict:
    """Train the autoencoder of the `autoencoder` config section on `dataset` (items with 'image'
    in [-1, 1]); write out/model, out/loss.csv, out/metrics.json, out/reconstructions.png."""
    c = section_defaults("autoencoder", config)
    out = Path(out)
    shapes = check_dataset(dataset)
    channels, height, width = shapes["image"]
    if height % c["factor"] or width % c["factor"]:
        raise TrainingError(f"patch size {height}x{width} is not divisible by autoencoder.factor={c['factor']}")

    seed_everything(seed)
    model = build_autoencoder(c, channels, height)
    log.info(
        "autoencoder %s: %.2fM parameters, latents %dx%dx%d",
        c["kind"],
        sum(p.numel() for p in model.parameters()) / 1e6,
        c["latent_channels"],
        height // c["factor"],
        width // c["factor"],
    )
    accelerator = accelerator or make_accelerator(c["train"])
    lpips = None
    if c["lpips_weights"]:
        try:
            lpips = load_lpips(c["lpips_weights"], c["lpips_net"]).to(accelerator.device)
        except WeightsError as err:
            raise TrainingError(f"autoencoder.lpips_weights: {err}") from err
        log.info("perceptual loss: LPIPS/%s from %s, weight %g", c["lpips_net"], c["lpips_weights"], c["lpips_weight"])
    else:
        log.info(
            "perceptual loss skipped: autoencoder.lpips_weights is not set (no pretrained weights are "
            "downloaded); training on the reconstruction and %s losses only",
            c["kind"],
        )
    posterior = _Posterior(model) if c["kind"] == "kl" else None
    reconstruction = F.l1_loss if c["loss"] == "l1" else F.mse_loss

    def loss_fn(model, batch):
        images = batch["image"]
        if posterior is None:
            recon, codebook = model(images, return_dict=False)
            reg, reg_name, weight = codebook.mean(), "vq", c["vq_weight"]
        else:
            recon = model(images, sample_posterior=True).sample
            reg, reg_name, weight = posterior.kl(), "kl", c["kl_weight"]
        rec = reconstruction(recon.float(), images.float())
        loss = rec + weight * reg
        extras = {"recon": rec.item(), reg_name: reg.item()}
        if lpips is not None:
            perceptual = lpips(recon.float().clamp(-1, 1), images.float()).mean()
            loss = loss + c["lpips_weight"] * perceptual
            extras["lpips"] = perceptual.item()
        return loss, extras

    run_config = {**c, "seed": seed, "data": {"items": len(dataset), "image": list(shapes["image"])}}
    extra_columns = ["recon", "vq" if c["kind"] == "vq" else "kl", *(["lpips"] if lpips is not None else [])]
    result = fit(
        model,
        loss_fn,
        dataset,
        out,
        settings=c["train"],
        run_config=run_config,
        seed=seed,
        accelerator=accelerator,
        checkpoint_dir=checkpoint_dir,
        extra_columns=extra_columns,
        desc="autoencoder",
    )
    if not accelerator.is_main_process:
        return {}

    trained = (result.ema.model if result.ema is not None else result.model).eval()
    device = accelerator.device
    scale = _measure_scale(trained, dataset, c["scale_items"], device, c["train"]["batch_size"])
    trained.register_to_config(scaling_factor=scale)
    val, split = (val_dataset, "val") if val_dataset is not None and len(val_dataset) else (dataset, "train")
    if split == "train":
        log.warning("no validation data: PSNR/SSIM are measured on training patches")
    metrics, real, recon = evaluate(trained, val, device, c["val_items"], c["train"]["batch_size"])
    metrics.update(split=split, steps=result.step, scaling_factor=scale, kind=c["kind"])

    with atomic_dir(out / "model") as tmp:
        trained.save_pretrained(tmp)
    with atomic_file(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    save_grid([real, recon], out / "reconstructions.png")
    log.info(
        "autoencoder: PSNR %.2f dB, SSIM %.3f on %d %s patches; scaling factor %.4g",
        metrics["psnr"],
        metrics["ssim"],
        metrics["n_images"],
        split,
        scale,
    )
    return {"model": str(out / "model"), "loss_csv": str(result.loss_csv), **metrics}


def main(argv: list[str] | None = None) -> int:
    return cli("autoencoder", train_autoencoder, argv)


if __name__ == "__main__":
    sys.exit(main())
