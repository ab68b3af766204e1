"""The local Stable Diffusion folder the LoRA stages build on, checked without loading torch (the
workflow checks it when it starts): every part of a diffusers layout present, the optional
dependencies installed, and its content hash."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from histosynth.files import folder_hash
from histosynth.training.errors import TrainingError

# what a diffusers Stable Diffusion folder must hold: {part: files one of which must exist there}
PARTS = {
    "model_index.json": (),
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}
WEIGHTED = ("unet", "vae", "text_encoder")
HOW_TO_GET = (
    "on a machine with network, save one in diffusers layout and copy the folder here, e.g. "
    'python -c "from diffusers import StableDiffusionPipeline; StableDiffusionPipeline.from_pretrained('
    "'stable-diffusion-v1-5/stable-diffusion-v1-5').save_pretrained('FOLDER')\", or from one checkpoint "
    "file: StableDiffusionPipeline.from_single_file('model.safetensors').save_pretrained('FOLDER')"
)


class LoraError(TrainingError):
    """A base model, prompt or adapter the LoRA stages cannot use."""


def require_extra() -> None:
    """peft and transformers, the optional dependencies of the LoRA stages, or an error naming the extra."""
    missing = [name for name in ("peft", "transformers") if _absent(name)]
    if missing:
        raise LoraError(
            f"the LoRA stages need {' and '.join(missing)}: pip install -e '.[lora]' (or set lora.enabled: false)"
        )


def _absent(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def check_base_model(path: str | Path | None) -> Path:
    """The base model folder, after checking it holds every part of a diffusers Stable Diffusion
    (model_index.json; unet, vae, text_encoder with config and weights; tokenizer; scheduler)."""
    if not path:
        raise LoraError(
            f"lora.base_model is not set: point it at a local Stable Diffusion folder in diffusers layout; {HOW_TO_GET}"
        )
    folder = Path(path)
    if not folder.is_dir():
        raise LoraError(f"lora.base_model={path}: no such folder; {HOW_TO_GET}")
    missing = []
    for part, files in PARTS.items():
        where = folder / part
        if not where.exists():
            missing.append(part)
        elif files and not any((where / f).is_file() for f in files):
            missing.append(f"{part}/{' or '.join(files)}")
    for part in WEIGHTED:
        if (folder / part).is_dir() and not any(
            p.suffix in (".safetensors", ".bin") for p in (folder / part).iterdir()
        ):
            missing.append(f"{part}/ weights (*.safetensors)")
    if missing:
        raise LoraError(
            f"lora.base_model={path} is not a complete Stable Diffusion folder: missing {', '.join(missing)}; "
            f"{HOW_TO_GET}"
        )
    return folder


def base_model_hash(folder: str | Path) -> str:
    """sha256 over the base model's configs, vocabularies and weights (relative names and bytes)."""
    return folder_hash(folder, (".json", ".txt", ".safetensors", ".bin", ".model"), recursive=True)
