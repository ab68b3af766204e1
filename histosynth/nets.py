"""Networks and transforms shared by the stages, all loaded from local files (nothing here
downloads): the smp U-Net builder, ImageNet normalisation, the 8 symmetries of the square,
timm feature encoders, torch-fidelity's InceptionV3 and torchmetrics' LPIPS."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histosynth.device import pick_device
from histosynth.weights import WEIGHTS, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEGMENTATION = "segmentation"  # quality.extractor naming the space of the segmenter trained downstream


class WeightsError(RuntimeError):
    """A local weights file that is missing or does not fit the network it is loaded into."""


class FeatureError(ValueError):
    """A feature extractor that cannot be built from the given model or weights."""


# ----------------------------------------------------------------------------- transforms


def normalise(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, (x / 255 - mean) / std per channel; ImageNet's by default (the encoders' convention)."""
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def random_ops(n: int, generator: torch.Generator) -> torch.Tensor:
    """n ops of `dihedral` drawn uniformly from `generator`."""
    return torch.randint(0, 8, (n,), generator=generator)


def dihedral(images, ops, axes: tuple[int, int] = (-2, -1)):
    """Each item of `images` (a torch tensor or numpy array, items along axis 0, square in `axes`)
    turned by its op in 0..7, one of the 8 symmetries of the square: mirrored along axes[1] when
    op >= 4, then rotated op % 4 quarter turns from axes[0] towards axes[1]. ops: one per item."""
    if isinstance(images, torch.Tensor):
        ops = torch.as_tensor(ops, device=images.device).view(-1, *[1] * (images.ndim - 1))
        flipped = torch.where(ops >= 4, images.flip(axes[1]), images)
        out = flipped
        for quarter in (1, 2, 3):
            out = torch.where(ops % 4 == quarter, torch.rot90(flipped, quarter, axes), out)
        return out
    item_axes = tuple(a - 1 if a > 0 else a for a in axes)
    return np.stack(
        [
            np.rot90(np.flip(x, item_axes[1]) if op & 4 else x, op & 3, item_axes)
            for x, op in zip(images, ops, strict=True)
        ]
    )


# ----------------------------------------------------------------------------- networks


def unet(encoder: str, depth: int, decoder_channels: Sequence[int], n_classes: int, attention: str | None = None):
    """smp's U-Net with random weights (pretrained ones are loaded separately, so a saved config
    never asks smp to download)."""
    import segmentation_models_pytorch as smp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return smp.Unet(
            encoder_name=encoder,
            encoder_depth=depth,
            encoder_weights=None,
            decoder_channels=list(decoder_channels),
            decoder_attention_type=attention,
            classes=n_classes,
        )


@dataclass(frozen=True)
class FeatureExtractor:
    name: str  # written into every quality row that uses it
    embed: Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, 3, H, W) -> float (N, D)


def timm_encoder(model_name: str, weights: str | Path | None, device: str | torch.device = "auto") -> FeatureExtractor:
    """A timm model's pooled features (num_classes=0) with weights from a local file (.safetensors,
    .pth, .bin; a classifier head in the file is ignored), normalised as its pretrained config says."""
    import timm

    if not weights:
        raise FeatureError(
            f"quality.extractor={model_name!r} needs quality.extractor_weights: a local weights file "
            "for that timm model (nothing is downloaded)"
        )
    path = Path(weights)
    if not path.is_file():
        raise FeatureError(
            f"quality.extractor_weights={weights}: no such file (the weights of timm model {model_name!r})"
        )
    try:
        net = timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as err:
        raise FeatureError(f"quality.extractor={model_name!r} is not a timm model name ({err})") from err
    missing, _ = net.load_state_dict(read_state_dict(path), strict=False)
    if missing:
        raise FeatureError(
            f"{path} does not fit timm model {model_name!r}: {len(missing)} weights missing, e.g. {missing[:3]}"
        )
    device = device if isinstance(device, torch.device) else pick_device(device)
    net = net.eval().to(device)
    cfg = net.pretrained_cfg or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        return net(normalise(images.to(device), mean, std)).float().cpu()

    return FeatureExtractor(f"timm {model_name} ({path})", embed)


def load_inception(path: str | Path, feature: int):
    """torch-fidelity's InceptionV3 with weights from `path`, giving (pool features, unbiased logits)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if str(feature) not in ("64", "192", "768", "2048"):
        raise ValueError(f"quality.feature must be 64, 192, 768 or 2048, got {feature}")
    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(feature), "logits_unbiased"], feature_extractor_weights_path=str(path)
        )
    except RuntimeError as err:
        raise WeightsError(
            f"{path}: not an InceptionV3 state dict for torch-fidelity ({err}); "
            f"replace it with {WEIGHTS['inception'].url}"
        ) from err
    return net.eval()


@torch.no_grad()
def inception_embeddings(images: torch.Tensor, net, device=None) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) float64 arrays of uint8 (N, 3, H, W) images (one batch)."""
    device = device or next(net.parameters()).device
    features, logits = net.to(device)(images.to(device))
    return features.double().cpu().numpy(), logits.double().cpu().numpy()


def load_lpips(path: str | Path, net: str = "alex") -> torch.nn.Module:
    """torchmetrics' LPIPS network with weights from `path`, never downloading: either a full
    LPIPS state dict (keys net.slice*, lin*) or a torchvision backbone state dict (keys features.*,
    combined with the linear layers torchmetrics ships)."""
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    lpips = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)  # random backbone, shipped linear layers
    state = read_state_dict(path)
    if any(k.startswith("features.") for k in state):  # torchvision `features` -> LPIPS slices
        layer = re.compile(r"^net\.(?:slice\d+|slices\.\d+)\.(\d+)\.(.+)$")
        state = {name: state[f"features.{m[1]}.{m[2]}"] for name in lpips.state_dict() if (m := layer.match(name))}
    missing = [k for k in lpips.load_state_dict(state, strict=False).missing_keys if k.startswith("net.")]
    if missing:
        expected = (
            f"a torchvision AlexNet state dict such as {WEIGHTS['lpips'].url}"
            if net == "alex"
            else f"a torchvision {net} state dict"
        )
        raise WeightsError(f"{path}: not LPIPS/{net} weights; missing {missing[:3]}...; expected {expected}")
    return lpips.eval().requires_grad_(False)
