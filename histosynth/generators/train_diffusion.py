"""Stage train_diffusion: train the mask-conditioned diffusion model (histosynth.generators.diffusion)
on the shared loop (histosynth.training.loop), with sample previews during training.

    python -m histosynth.generators.train_diffusion train --config CONFIG --out DIR --dataset MODULE:FUNC --index ... [--autoencoder AE]

Outputs in DIR: model/ (save_pretrained of the EMA weights + scheduler_config.json +
histosynth.json with conditioning, space, autoencoder path and hash, training config), loss.csv,
samples/step-<n>.png (real row, then EMA samples for the same masks).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from histosynth.config import section_defaults
from histosynth.device import autocast
from histosynth.files import MODEL_INFO, atomic_dir, content_hash
from histosynth.generators.autoencoder import encode, latent_factor, load_autoencoder
from histosynth.generators.diffusion import build_model, model_output, parameter_count, train_scheduler
from histosynth.generators.launch import cli
from histosynth.generators.sampling import make_sampler, resize_cond, sample
from histosynth.seeds import derive_seed, seed_everything
from histosynth.training.batches import batch_draw, check_dataset, collate
from histosynth.training.errors import TrainingError
from histosynth.training.grids import save_grid
from histosynth.training.loop import fit, make_accelerator

log = logging.getLogger("histosynth.generators.train_diffusion")  # not __main__ under python -m


# ----------------------------------------------------------------------------- training


def _preview_batch(dataset, n: int) -> dict:
    return collate([dataset[i] for i in range(min(max(n, 1), len(dataset)))])


def loss_weights(alpha_cumprod: torch.Tensor, prediction: str, min_snr_gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights: 1 (uniform), or Min-SNR-gamma, min(SNR, gamma) / SNR for epsilon
    prediction and min(SNR, gamma) / (SNR + 1) for v-prediction, which caps the weight of the
    nearly noise-free steps so the high-noise steps that lay out the mask's structure count more."""
    if min_snr_gamma is None:
        return torch.ones_like(alpha_cumprod)
    snr = alpha_cumprod / (1 - alpha_cumprod)
    return snr.clamp(max=min_snr_gamma) / (snr if prediction == "epsilon" else snr + 1)


