"""The LoRA-adapted Stable Diffusion of rule train_lora: frozen base parts, adapters on the attention projections."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from histosynth.generators.base_model import LoraError
from histosynth.training.batches import batch_draw

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora.py
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's attention projections


def _load_parts(folder: Path) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        "scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
    }


def _randn_rows(like: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """draw(m) for batch_draw: m items of N(0, 1) noise shaped and laid out in memory as `like`'s (the VAE's latents
    may come channels_last): torch.randn_like(like)'s values for m = len(like)."""
    channels_last = (
        like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return lambda m: torch.randn_like(
        torch.empty((m, *like.shape[1:]), dtype=like.dtype, device=like.device, memory_format=layout)
    )


class LoraStableDiffusion(ModelMixin, ConfigMixin):
    """The base U-Net, VAE and text encoder, frozen, with LoRA adapters on the attention
    projections. Its state_dict holds the LoRA weights alone, so checkpoints are small and a
    checkpoint loads onto a freshly built base model."""

    @register_to_config
    def __init__(
        self,
        base_model: str,
        rank: int = 4,
        alpha: float | None = None,
        text_encoder_lora: bool = True,
        prompts: dict | None = None,
        labels: list | None = None,
    ):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        parts = _load_parts(Path(base_model))
        self.unet, self.vae, self.text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
        self.tokenizer, self.noise_scheduler = parts["tokenizer"], parts["scheduler"]
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        alpha = rank if alpha is None else alpha
        self.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
        )
        if text_encoder_lora:  # peft directly: transformers' add_adapter wants a newer peft than diffusers needs
            inject_adapter_in_model(
                LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_TARGETS),
                self.text_encoder,
            )
        names = list(labels or [])
        ids = self.tokenizer(
            [prompts[name] for name in names],
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        self.register_buffer("prompt_ids", ids, persistent=False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The denoising loss of images (B, 3, H, W) in [-1, 1] under their labels' prompts: the
        U-Net's noise (or v) prediction against the truth at random timesteps, in latent space.
        A forward, so that DistributedDataParallel sees the whole step."""
        n = len(images)
        with (
            torch.no_grad()
        ):  # the posterior's sample, the noise and the timesteps per item of the global batch (batch_draw)
            posterior = self.vae.encode(images).latent_dist
            shape, device, dtype = posterior.mean.shape[1:], posterior.mean.device, posterior.mean.dtype
            eps = batch_draw(lambda m: torch.randn(m, *shape, device=device, dtype=dtype), n)
            latents = (posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor
        noise = batch_draw(_randn_rows(latents), n)
        steps = batch_draw(
            lambda m: torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (m,), device=latents.device), n
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        with torch.set_grad_enabled(self.config.text_encoder_lora and torch.is_grad_enabled()):
            states = self.text_encoder(self.prompt_ids[labels])[0]
        prediction = self.unet(noisy, steps, states).sample
        v = self.noise_scheduler.config.prediction_type == "v_prediction"
        target = self.noise_scheduler.get_velocity(latents, noise, steps) if v else noise
        return F.mse_loss(prediction.float(), target.float())

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def lora_parameters(self, part: str) -> list[torch.nn.Parameter]:
        return [p for name, p in getattr(self, part).named_parameters() if "lora_" in name]

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if "lora_" in k}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        expected = set(self.state_dict())
        if strict and set(state_dict) != expected:
            raise LoraError(
                f"LoRA weights do not fit this adapter (rank, targets or text encoder differ): "
                f"{len(expected - set(state_dict))} missing, {len(set(state_dict) - expected)} unexpected"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def pipeline(self, scheduler=None):
        """A StableDiffusionPipeline on these (adapted) parts, Euler ancestral unless `scheduler`."""
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

        scheduler = scheduler or EulerAncestralDiscreteScheduler.from_config(self.noise_scheduler.config)
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
