"""The networks of the class-conditional GAN (seed 000's Tables 1-4, section 5; seed 001 describes
the same GAN as ResNet blocks with self-attention in both networks): cell-based generator and
discriminator with conditional batch norm, self-attention and spectral norm, held together as one
diffusers model so save_pretrained writes both. Table lines quoted below as "T1 L8" etc. Where a
table is ambiguous or self-contradictory, the comment at the choice says what was taken. Sizes
other than the seed's 64 px remove or add stages at the image end: 4x4xch_max stays, and a w x w
image has log2(w / 4) up- and downsamplings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from histosynth.config import section_defaults
from histosynth.training.errors import TrainingError

SIZES = (16, 32, 64, 128, 256, 512)


# ----------------------------------------------------------------------------- layers


def conv(cin: int, cout: int, kernel: int) -> nn.Module:
    """A spectrally normalised 'same' convolution: seed 000 section 8.1 puts spectral norm on
    "all convolutional, deconvolutional, and linear layers ... in both models"."""
    return spectral_norm(nn.Conv2d(cin, cout, kernel, 1, kernel // 2))


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then a per-class gain and bias (T2 "Conditional Batch
    Norm, number of classes = 4"), gains starting at 1 and biases at 0."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN's attention term (Zhang et al. 2019) as its authors' code (and BigGAN's) computes it:
    queries conv1x1(x) with C/8 channels; keys (C/8) and values (C/2) conv1x1 then 2x2 max-pooled,
    a quarter of the positions; o = conv1x1(softmax(q k^T) v) back to C; the term is gamma * o,
    gamma starting at 0. The tables give only "Self Attention, input channels = C". Only the term:
    the tables add the input themselves (T1 L11 = L8 + L10 + L9: stage input + attention + cell)."""

    def __init__(self, channels: int):
        super().__init__()
        inner, values = max(1, channels // 8), max(1, channels // 2)
        self.query, self.key = conv(channels, inner, 1), conv(channels, inner, 1)
        self.value, self.out = conv(channels, values, 1), conv(values, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape

        def tokens(t):  # (N, 1, positions, channels)
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        q = tokens(self.query(x))
        k, v = tokens(F.max_pool2d(self.key(x), 2)), tokens(F.max_pool2d(self.value(x), 2))
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # SAGAN has no 1/sqrt(d)
        return self.gamma * self.out(o.squeeze(1).transpose(1, 2).reshape(n, -1, h, w))


class CellG(nn.Module):
    """T2 "CELLG Cell Structure", 4 nodes, shape-preserving:
        L1 = BN(ELU(conv3(L0)))              "Conv ELU Batch Norm"
        L2 = L1 + BN(ELU(conv1(conv3(L1))))  "L1 + Conv 3x3 Conv 1x1 ELU Batch Norm"
        L3 = L2 + conv3(L1) + conv3(L0)
    The two identity edges (L1 -> L2, L2 -> L3) are the "two skip connection operations in the
    generator cell" of the text. L2's "Conv 3x3 Conv 1x1" is read as a chain (as L1's "Conv ELU
    Batch Norm" is), not as two parallel edges. T2 repeats "L0: Input L1: Conv ELU Batch Norm"
    after L3 (a layout duplicate of the first rows); it is not a second cell. Plain BatchNorm here:
    the table names the conditional one only in the upsample block."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.norm1 = conv(channels, channels, 3), nn.BatchNorm2d(channels)
        self.conv2a, self.conv2b, self.norm2 = (
            conv(channels, channels, 3),
            conv(channels, channels, 1),
            nn.BatchNorm2d(channels),
        )
        self.conv3_from1, self.conv3_from0 = conv(channels, channels, 3), conv(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l1 = self.norm1(F.elu(self.conv1(x)))
        l2 = l1 + self.norm2(F.elu(self.conv2b(self.conv2a(l1))))
        return l2 + self.conv3_from1(l1) + self.conv3_from0(x)


class CellD(nn.Module):
    """T4 "CELLD Cell Structure", 5 nodes, shape-preserving:
        L1 = BN(ELU(conv3(L0)))
        L2 = L1 + BN(ELU(conv1(conv3(L1))))
        L3 = AvgPool3(L2)
        L4 = L0 + L3 + AvgPool3(L2)
    As the table reads, L4 adds AvgPool3(L2) twice (via L3 and directly), i.e. L0 + 2 AvgPool3(L2);
    the text names max pooling as part of the discriminator's operation set, but no table row uses
    it, so none is used. The pools keep the size ("stride = 1"; padding 1, border pixels averaged
    over the pixels present)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.norm1 = conv(channels, channels, 3), nn.BatchNorm2d(channels)
        self.conv2a, self.conv2b, self.norm2 = (
            conv(channels, channels, 3),
            conv(channels, channels, 1),
            nn.BatchNorm2d(channels),
        )
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l1 = self.norm1(F.elu(self.conv1(x)))
        l2 = l1 + self.norm2(F.elu(self.conv2b(self.conv2a(l1))))
        return x + 2 * self.pool(l2)


class Upsample(nn.Module):
    """T2 "Upsample Block Structure": nearest x2, conv3, conditional BatchNorm, GLU over channels,
    which halves them: conv3 gives 2 * out channels, the GLU `out`."""

    def __init__(self, cin: int, cout: int, num_classes: int):
        super().__init__()
        self.conv = conv(cin, 2 * cout, 3)
        self.norm = ConditionalBatchNorm(2 * cout, num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.glu(self.norm(self.conv(F.interpolate(x, scale_factor=2, mode="nearest")), labels), dim=1)


class Downsample(nn.Module):
    """T4 "Downsample block structure": conv3 (H x W x C -> H x W x 2C), pixel rearrangement
    (pixel unshuffle, H/2 x W/2 x 8C) with a 1x1 conv back to 2C, ELU. "(C 2)" is read as C x 2
    (the x lost in the text, as in T2's "(H 2)"), which T3's doubling widths confirm."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv, self.mix = conv(cin, cout, 3), conv(4 * cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.mix(F.pixel_unshuffle(self.conv(x), 2)))


def generator_widths(size: int, ch_max: int, width: int) -> dict[int, int]:
    """Channels per resolution 4, 8, ..., size. T1: 4x4 and 8x8 have ch_max (1024), then every
    upsampling halves them (512 at 16, 256 at 32, 128 at 64), never below `width`. T2's block is
    the halving one (its conv keeps C, the GLU gives C/2); T1's first upsampling "L5: 8x8x1024"
    keeps the width, so there the conv doubles it and the GLU gives ch_max back."""
    return {r: ch_max if r <= 8 else max(width, ch_max * 8 // r) for r in _resolutions(size)}


def discriminator_widths(size: int, ch_max: int, width: int) -> dict[int, int]:
    """Channels per resolution: T3 doubles them at every downsampling up to 4x4xch_max (64 at 64,
    128 at 32, ..., 1024 at 4), never below `width`."""
    return {r: max(width, ch_max * 4 // r) for r in _resolutions(size)}


def _resolutions(size: int) -> list[int]:
    if size not in SIZES:
        raise TrainingError(f"gan.size must be one of {list(SIZES)} (4 x a power of two), got {size}")
    return [4 * 2**i for i in range(int(math.log2(size // 4)) + 1)]


# ----------------------------------------------------------------------------- the networks


class Generator(nn.Module):
    """T1: z (z_dim) -> transposed conv 4x4 + ELU (L2) -> [CELLG, residual] at 4x4 (L3-L4) ->
    per resolution 8 .. size/2: upsample block, CELLG, self-attention where `attention` lists the
    resolution, residual sum (L5-L14) -> upsample block to size (L15) -> conv3 (L16) -> conv3 to
    RGB (L17) -> tanh. forward(z, labels) -> (N, 3, size, size) in [-1, 1].

    T1 has no activation between L16 and L17, and none is added; the tanh is not in the table (its
    output "64x64x3" must be an image in [-1, 1], like the training images). The class enters
    through the upsample blocks' conditional BatchNorm only, as in T2."""

    def __init__(
        self,
        num_classes: int,
        size: int = 64,
        z_dim: int = 128,
        ch_max: int = 1024,
        width: int = 64,
        attention: Sequence[int] = (16, 32),
    ):
        super().__init__()
        ch = generator_widths(size, ch_max, width)
        self.z_dim, self.size = z_dim, size
        # T1 L2 "Transposed Conv + ELU, kernel = 4, stride = 1, padding = 0": 1x1xz -> 4x4xch_max
        self.stem = spectral_norm(nn.ConvTranspose2d(z_dim, ch[4], 4, 1, 0))
        inner = [r for r in ch if r < size]  # resolutions with a cell: 4 .. size/2
        self.cells = nn.ModuleList(CellG(ch[r]) for r in inner)
        self.ups = nn.ModuleList(Upsample(ch[r // 2], ch[r], num_classes) for r in [*inner[1:], size])
        self.attention = nn.ModuleDict({str(r): SelfAttention(ch[r]) for r in inner if r in attention})
        self.conv_out1, self.conv_out2 = conv(ch[size], ch[size], 3), conv(ch[size], 3, 3)
        self.resolutions = inner

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.stem(z.view(len(z), -1, 1, 1)))
        for i, r in enumerate(self.resolutions):
            if i:
                h = self.ups[i - 1](h, labels)
            c = self.cells[i](h)
            h = h + c + (self.attention[str(r)](c) if str(r) in self.attention else 0)
        h = self.ups[-1](h, labels)
        return torch.tanh(self.conv_out2(self.conv_out1(h)))


class Discriminator(nn.Module):
    """T3: conv3 + ELU (L2) -> per resolution size .. 8: CELLD, self-attention where `attention`
    lists the resolution, residual sum (stage input + attention + cell), downsample block (L3-L16)
    -> 4x4xch_max -> sum over positions -> linear + projection <embedding(y), features> (L17-L19,
    Miyato & Koyama 2018). forward(images, labels) -> (N,) scores.

    T3 gives L8's self-attention "input channels = 64" in a 32x32x128 layer; it runs on the layer's
    128. The projection embedding is spectrally normalised too, as in the projection discriminator."""

    def __init__(
        self, num_classes: int, size: int = 64, ch_max: int = 1024, width: int = 64, attention: Sequence[int] = (32, 64)
    ):
        super().__init__()
        ch = discriminator_widths(size, ch_max, width)
        self.resolutions = [r for r in sorted(ch, reverse=True) if r > 4]  # size .. 8
        self.stem = conv(3, ch[size], 3)
        self.cells = nn.ModuleList(CellD(ch[r]) for r in self.resolutions)
        self.attention = nn.ModuleDict({str(r): SelfAttention(ch[r]) for r in self.resolutions if r in attention})
        self.downs = nn.ModuleList(Downsample(ch[r], ch[r // 2]) for r in self.resolutions)
        self.linear = spectral_norm(nn.Linear(ch[4], 1))
        self.embedding = spectral_norm(nn.Embedding(num_classes, ch[4]))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.stem(images))
        for r, cell, down in zip(self.resolutions, self.cells, self.downs, strict=True):
            c = cell(h)
            h = down(h + c + (self.attention[str(r)](c) if str(r) in self.attention else 0))
        features = h.sum(dim=(2, 3))
        return self.linear(features).squeeze(1) + (self.embedding(labels) * features).sum(1)


class GAN(ModelMixin, ConfigMixin):
    """The generator and discriminator in one model, so that one save_pretrained folder, one EMA and
    one (DDP-wrapped) module carry both. forward is the training pass, so that it goes through
    DDP's forward: forward(z, labels) -> D(T(G(z, labels))) for the generator's step;
    forward(z, labels, real) -> (D(T(real)), D(T(G(z, labels)))) with G under no_grad, for the
    discriminator's step (reals and fakes through D one batch each, so its BatchNorm normalises
    them apart); T = `transform` (DiffAugment) or none. Generate with `.generator`."""

    @register_to_config
    def __init__(
        self,
        num_classes: int = 4,
        size: int = 64,
        z_dim: int = 128,
        ch_max: int = 1024,
        width: int = 64,
        attention_g: tuple[int, ...] = (16, 32),
        attention_d: tuple[int, ...] = (32, 64),
        labels: list[str] | None = None,
    ):
        super().__init__()
        if num_classes < 1 or z_dim < 1 or not 1 <= width <= ch_max:
            raise TrainingError(
                f"GAN needs num_classes >= 1, z_dim >= 1 and 1 <= width <= ch_max; got num_classes="
                f"{num_classes}, z_dim={z_dim}, width={width}, ch_max={ch_max}"
            )
        if labels is not None and len(labels) != num_classes:
            raise TrainingError(f"{len(labels)} label names {labels} for num_classes={num_classes}")
        self.generator = Generator(num_classes, size, z_dim, ch_max, width, attention_g)
        self.discriminator = Discriminator(num_classes, size, ch_max, width, attention_d)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None, transform=None):
        transform = transform or (lambda x: x)
        if real is None:
            return self.discriminator(transform(self.generator(z, labels)), labels)
        with torch.no_grad():
            fake = self.generator(z, labels)
        return self.discriminator(transform(real), labels), self.discriminator(transform(fake), labels)


def build_gan(config: Mapping, num_classes: int, labels: Sequence[str] | None = None) -> GAN:
    """The GAN of the `gan` config section for `num_classes` classes."""
    c = section_defaults("gan", config)
    return GAN(
        num_classes=num_classes,
        size=c["size"],
        z_dim=c["z_dim"],
        ch_max=c["ch_max"],
        width=c["width"],
        attention_g=tuple(c["attention_g"]),
        attention_d=tuple(c["attention_d"]),
        labels=list(labels) if labels is not None else None,
    )


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