def denoising_loss(c: Mapping, scheduler, alphas: torch.Tensor, ae=None):
    """The training objective loss_fn(model, batch) -> (loss, {}) of the `diffusion` section c:
    a batch's images (encoded by the frozen autoencoder `ae` in latent space) noised at uniform
    timesteps, the masks dropped with probability cond_dropout (labels then the null class), the
    noise or velocity regressed, weighted per sample by loss_weights (min-SNR). The noise, timesteps
    and dropout are drawn per item of the global batch (training.batch_draw), so several processes
    train as one."""
    null_class = c["num_classes"]

    def loss_fn(model, batch):
        x, cond = batch["image"], batch["cond"]
        if ae is not None:
            with torch.no_grad():
                x = encode(ae, x).float()
            cond = resize_cond(cond, x.shape[-2:])
        n = len(x)
        noise = batch_draw(lambda k: torch.randn(k, *x.shape[1:], device=x.device, dtype=x.dtype), n)
        t = batch_draw(lambda k: torch.randint(0, scheduler.config.num_train_timesteps, (k,), device=x.device), n)
        a = alphas[t].view(n, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        drop = batch_draw(lambda k: torch.rand(k, device=x.device), n) < c["cond_dropout"]
        cond = cond * (~drop).view(n, 1, 1, 1).to(cond.dtype)
        labels = torch.where(drop, null_class, batch["label"].long()) if null_class else None
        target = noise if c["prediction"] == "epsilon" else scheduler.get_velocity(x, noise, t)
        error = (model_output(model, x_t, t, cond, labels).float() - target).pow(2).mean(dim=(1, 2, 3))
        return (error * loss_weights(alphas[t], c["prediction"], c["min_snr_gamma"])).mean(), {}

    return loss_fn


def train_diffusion(
    dataset,
    out: str | Path,
    config: Mapping | None = None,
    *,
    seed: int = 0,
    val_dataset=None,
    checkpoint_dir: str | Path | None = None,
    autoencoder: str | Path | None = None,
    accelerator=None,
) -> dict:
    """Train the `diffusion` config section's model on `dataset` (items: image in [-1, 1], cond,
    label); in latent space on the frozen autoencoder at `autoencoder`. Writes out/model,
    out/loss.csv and out/samples/step-<n>.png."""
    c = section_defaults("diffusion", config)
    out = Path(out)
    shapes = check_dataset(dataset)
    if "cond" not in shapes:
        raise TrainingError("diffusion training items need a 'cond' conditioning map")
    if c["num_classes"] and "label" not in dataset[0]:
        raise TrainingError(f"diffusion.num_classes={c['num_classes']} needs a 'label' in every training item")
    (channels, height, width), cond_channels = shapes["image"], shapes["cond"][0]
    if c["space"] not in ("pixel", "latent"):
        raise TrainingError(f"diffusion.space must be 'pixel' or 'latent', got {c['space']!r}")

    ae, ae_record = None, None
    if c["space"] == "latent":
        if autoencoder is None:
            raise TrainingError(
                "diffusion.space is 'latent' but no autoencoder was given (--autoencoder / autoencoder=)"
            )
        ae = load_autoencoder(autoencoder)
        ae_record = {"path": str(Path(autoencoder).resolve()), "sha256": content_hash(autoencoder)}
        channels, height, width = ae.config.latent_channels, height // latent_factor(ae), width // latent_factor(ae)
    multiple = 2 ** (len(c["multipliers"]) - 1)
    if height % multiple or width % multiple:
        raise TrainingError(
            f"{c['space']} size {height}x{width} must be divisible by 2^(levels-1) = {multiple} "
            f"(diffusion.multipliers has {len(c['multipliers'])} levels)"
        )

    seed_everything(seed)
    model = build_model(c, channels, cond_channels, height)
    scheduler = train_scheduler(c)
    log.info(
        "diffusion model (%s, %s space): %.2fM parameters, input %dx%dx%d, cond %d channels",
        c["conditioning"],
        c["space"],
        parameter_count(model) / 1e6,
        channels,
        height,
        width,
        cond_channels,
    )
    accelerator = accelerator or make_accelerator(c["train"])
    device = accelerator.device
    if ae is not None:
        ae.to(device)
    alphas = scheduler.alphas_cumprod.to(device)
    null_class = c["num_classes"]

    loss_fn = denoising_loss(c, scheduler, alphas, ae)
    preview = _preview_batch(
        val_dataset if val_dataset is not None and len(val_dataset) else dataset, c["train"]["sample_count"]
    )
    preview_sampler = make_sampler(c["train"]["sample_sampler"], scheduler.config)

    def on_step(step, eval_model):
        every = c["train"]["sample_every"]
        if not every or (step % every and step != c["train"]["steps"]):
            return
        was_training = eval_model.training
        eval_model.eval()
        generator = torch.Generator(device).manual_seed(derive_seed(seed, "preview"))
        labels = preview["label"].to(device) if null_class else None
        with autocast(device):
            images = sample(
                eval_model,
                preview_sampler,
                preview["cond"].to(device),
                labels,
                steps=c["train"]["sample_steps"],
                guidance=c["train"]["sample_guidance"],
                generator=generator,
                autoencoder=ae,
            )
        eval_model.train(was_training)
        save_grid([preview["image"], images.float().cpu()], out / "samples" / f"step-{step}.png")

    run_config = {
        **c,
        "seed": seed,
        "autoencoder": ae_record,
        "data": {"items": len(dataset), "image": list(shapes["image"]), "cond": list(shapes["cond"])},
    }
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
        on_step=on_step,
        desc="diffusion",
    )
    if not accelerator.is_main_process:
        return {}

    trained = result.ema.model if result.ema is not None else result.model
    meta = {
        "conditioning": c["conditioning"],
        "space": c["space"],
        "image_channels": shapes["image"][0],
        "image_size": list(shapes["image"][1:]),
        "cond_channels": cond_channels,
        "num_classes": c["num_classes"],
        "autoencoder": ae_record,
        "weights": "ema" if result.ema is not None else "raw",
        "steps": result.step,
        "parameters": parameter_count(trained),
        "training": json.loads(json.dumps(run_config, default=str)),
    }
    with atomic_dir(out / "model") as tmp:
        trained.save_pretrained(tmp)
        scheduler.save_pretrained(tmp)
        (tmp / MODEL_INFO).write_text(json.dumps(meta, indent=2))
    return {
        "model": str(out / "model"),
        "loss_csv": str(result.loss_csv),
        "steps": result.step,
        "parameters": meta["parameters"],
    }


def main(argv: list[str] | None = None) -> int:
    return cli("diffusion", train_diffusion, argv)


if __name__ == "__main__":
    sys.exit(main())
