"""The label-conditioned generators' synthetic sets (rules gan_synthesize and lora_synthesize):
labelled images without masks, per label, at the patch size."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from histosynth.config import lora_set, section_defaults
from histosynth.data.io import read_rgb, write_png, write_table
from histosynth.data.labels import label_index, patch_labels
from histosynth.device import pick_device
from histosynth.files import atomic_dir
from histosynth.generators.datasets import read_indexes
from histosynth.generators.gan import generate, load_gan, resize_images
from histosynth.generators.lora import load_pipeline, sample
from histosynth.generators.set_files import SPLIT, SynthesisError, grid_name, model_record, to_model
from histosynth.generators.table import MANIFEST
from histosynth.seeds import derive_seed
from histosynth.training.grids import save_grid

log = logging.getLogger(__name__)


def class_counts(n: int, per_class: Mapping[str, int] | None, labels: Mapping) -> dict[str, int]:
    """Images per label: per_class (names checked), else n spread evenly over the labels (the
    first labels take the remainder)."""
    names = list(labels["classes"])
    if per_class:
        unknown = [name for name in per_class if name not in names]
        if unknown:
            raise SynthesisError(f"per_class names {unknown}, which are not among the labels {names}")
        return {name: int(per_class[name]) for name in names if name in per_class}
    return {name: n // len(names) + (i < n % len(names)) for i, name in enumerate(names)}


def write_label_set(
    out_dir: str | Path,
    mode: str,
    names: Sequence[str],
    seeds: Sequence[int],
    draw,
    *,
    labels: Mapping,
    real: pd.DataFrame,
    size: int,
    batch_size: int,
    grid_per_class: int,
    record: Mapping,
    per_label: Mapping[str, Mapping] | None = None,
) -> pd.DataFrame:
    """A synthetic set of labelled images without masks (a GAN's, Stable Diffusion's): image i of
    label names[i] from seed seeds[i], drawn batch by batch by draw(names, seeds) -> uint8 (N, h, w,
    3) and resized to the patch size `size` (Lanczos). Writes out_dir (atomically): images/,
    manifest.parquet (id, image, mode, class, the fields of `record` and of per_label[class], seed,
    created_at, label, split) and grid_<class>.png (the `real` training rows of the class above the
    set's images)."""
    real_names = patch_labels(real, labels) if len(real) else np.empty(0, object)
    rows, grids = [], {}
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for start in range(0, len(names), batch_size):
            chunk = slice(start, start + batch_size)
            images = resize_images(draw(list(names[chunk]), list(seeds[chunk])), size)
            for i, (name, image_seed, image) in enumerate(zip(names[chunk], seeds[chunk], images), start):
                image_id = f"{mode}-{i:06d}"
                write_png(image, tmp / "images" / f"{image_id}.png")
                grids.setdefault(name, []).append(image)
                rows.append(
                    {
                        "id": image_id,
                        "image": f"images/{image_id}.png",
                        "mode": mode,
                        "class": name,
                        **record,
                        **(per_label or {}).get(name, {}),
                        "seed": int(image_seed),
                        "source_patch_id": None,
                        "source_slide": None,
                        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                )
            log.info("%s: %d/%d images", mode, len(rows), len(names))
        manifest = pd.DataFrame(rows)
        manifest.insert(manifest.columns.get_loc("created_at"), "label", label_index(manifest["class"], labels))
        manifest["split"] = SPLIT
        write_table(manifest, tmp / MANIFEST)
        for name, made in grids.items() if grid_per_class else ():
            real_rows = real[real_names == name].head(grid_per_class)
            grid = [to_model(np.stack([read_rgb(p) for p in real_rows["image"]]), "cpu")] if len(real_rows) else []
            save_grid([*grid, to_model(np.stack(made[:grid_per_class]), "cpu")], tmp / grid_name(name))
    return manifest


def gan_stage(
    model_path: str | Path,
    indexes: Sequence[str | Path],
    out_dir: str | Path,
    *,
    settings: Mapping,
    labels: Mapping,
    size: int,
    seed: int,
    device: str = "auto",
) -> pd.DataFrame:
    """Rule gan_synthesize: images per label from the trained GAN (histosynth.generators.gan),
    image i from its own noise seed derive_seed(seed, 'gan', i), at the patch size `size`; no
    masks (write_label_set; the manifest records model path and hash and the truncation).
    `settings` is the `synthesis` config section (its gan, batch_size and grid_per_class);
    `indexes` the training slides' patch indexes."""
    model = load_gan(model_path, pick_device(device))
    if list(model.config.labels or []) != list(labels["classes"]):
        raise SynthesisError(
            f"the GAN at {model_path} was trained on the labels {model.config.labels}, this run's are "
            f"{labels['classes']}; retrain it (rule train_gan)"
        )
    s = section_defaults("synthesis", settings)
    gan = s["gan"]
    counts = class_counts(gan["n"], gan["per_class"], labels)
    names = [name for name, count in counts.items() for _ in range(count)]
    seeds = [derive_seed(seed, "gan", i) for i in range(len(names))]
    path, digest = model_record(model_path)
    if model.config.size != size:
        log.info("gan_synthesize: the GAN draws %d px images; resized to the %d px patches", model.config.size, size)

    def draw(batch_names, batch_seeds):
        return generate(model, torch.as_tensor(label_index(batch_names, labels)), batch_seeds, gan["truncation"])

    return write_label_set(
        out_dir,
        "gan",
        names,
        seeds,
        draw,
        labels=labels,
        real=read_indexes(indexes, "train"),
        size=size,
        batch_size=s["batch_size"],
        grid_per_class=s["grid_per_class"],
        record={"model_path": path, "model_hash": digest, "truncation": gan["truncation"]},
    )


def lora_stage(
    adapter: str | Path,
    indexes: Sequence[str | Path],
    out_dir: str | Path,
    *,
    settings: Mapping,
    labels: Mapping,
    size: int,
    seed: int,
    scale: float,
    device: str = "auto",
) -> pd.DataFrame:
    """Rule lora_synthesize: images per label from Stable Diffusion with the trained LoRA adapter
    (histosynth.generators.lora) at LoRA weight `scale`, prompt per label, Euler ancestral
    sampling; image i from seed derive_seed(seed, 'lora', i), the same at every scale so the sets
    pair image for image; resized to the patch size `size`; no masks (write_label_set; the manifest
    records adapter and base model paths and hashes, prompt, scale, steps and guidance).
    `settings` is the `synthesis` config section (its lora, batch_size and grid_per_class)."""
    s = section_defaults("synthesis", settings)
    draw_settings = s["lora"]
    pipe, meta = load_pipeline(adapter, pick_device(device))
    if list(meta["labels"]) != list(labels["classes"]):
        raise SynthesisError(
            f"the LoRA adapter at {adapter} was trained on the labels {meta['labels']}, this run's are "
            f"{labels['classes']}; retrain it (rule train_lora)"
        )
    prompts = meta["prompts"]
    counts = class_counts(draw_settings["n"], draw_settings["per_class"], labels)
    names = [name for name, count in counts.items() for _ in range(count)]
    seeds = [derive_seed(seed, "lora", i) for i in range(len(names))]
    path, digest = model_record(adapter)
    log.info(
        "lora_synthesize: %d images at LoRA scale %s, %d px resized to %d px, %d Euler ancestral steps, guidance %s",
        len(names),
        scale,
        meta["resolution"],
        size,
        draw_settings["steps"],
        draw_settings["guidance"],
    )

    def draw(batch_names, batch_seeds):
        return sample(
            pipe,
            [prompts[name] for name in batch_names],
            batch_seeds,
            size=meta["resolution"],
            steps=draw_settings["steps"],
            guidance=draw_settings["guidance"],
            negative_prompt=draw_settings["negative_prompt"],
            scale=scale,
        )

    record = {
        "model_path": path,
        "model_hash": digest,
        "base_model": meta["base_model"],
        "base_hash": meta["base_hash"],
        "lora_scale": float(scale),
        "sampler": "euler_ancestral",
        "steps": draw_settings["steps"],
        "guidance": draw_settings["guidance"],
        "negative_prompt": draw_settings["negative_prompt"],
    }
    return write_label_set(
        out_dir,
        lora_set(scale),
        names,
        seeds,
        draw,
        labels=labels,
        real=read_indexes(indexes, "train"),
        size=size,
        batch_size=s["batch_size"],
        grid_per_class=s["grid_per_class"],
        record=record,
        per_label={name: {"prompt": prompts[name]} for name in counts},
    )
