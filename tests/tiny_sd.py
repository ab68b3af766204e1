"""A tiny, randomly initialised Stable Diffusion written in diffusers layout, built from configs.

Tests of the Stable Diffusion fine-tuning and sampling code need a real pipeline folder, but no
hub access: `write_tiny_stable_diffusion` writes one (U-Net, VAE, CLIP text encoder, byte-level
BPE tokenizer, scheduler) that `StableDiffusionPipeline.from_pretrained(folder,
local_files_only=True)` loads offline and runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # tokens per prompt, as in SD 1.5
VAE_CHANNELS = (16, 32, 32)  # three blocks: the VAE downsamples by 2 ** 2 = 4


def _byte_characters() -> list[str]:
    """The 256 printable characters that byte-level BPE stands the bytes 0-255 for (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def _write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per byte (plus its end-of-word form) and no merges."""
    chars = _byte_characters()
    vocab = {token: i for i, token in enumerate([*chars, *(c + "</w>" for c in chars), BOS, EOS])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_tiny_stable_diffusion(folder: Path, *, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny random Stable Diffusion pipeline to `folder` (StableDiffusionPipeline.save_pretrained layout).

    Every model is seeded with `seed`, so equal seeds write equal weights. The pipeline makes
    `sample_size` px images (a multiple of 8) from `sample_size // 4` px, 4-channel latents, has
    SD 1.5's noise schedule and no safety checker or feature extractor.
    """
    folder = Path(folder)
    tokenizer = _write_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2 ** (len(VAE_CHANNELS) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder
