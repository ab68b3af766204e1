"""Pretrained weights the workflow reads and never downloads at run time.

Each network's file has a fixed name in the weights folder (config `weights_dir`, default
resources/weights/, where `snakemake fetch_weights` puts them); a per-network config key may name
another file instead. When a file is missing, `weights_file` says which file, where it comes from
and which config key or rule provides it, so the stages needing it skip with that note and the
rest runs. `fetch` is the only network access (rule fetch_weights, a localrule).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsSpec:
    """One downloadable weights file."""

    file: str  # its name in the weights folder
    url: str  # where fetch_weights downloads it from
    key: str  # the config key naming another local copy
    use: str  # what needs it (for messages)


WEIGHTS = {
    "inception": WeightsSpec(
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "quality.inception_weights",
        "FID, KID and IS",
    ),
    "lpips": WeightsSpec(
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "quality.lpips_weights",
        "LPIPS",
    ),
}


def encoder_spec(encoder: str) -> WeightsSpec | None:
    """smp's ImageNet weights of a segmentation encoder (None when smp has none, e.g. tu- encoders)."""
    import segmentation_models_pytorch as smp

    spec = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
    if spec is None or "repo_id" not in spec:
        return None
    url = f"https://huggingface.co/{spec['repo_id']}/resolve/{spec['revision']}/model.safetensors"
    return WeightsSpec(
        f"smp-{encoder}-imagenet.safetensors",
        url,
        "segmentation.encoder_weights_path",
        f"the ImageNet start of encoder {encoder}",
    )


def classifier_spec(model: str) -> WeightsSpec | None:
    """timm's ImageNet weights of a classification model (its default pretrained tag's Hugging Face
    file; None when timm has none on the Hub)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model)
    hub = cfg.hf_hub_id if cfg is not None else None
    if not hub:
        return None
    repo, _, revision = hub.partition("@")
    url = f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/model.safetensors"
    return WeightsSpec(
        f"timm-{model}.safetensors", url, "classification.weights_path", f"the ImageNet start of classifier {model}"
    )


def read_state_dict(path: str | Path) -> dict:
    """A state dict from a weights file, on the CPU: .safetensors, else a torch file (weights only),
    unwrapped from a checkpoint's `state_dict` or `model` entry."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def weights_file(spec: WeightsSpec, configured: str | Path | None, weights_dir: str | Path) -> tuple[Path | None, str]:
    """The file for `spec` and a note: the configured path (which must exist), else
    weights_dir/spec.file when present, else None and how to provide it."""
    if configured:
        path = Path(configured)
        if path.is_file():
            return path, f"weights {path}"
        return None, (
            f"{spec.use} skipped: {spec.key}={configured} does not exist; point {spec.key} at a copy of "
            f"{spec.url} or set it to null to use {Path(weights_dir) / spec.file}"
        )
    path = Path(weights_dir) / spec.file
    if path.is_file():
        return path, f"weights {path}"
    return None, (
        f"{spec.use} skipped: missing {path}; run `snakemake fetch_weights` (downloads {spec.url} there), "
        f"copy that file there, or set {spec.key} to a local copy"
    )


def fetch(spec: WeightsSpec, weights_dir: str | Path, progress: bool = True) -> Path:
    """Download spec's file into weights_dir unless present (needs network)."""
    import torch

    path = Path(weights_dir) / spec.file
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s -> %s", spec.url, path)
        torch.hub.download_url_to_file(spec.url, str(path), progress=progress)
    return path
