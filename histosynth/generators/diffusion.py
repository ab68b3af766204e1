"""The mask-conditioned diffusion model: a noise- (or v-) predicting U-Net in pixel or latent space.

`conditioning: spade` -> SpadeUNet (diffusers ResnetBlock2D encoder, self-attention at the
bottleneck, SPADE decoder); `conditioning: concat` -> diffusers UNet2DModel on [x_t, cond]
(segmentation-guided diffusion). Both sit behind `model_output`; the training noise schedule,
building and loading (model/ folders written by histosynth.generators.train_diffusion) are here,
sampling is in histosynth.generators.sampling.
"""

from __future__ import annotations

import json
import logging
import math
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
from histosynth.files import MODEL_INFO, content_hash
from histosynth.generators.autoencoder import load_autoencoder
from histosynth.generators.spade import SPADE, SPADEResBlock, _groups
from histosynth.training.errors import TrainingError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the SPADE U-Net


class SpadeUNet(ModelMixin, ConfigMixin):
    """Noise-predicting U-Net: ResnetBlock2D encoder, ResnetBlock2D + self-attention bottleneck,
    SPADEResBlock decoder conditioned on the mask, SPADE output norm. forward(x_t, t, cond, labels)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        cond_channels: int = 1,
        sample_size: int = 64,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        attention: bool = True,
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
        spade_hidden: int = 64,
        dropout: float = 0.0,
        num_classes: int = 0,
    ):
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
                blocks.append(
                    ResnetBlock2D(
                        in_channels=width,
                        out_channels=out,
                        temb_channels=temb,
                        groups=groups(width, out),
                        dropout=dropout,
                        eps=1e-6,
                    )
                )
                width = out
                skips.append(width)
            if level < len(widths) - 1:
                blocks.append(Downsample2D(width, use_conv=True, out_channels=width, padding=1, name="op"))
                skips.append(width)
            self.down.append(blocks)

        self.mid1 = ResnetBlock2D(
            in_channels=width, out_channels=width, temb_channels=temb, groups=groups(width), eps=1e-6
        )
        self.mid_attention = (
            Attention(
                width,
                heads=max(1, width // attention_head_dim),
                dim_head=min(attention_head_dim, width),
                norm_num_groups=groups(width),
                residual_connection=True,
                bias=True,
                upcast_softmax=True,
                eps=1e-6,
                _from_deprecated_attn_block=True,
            )
            if attention
            else None
        )
        self.mid2 = ResnetBlock2D(
            in_channels=width, out_channels=width, temb_channels=temb, groups=groups(width), eps=1e-6
        )

        self.up = nn.ModuleList()
        for level, out in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                skip = skips.pop()
                blocks.append(
                    SPADEResBlock(
                        width + skip, out, temb, cond_channels, spade_hidden, groups(width + skip, out), dropout
                    )
                )
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
    """The model under DDP's `module` and torch.compile's `_orig_mod` wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


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


# ----------------------------------------------------------------------------- building and loading


def build_model(config: Mapping, image_channels: int, cond_channels: int, sample_size: int):
    """SpadeUNet or UNet2DModel (concat) from the `diffusion` config section."""
    from diffusers import UNet2DModel

    c = section_defaults("diffusion", config)
    widths = tuple(int(c["channels"] * m) for m in c["multipliers"])
    if c["conditioning"] == "spade":
        return SpadeUNet(
            in_channels=image_channels,
            cond_channels=cond_channels,
            sample_size=sample_size,
            block_out_channels=widths,
            layers_per_block=c["layers_per_block"],
            attention=c["attention"],
            attention_head_dim=c["attention_head_dim"],
            norm_num_groups=c["norm_groups"],
            spade_hidden=c["spade_hidden"],
            dropout=c["dropout"],
            num_classes=c["num_classes"],
        )
    if c["conditioning"] == "concat":
        bad = [w for w in widths if w % c["norm_groups"]]
        if bad:
            raise TrainingError(f"diffusion.norm_groups={c['norm_groups']} must divide every width; {bad} do not")
        return UNet2DModel(
            sample_size=sample_size,
            in_channels=image_channels + cond_channels,
            out_channels=image_channels,
            block_out_channels=widths,
            layers_per_block=c["layers_per_block"],
            down_block_types=("DownBlock2D",) * len(widths),
            up_block_types=("UpBlock2D",) * len(widths),
            add_attention=c["attention"],
            attention_head_dim=c["attention_head_dim"],
            norm_num_groups=c["norm_groups"],
            dropout=c["dropout"],
            num_class_embeds=c["num_classes"] + 1 if c["num_classes"] else None,
        )
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
    return DDPMScheduler(
        num_train_timesteps=s["timesteps"],
        beta_start=s["beta_start"],
        beta_end=s["beta_end"],
        beta_schedule=s["beta_schedule"],
        prediction_type=c["prediction"],
        clip_sample=c["space"] == "pixel",
    )


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
    meta_file = path / MODEL_INFO
    if not meta_file.is_file():
        raise TrainingError(f"{path} is not a histosynth diffusion model (no {MODEL_INFO})")
    meta = json.loads(meta_file.read_text())
    cls = SpadeUNet if meta["conditioning"] == "spade" else UNet2DModel
    model = cls.from_pretrained(path).eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(path)
    ae = None
    if meta["space"] == "latent":
        recorded = meta["autoencoder"]
        ae_path = Path(autoencoder or recorded["path"])
        if not (ae_path / "config.json").is_file():
            raise TrainingError(
                f"{path} is a latent-space model trained on the autoencoder {recorded['path']} "
                f"(sha256 {recorded['sha256'][:12]}…), which is not at {ae_path}; pass its folder"
            )
        found = content_hash(ae_path)
        if found != recorded["sha256"]:
            raise TrainingError(
                f"{path} was trained on autoencoder sha256 {recorded['sha256'][:12]}…, but {ae_path} "
                f"has sha256 {found[:12]}…; use the autoencoder it was trained with"
            )
        ae = load_autoencoder(ae_path)
    if device is not None:
        model = model.to(device)
        ae = ae.to(device) if ae is not None else None
    return Diffusion(model, scheduler, ae, meta)
