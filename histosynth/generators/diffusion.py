"""Stage train_diffusion: a noise-predicting U-Net conditioned on the mask, in pixel or latent space.

`conditioning: spade` -> SpadeUNet (diffusers ResnetBlock2D encoder, self-attention at the
bottleneck, SPADE decoder); `conditioning: concat` -> diffusers UNet2DModel on [x_t, cond]
(segmentation-guided diffusion). Both sit behind `model_output`, and `sample` is the one sampling
loop (DDPM, DDIM, DPM-Solver++) that training previews and the synthesis stage use.

    python -m histosynth.generators.diffusion train --config CONFIG --out DIR --dataset MODULE:FUNC --index ... [--autoencoder AE]

Outputs in DIR: model/ (save_pretrained of the EMA weights + scheduler_config.json +
histosynth.json with conditioning, space, autoencoder path and hash, training config), loss.csv,
samples/step-<n>.png (real row, then EMA samples for the same masks).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from histosynth.config import section_defaults
from histosynth.data.io import atomic_dir
from histosynth.device import autocast, derive_seed, seed_everything
from histosynth.generators.autoencoder import (
    content_hash,
    decode,
    encode,
    latent_factor,
    load_autoencoder,
)
from histosynth.generators.spade import SPADE, SPADEResBlock, _groups
from histosynth.generators.training import (
    TrainingError,
    check_dataset,
    cli,
    collate,
    fit,
    make_accelerator,
    save_grid,
)

log = logging.getLogger("histosynth.generators.diffusion")  # not __main__ under python -m
META_FILE = "histosynth.json"


# ----------------------------------------------------------------------------- the SPADE U-Net

class SpadeUNet(ModelMixin, ConfigMixin):
    """Noise-predicting U-Net: ResnetBlock2D encoder, ResnetBlock2D + self-attention bottleneck,
    SPADEResBlock decoder conditioned on the mask, SPADE output norm. forward(x_t, t, cond, labels)."""

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int | None = None, cond_channels: int = 1,
                 sample_size: int = 64, block_out_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                 attention: bool = True, attention_head_dim: int = 32, norm_num_groups: int = 32,
                 spade_hidden: int = 64, dropout: float = 0.0, num_classes: int = 0):
        super().__init__()
        if out_channels is None:
            out_channels = in_channels
            self.register_to_config(out_channels=out_channels)
        widths = list(block_out_channels)
        temb = 4 * widths[0]
        groups = lambda *chs: _groups(math.gcd(*chs), norm_num_groups)  # noqa: E731

        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(widths[0], temb)
        self.class_embedding = nn.Embedding(num_classes + 1, temb) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)

        self.down = nn.ModuleList()
        skips, width = [widths[0]], widths[0]
        for level, out in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(layers_per_block):
                blocks.append(ResnetBlock2D(in_channels=width, out_channels=out, temb_channels=temb,
                                            groups=groups(width, out), dropout=dropout, eps=1e-6))
                width = out
                skips.append(width)
            if level < len(widths) - 1:
                blocks.append(Downsample2D(width, use_conv=True, out_channels=width, padding=1, name="op"))
                skips.append(width)
            self.down.append(blocks)

        self.mid1 = ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=temb, groups=groups(width), eps=1e-6)
        self.mid_attention = Attention(width, heads=max(1, width // attention_head_dim), dim_head=min(attention_head_dim, width),
                                       norm_num_groups=groups(width), residual_connection=True, bias=True,
                                       upcast_softmax=True, eps=1e-6, _from_deprecated_attn_block=True) if attention else None
        self.mid2 = ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=temb, groups=groups(width), eps=1e-6)

        self.up = nn.ModuleList()
        for level, out in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                skip = skips.pop()
                blocks.append(SPADEResBlock(width + skip, out, temb, cond_channels, spade_hidden,
                                            groups(width + skip, out), dropout))
                width = out
            if level > 0:
                blocks.append(Upsample2D(width, use_conv=True, out_channels=width))
            self.up.append(blocks)

        self.norm_out = SPADE(width, cond_channels, spade_hidden, groups(width))
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, cond: torch.Tensor, class_labels: torch.Tensor | None = None):
        n, multiple = sample.shape[0], 2 ** (len(self.config.block_out_channels) - 1)
        if sample.shape[-1] % multiple or sample.shape[-2] % multiple:
            raise ValueError(f"SpadeUNet input {sample.shape[-2]}x{sample.shape[-1]} must be divisible by {multiple}")
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(n)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((n,), self.config.num_classes, device=sample.device, dtype=torch.long)
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)

        h = self.conv_in(sample)
        skips = [h]
        for blocks in self.down:
            for block in blocks:
                h = block(h) if isinstance(block, Downsample2D) else block(h, emb)
                skips.append(h)
        h = self.mid2(self._attend(self.mid1(h, emb)), emb)
        for blocks in self.up:
            for block in blocks:
                h = block(h) if isinstance(block, Upsample2D) else block(torch.cat([h, skips.pop()], 1), emb, cond)
        return self.conv_out(F.silu(self.norm_out(h, cond)))

    def _attend(self, h):
        return self.mid_attention(h) if self.mid_attention is not None else h


# ----------------------------------------------------------------------------- one interface for both

def _core(model):
    return getattr(model, "module", model)  # under DDP


def num_classes(model) -> int:
    core = _core(model)
    if isinstance(core, SpadeUNet):
        return core.config.num_classes
    return (core.config.num_class_embeds or 1) - 1


def model_output(model, x_t: torch.Tensor, t, cond: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The model's prediction (noise, or v under v-prediction) for x_t at t given the mask `cond`
    (same spatial size as x_t) and optional class labels (None: the null class)."""
    if labels is None and num_classes(model):
        labels = torch.full((len(x_t),), num_classes(model), device=x_t.device, dtype=torch.long)
    if isinstance(_core(model), SpadeUNet):
        return model(x_t, t, cond, labels)
    t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(len(x_t))
    return model(torch.cat([x_t, cond.to(x_t.dtype)], 1), t, class_labels=labels).sample


