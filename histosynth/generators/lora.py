"""Stages train_lora and lora_synthesize (seed 004): Stable Diffusion fine-tuned with LoRA
adapters on the training patches, one text prompt per label, and sampled per label at one or more
LoRA scales with Euler ancestral steps and classifier-free guidance.

    python -m histosynth.generators.lora train --config CONFIG --out DIR --dataset MODULE:FUNC --index ...

The base model is a local diffusers-layout folder (`lora.base_model`), read with
local_files_only and HF_HUB_OFFLINE=1, never a hub id. Adapters (peft) sit on the U-Net's
attention projections and, by default as in seed 004, the text encoder's; everything else is
frozen (the model: histosynth.generators.lora_model). Training runs on the shared loop (histosynth.training.loop.fit): its checkpoints
hold the LoRA weights and the optimiser alone (megabytes, not the base model's gigabytes), resume
is bit-identical, bf16 autocast on CUDA only (fp16 LoRA training gives NaN losses).

Outputs in DIR: adapter/ (pytorch_lora_weights.safetensors in diffusers' LoRA format, loadable by
StableDiffusionPipeline.load_lora_weights, and histosynth.json: base model path and hash, labels,
prompts, rank, alpha, resolution), loss.csv, samples/step-<n>.png (one row per label).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histosynth.config import section_defaults
from histosynth.files import MODEL_INFO, atomic_dir
from histosynth.generators.base_model import LoraError, base_model_hash, check_base_model, require_extra
from histosynth.generators.launch import cli
from histosynth.generators.lora_model import LoraStableDiffusion
from histosynth.seeds import derive_seed, seed_everything
from histosynth.training.batches import check_dataset, dataset_labels, random_dihedral
from histosynth.training.errors import TrainingError
from histosynth.training.grids import save_grid
from histosynth.training.loop import Update, fit, make_accelerator

log = logging.getLogger("histosynth.generators.lora")  # not __main__ under python -m


def class_prompts(setting: str | Mapping[str, str], classes: Sequence[str]) -> dict[str, str]:
    """{label: prompt}: a template with {class} filled per label, or a mapping naming every label."""
    if isinstance(setting, str):
        if "{class}" not in setting:
            raise LoraError(
                f"lora.prompt={setting!r} has no {{class}}: every label would get the same prompt; "
                "add {class} or give a mapping {label: prompt}"
            )
        return {name: setting.replace("{class}", name) for name in classes}
    missing = [name for name in classes if name not in setting]
    if missing:
        raise LoraError(f"lora.prompt names no prompt for the labels {missing}; give one per label of {list(classes)}")
    return {name: str(setting[name]) for name in classes}


def sample(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    size: int,
    steps: int,
    guidance: float,
    negative_prompt: str = "",
    scale: float | None = None,
) -> np.ndarray:
    """uint8 (N, size, size, 3): image i from prompt i and its own generator seeded seeds[i] (so it
    does not depend on the batch), at LoRA weight `scale` (None: as loaded)."""
    device = pipe.unet.device
    kwargs = {"cross_attention_kwargs": {"scale": scale}} if scale is not None else {}
    with torch.no_grad():
        images = pipe(
            list(prompts),
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator(device).manual_seed(int(s)) for s in seeds],
            output_type="np",
            **kwargs,
        ).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def train(
    dataset,
    out: str | Path,
    settings: Mapping | None = None,
    *,
    seed: int = 0,
    val_dataset=None,
    checkpoint_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    accelerator=None,
    synthesis: Mapping | None = None,
) -> dict:
    """Fine-tune the `lora` config section's adapters on `dataset` (items: 'image' (3, H, W) in
    [-1, 1], resized to the training resolution, and 'label', the class index); labels: the class
    names in index order (default their indices), which the prompts name. Writes out/adapter,
    out/loss.csv and out/samples/step-<n>.png (drawn with `synthesis`.lora's steps and guidance).
    val_dataset is accepted for the shared command line and unused."""
    require_extra()
    c = section_defaults("lora", settings)
    t = c["train"]
    draw = section_defaults("synthesis", synthesis)["lora"]
    out = Path(out)
    base = check_base_model(c["base_model"])
    shapes = check_dataset(dataset)
    if "label" not in dataset[0]:
        raise TrainingError("LoRA training items need a 'label' (the class index)")
    names = (
        [str(n) for n in labels]
        if labels is not None
        else [str(i) for i in range(int(dataset_labels(dataset).max()) + 1)]
    )
    prompts = class_prompts(c["prompt"], names)
    log.info("prompts per label: %s", prompts)

    seed_everything(seed)
    model = LoraStableDiffusion(str(base), c["rank"], c["alpha"], c["text_encoder"], prompts, names)
    size = c["resolution"] or model.native_size
    groups = [{"params": model.lora_parameters("unet"), "lr": t["lr"]}]
    if c["text_encoder"]:
        groups.append({"params": model.lora_parameters("text_encoder"), "lr": t["lr_text"]})
    trainable = sum(p.numel() for g in groups for p in g["params"])
    log.info(
        "Stable Diffusion %s at %d px: %.2fM LoRA weights (rank %d, alpha %s, text encoder %s) of %.0fM",
        base,
        size,
        trainable / 1e6,
        c["rank"],
        c["alpha"] or c["rank"],
        "adapted" if c["text_encoder"] else "frozen",
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    accelerator = accelerator or make_accelerator(t)
    device = accelerator.device

    def loss(model, batch):
        images = batch["image"].float()
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if t["augment"]:
            images = random_dihedral(images)
        return model(images, batch["label"].long().reshape(-1)), {}

    preview_seeds = [derive_seed(seed, "preview", i) for i in range(t["sample_count"])]

    def on_step(step, eval_model):
        if not t["sample_every"] or (step % t["sample_every"] and step != t["steps"]):
            return None
        was_training = eval_model.training
        eval_model.eval()
        pipe = eval_model.pipeline()
        pipe.set_progress_bar_config(disable=True)
        rows = [
            sample(
                pipe,
                [prompts[name]] * len(preview_seeds),
                preview_seeds,
                size=size,
                steps=draw["steps"],
                guidance=draw["guidance"],
                negative_prompt=draw["negative_prompt"],
            )
            for name in names
        ]
        eval_model.train(was_training)
        save_grid(
            [torch.from_numpy(r).permute(0, 3, 1, 2).float() / 127.5 - 1 for r in rows],
            out / "samples" / f"step-{step}.png",
        )
        return None

    run_config = {**c, "seed": seed, "classes": names, "data": {"items": len(dataset), "image": list(shapes["image"])}}
    result = fit(
        model,
        [Update("lora", loss, params=lambda m: groups)],
        dataset,
        out,
        settings=t,
        run_config=run_config,
        seed=seed,
        accelerator=accelerator,
        checkpoint_dir=checkpoint_dir,
        on_step=on_step,
        desc="lora",
    )
    if not accelerator.is_main_process:
        return {}
    adapter = save_adapter(result.model, out / "adapter", base=base, size=size, settings=c, steps=result.step)
    return {
        "adapter": str(adapter),
        "loss_csv": str(result.loss_csv),
        "steps": result.step,
        "lora_weights": trainable,
        "device": str(device),
    }


def save_adapter(
    model: LoraStableDiffusion, folder: Path, *, base: Path, size: int, settings: Mapping, steps: int
) -> Path:
    """The LoRA weights in diffusers' format (StableDiffusionPipeline.save_lora_weights) and
    histosynth.json: base model path and hash, labels, prompts, rank, alpha, resolution, steps."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet))}
    if model.config.text_encoder_lora:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(model.text_encoder)
        )
    meta = {
        "base_model": str(base),
        "base_hash": base_model_hash(base),
        "labels": model.config.labels,
        "prompts": model.config.prompts,
        "rank": settings["rank"],
        "alpha": settings["alpha"] or settings["rank"],
        "text_encoder": settings["text_encoder"],
        "resolution": size,
        "steps": steps,
        "training": json.loads(json.dumps(settings, default=str)),
    }
    with atomic_dir(folder) as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, safe_serialization=True, **layers)
        (tmp / MODEL_INFO).write_text(json.dumps(meta, indent=2))
    return folder


def load_pipeline(adapter: str | Path, device=None):
    """(Euler-ancestral StableDiffusionPipeline on the adapter's base model with the adapter
    loaded, the adapter's histosynth.json), after checking the base model is the one it was
    trained on (same hash)."""
    require_extra()
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    adapter = Path(adapter)
    if not (adapter / MODEL_INFO).is_file():
        raise LoraError(f"{adapter}: not a LoRA adapter folder of rule train_lora (no {MODEL_INFO})")
    meta = json.loads((adapter / MODEL_INFO).read_text())
    base = check_base_model(meta["base_model"])
    if base_model_hash(base) != meta["base_hash"]:
        raise LoraError(
            f"the base model {base} changed since the adapter {adapter} was trained on it (its hash "
            "differs); restore it or retrain (rule train_lora)"
        )
    os.environ["HF_HUB_OFFLINE"] = "1"
    pipe = StableDiffusionPipeline.from_pretrained(
        base, local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(adapter)
    pipe.set_progress_bar_config(disable=True)
    return (pipe.to(device) if device is not None else pipe), meta


def main(argv: list[str] | None = None) -> int:
    return cli("lora", train, argv)


if __name__ == "__main__":
    sys.exit(main())
