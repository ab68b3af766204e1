"""Spatially-adaptive normalisation (SPADE, Park et al. 2019) and the residual block that the
diffusion U-Net's decoder is built from (Wang et al.'s semantic diffusion model).

The conditioning map (one-hot region classes, nucleus classes, boundaries: opaque channels here)
is resized (nearest) to each feature map, so one map conditions every resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int, groups: int) -> int:
    """The largest group count <= `groups` that divides `channels` (GroupNorm needs a divisor)."""
    groups = max(1, min(groups, channels))
    while channels % groups:
        groups -= 1
    return groups


class SPADE(nn.Module):
    """out = norm(x) * (1 + gamma(cond)) + beta(cond), norm = GroupNorm without affine parameters,
    gamma and beta predicted per pixel from the conditioning map by a small conv net."""

    def __init__(self, channels: int, cond_channels: int, hidden: int = 128, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels, groups), channels, eps=eps, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, size=x.shape[-2:], mode="nearest")
        features = self.shared(cond.to(x.dtype))
        return self.norm(x) * (1 + self.gamma(features)) + self.beta(features)


class SPADEResBlock(nn.Module):
    """SPADE -> SiLU -> conv, + timestep embedding, SPADE -> SiLU -> dropout -> conv, + skip
    (a 1x1 conv when the channel count changes)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        cond_channels: int,
        hidden: int = 128,
        groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = SPADE(in_channels, cond_channels, hidden, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = SPADE(out_channels, cond_channels, hidden, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, cond)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h, cond))))
        return self.skip(x) + h