def guided_output(model, x_t, t, cond, labels=None, guidance: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance on the model output: out_u + g (out_c - out_u), the unconditional
    pass with the mask zeroed and the null label (as in training's condition dropout); g = 1: one
    conditional pass."""
    if guidance == 1.0:
        return model_output(model, x_t, t, cond, labels)
    null = None
    if num_classes(model):
        null = torch.full((len(x_t),), num_classes(model), device=x_t.device, dtype=torch.long)
        labels = null if labels is None else labels
    t = torch.as_tensor(t, device=x_t.device)
    t = t.repeat(2) if t.numel() > 1 else t
    out = model_output(model, torch.cat([x_t, x_t]), t, torch.cat([cond, torch.zeros_like(cond)]),
                       None if null is None else torch.cat([labels, null]))
    conditional, unconditional = out.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def noise_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: torch.Tensor, prediction: str) -> torch.Tensor:
    """The noise estimate behind a model output: the output itself for epsilon prediction, and
    sqrt(a) v + sqrt(1 - a) x_t for v-prediction (a = alpha_cumprod at the step)."""
    if prediction == "epsilon":
        return output
    if prediction == "v_prediction":
        a = alpha_cumprod.to(x_t.device, x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    raise ValueError(f"prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")


def resize_cond(cond: torch.Tensor, size) -> torch.Tensor:
    return cond if tuple(cond.shape[-2:]) == tuple(size) else F.interpolate(cond, size=tuple(size), mode="nearest")


@torch.no_grad()
def sample(model, scheduler, cond: torch.Tensor, labels: torch.Tensor | None = None, *, steps: int = 50,
           guidance: float = 1.0, generator: torch.Generator | None = None, autoencoder=None,
           init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Images in [-1, 1] for the masks `cond` (N, C, H, W) with any diffusers scheduler (DDPM,
    DDIM, DPMSolverMultistep); in latent space pass the autoencoder: cond is resized to the latent
    size and the result decoded. With `init` (N, 3, H, W images in [-1, 1]) and strength < 1 the
    run starts from init noised to that level (SDEdit): only the last round(steps * strength)
    steps are taken; strength 1 starts from pure noise."""
    from diffusers.utils.torch_utils import randn_tensor

    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    size = cond.shape[-2:] if autoencoder is None else [s // latent_factor(autoencoder) for s in cond.shape[-2:]]
    cond = resize_cond(cond, size)
    scheduler.set_timesteps(steps, device=cond.device)
    x = randn_tensor((len(cond), _core(model).config.out_channels, *size), generator=generator, device=cond.device)
    timesteps = scheduler.timesteps
    if init is not None and strength < 1:
        skipped = (steps - max(1, round(steps * strength))) * scheduler.order
        timesteps = timesteps[skipped:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skipped)
        start = encode(autoencoder, init).float() if autoencoder is not None else init.to(x.dtype)
        x = scheduler.add_noise(start, x, timesteps[:1].repeat(len(x)))
    else:
        x = x * scheduler.init_noise_sigma
    for t in timesteps:
        out = guided_output(model, scheduler.scale_model_input(x, t), t, cond, labels, guidance)
        x = scheduler.step(out.float(), t, x, generator=generator).prev_sample
    return decode(autoencoder, x) if autoencoder is not None else x.clamp(-1, 1)


# ----------------------------------------------------------------------------- building and loading

def build_model(config: Mapping, image_channels: int, cond_channels: int, sample_size: int):
    """SpadeUNet or UNet2DModel (concat) from the `diffusion` config section."""
    from diffusers import UNet2DModel

    c = section_defaults("diffusion", config)
    widths = tuple(int(c["channels"] * m) for m in c["multipliers"])
    if c["conditioning"] == "spade":
        return SpadeUNet(in_channels=image_channels, cond_channels=cond_channels, sample_size=sample_size,
                         block_out_channels=widths, layers_per_block=c["layers_per_block"], attention=c["attention"],
                         attention_head_dim=c["attention_head_dim"], norm_num_groups=c["norm_groups"],
                         spade_hidden=c["spade_hidden"], dropout=c["dropout"], num_classes=c["num_classes"])
    if c["conditioning"] == "concat":
        bad = [w for w in widths if w % c["norm_groups"]]
        if bad:
            raise TrainingError(f"diffusion.norm_groups={c['norm_groups']} must divide every width; {bad} do not")
        return UNet2DModel(sample_size=sample_size, in_channels=image_channels + cond_channels, out_channels=image_channels,
                           block_out_channels=widths, layers_per_block=c["layers_per_block"],
                           down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
                           add_attention=c["attention"], attention_head_dim=c["attention_head_dim"],
                           norm_num_groups=c["norm_groups"], dropout=c["dropout"],
                           num_class_embeds=c["num_classes"] + 1 if c["num_classes"] else None)
    raise TrainingError(f"diffusion.conditioning must be 'spade' or 'concat', got {c['conditioning']!r}")


PREDICTIONS = ("epsilon", "v_prediction")


def train_scheduler(config: Mapping):
    """The DDPM noise schedule of training (linear betas 1e-4..0.02 over 1000 steps by default) and
    what the model predicts (its prediction_type, which every sampler built from it inherits)."""
    from diffusers import DDPMScheduler

    c = section_defaults("diffusion", config)
    s = c["scheduler"]
    if c["prediction"] not in PREDICTIONS:
        raise TrainingError(f"diffusion.prediction must be one of {PREDICTIONS}, got {c['prediction']!r}")
    return DDPMScheduler(num_train_timesteps=s["timesteps"], beta_start=s["beta_start"], beta_end=s["beta_end"],
                         beta_schedule=s["beta_schedule"], prediction_type=c["prediction"], clip_sample=c["space"] == "pixel")


SAMPLERS = ("ddpm", "ddim", "dpmsolver++")


def make_sampler(name: str, scheduler_config):
    """A sampling scheduler sharing the training noise schedule: ddpm | ddim | dpmsolver++."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name == "ddpm":
        return DDPMScheduler.from_config(scheduler_config)
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++")
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Diffusion:
    """A trained diffusion model ready to sample: model (eval), its training scheduler, the
    autoencoder (latent space) or None, and histosynth.json's metadata."""
    model: nn.Module
    scheduler: object
    autoencoder: nn.Module | None
    meta: dict


def load_diffusion(path: str | Path, autoencoder: str | Path | None = None, device=None) -> Diffusion:
    """Load model/ as written by train_diffusion. A latent model needs its autoencoder: the recorded
    path (or `autoencoder`), whose content hash must match the one recorded at training."""
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise TrainingError(f"{path} is not a histosynth diffusion model (no {META_FILE})")
    meta = json.loads(meta_file.read_text())
    cls = SpadeUNet if meta["conditioning"] == "spade" else UNet2DModel
    model = cls.from_pretrained(path).eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(path)
    ae = None
    if meta["space"] == "latent":
        recorded = meta["autoencoder"]
        ae_path = Path(autoencoder or recorded["path"])
        if not (ae_path / "config.json").is_file():
            raise TrainingError(f"{path} is a latent-space model trained on the autoencoder {recorded['path']} "
                                f"(sha256 {recorded['sha256'][:12]}…), which is not at {ae_path}; pass its folder")
        found = content_hash(ae_path)
        if found != recorded["sha256"]:
            raise TrainingError(f"{path} was trained on autoencoder sha256 {recorded['sha256'][:12]}…, but {ae_path} "
                                f"has sha256 {found[:12]}…; use the autoencoder it was trained with")
        ae = load_autoencoder(ae_path)
    if device is not None:
        model = model.to(device)
        ae = ae.to(device) if ae is not None else None
    return Diffusion(model, scheduler, ae, meta)


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


def train_diffusion(dataset, out: str | Path, config: Mapping | None = None, *, seed: int = 0, val_dataset=None,
                    checkpoint_dir: str | Path | None = None, autoencoder: str | Path | None = None,
                    accelerator=None) -> dict:
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
            raise TrainingError("diffusion.space is 'latent' but no autoencoder was given (--autoencoder / autoencoder=)")
        ae = load_autoencoder(autoencoder)
        ae_record = {"path": str(Path(autoencoder).resolve()), "sha256": content_hash(autoencoder)}
        channels, height, width = ae.config.latent_channels, height // latent_factor(ae), width // latent_factor(ae)
    multiple = 2 ** (len(c["multipliers"]) - 1)
    if height % multiple or width % multiple:
        raise TrainingError(f"{c['space']} size {height}x{width} must be divisible by 2^(levels-1) = {multiple} "
                            f"(diffusion.multipliers has {len(c['multipliers'])} levels)")

    seed_everything(seed)
    model = build_model(c, channels, cond_channels, height)
    scheduler = train_scheduler(c)
    log.info("diffusion model (%s, %s space): %.2fM parameters, input %dx%dx%d, cond %d channels",
             c["conditioning"], c["space"], parameter_count(model) / 1e6, channels, height, width, cond_channels)
    accelerator = accelerator or make_accelerator(c["train"])
    device = accelerator.device
    if ae is not None:
        ae.to(device)
    alphas = scheduler.alphas_cumprod.to(device)
    null_class = c["num_classes"]

    def loss_fn(model, batch):
        x, cond = batch["image"], batch["cond"]
        if ae is not None:
            with torch.no_grad():
                x = encode(ae, x).float()
            cond = resize_cond(cond, x.shape[-2:])
        n = len(x)
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=x.device)
        a = alphas[t].view(n, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        drop = torch.rand(n, device=x.device) < c["cond_dropout"]
        cond = cond * (~drop).view(n, 1, 1, 1).to(cond.dtype)
        labels = torch.where(drop, null_class, batch["label"].long()) if null_class else None
        target = noise if c["prediction"] == "epsilon" else scheduler.get_velocity(x, noise, t)
        error = (model_output(model, x_t, t, cond, labels).float() - target).pow(2).mean(dim=(1, 2, 3))
        return (error * loss_weights(alphas[t], c["prediction"], c["min_snr_gamma"])).mean(), {}

    preview = _preview_batch(val_dataset if val_dataset is not None and len(val_dataset) else dataset, c["train"]["sample_count"])
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
            images = sample(eval_model, preview_sampler, preview["cond"].to(device), labels, steps=c["train"]["sample_steps"],
                            guidance=c["train"]["sample_guidance"], generator=generator, autoencoder=ae)
        eval_model.train(was_training)
        save_grid([preview["image"], images.float().cpu()], out / "samples" / f"step-{step}.png")

    run_config = {**c, "seed": seed, "autoencoder": ae_record,
                  "data": {"items": len(dataset), "image": list(shapes["image"]), "cond": list(shapes["cond"])}}
    result = fit(model, loss_fn, dataset, out, settings=c["train"], run_config=run_config, seed=seed,
                 accelerator=accelerator, checkpoint_dir=checkpoint_dir, on_step=on_step, desc="diffusion")
    if not accelerator.is_main_process:
        return {}

    trained = result.ema.model if result.ema is not None else result.model
    meta = {"conditioning": c["conditioning"], "space": c["space"], "image_channels": shapes["image"][0],
            "image_size": list(shapes["image"][1:]), "cond_channels": cond_channels, "num_classes": c["num_classes"],
            "autoencoder": ae_record, "weights": "ema" if result.ema is not None else "raw", "steps": result.step,
            "parameters": parameter_count(trained), "training": json.loads(json.dumps(run_config, default=str))}
    with atomic_dir(out / "model") as tmp:
        trained.save_pretrained(tmp)
        scheduler.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return {"model": str(out / "model"), "loss_csv": str(result.loss_csv), "steps": result.step,
            "parameters": meta["parameters"]}


def main(argv: list[str] | None = None) -> int:
    return cli("diffusion", train_diffusion, argv)


if __name__ == "__main__":
    sys.exit(main())
