"""`histosynth generate N`: more images from a registered generator without rerunning the DAG
(seed 001's `generate.py 1000 5`). The model comes from the registry (default: the newest
diffusion model); its inputs (conditioning maps of the training split for the diffusion model,
the labels for a GAN or LoRA) come from the workflow's config and results in the working
directory. The images follow the synthetic-set contract of the rule the model belongs to, so the
workflow's own seed and settings reproduce its images byte for byte; the new set is registered.
"""

from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path

import pandas as pd

from histosynth.config import config_path, read_slide_sheet
from histosynth.data.io import read_file_table
from histosynth.data.labels import resolve_labels
from histosynth.files import content_hash
from histosynth.generators.table import GENERATORS, MANIFEST, Generator
from histosynth.registry import RegistryError, connect, model_by_id, newest_model, register_set

log = logging.getLogger(__name__)
IMAGE_MAKERS = {made.name: made for made in GENERATORS if made.sets}  # the registry's model kinds that make images


def _entry(spec: str):
    """The sampling function named 'module:function' by the generator table."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _slides(config: dict, root: Path, split: str | tuple, folder: str) -> list[Path]:
    sheet = read_slide_sheet(config_path(config["slides"], root))
    splits = (split,) if isinstance(split, str) else split
    paths = [root / "results" / folder / f"{slide}.parquet" for slide in sheet.index[sheet["split"].isin(splits)]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RegistryError(
            f"generate needs the workflow's {folder} indexes; missing {missing[:3]} (run the workflow here first)"
        )
    return paths


def generate(
    url: str,
    n: int,
    out: str | Path,
    *,
    config: dict,
    model_id: int | None = None,
    label: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    scale: float = 1.0,
    root: str | Path = ".",
) -> pd.DataFrame:
    """N images from registered generator `model_id` (default the newest diffusion model) into
    `out`, of label or region class `label` when given, with the config's synthesis settings
    (sampler and steps overridable), master seed `seed` (default the config's); registers the set
    under the folder's name and returns its manifest."""
    root, out = Path(root), Path(out)
    engine = connect(url, create=False)
    model = model_by_id(engine, model_id) if model_id is not None else newest_model(engine, ["diffusion"])
    if model["kind"] not in IMAGE_MAKERS:
        raise RegistryError(
            f"model {model['id']} is a {model['kind']}, which makes no images; pick a "
            f"{'/'.join(IMAGE_MAKERS)} model (`histosynth registry models`)"
        )
    made: Generator = IMAGE_MAKERS[model["kind"]]
    kind = made.sets[0]  # the set family generate draws (the diffusion model's: synthesize)
    sample = _entry(kind.entry)
    path = root / model["path"]
    if not path.is_dir() or content_hash(path) != model["content_hash"]:
        raise RegistryError(
            f"model {model['id']} ({model['path']}) is no longer on disk as registered (its files changed "
            "or were removed); pick a current model (`histosynth registry models`)"
        )
    if out.exists():
        raise RegistryError(f"{out} exists; give a new folder for the set (nothing was written)")
    seed = config["seed"] if seed is None else seed
    sheet = read_slide_sheet(config_path(config["slides"], root))
    labels = resolve_labels(config, list(sheet["label"]), config["slides"])
    synthesis = copy.deepcopy(config["synthesis"])
    log.info(
        "generate: %d images from model %d (%s, %s) into %s, seed %d",
        n,
        model["id"],
        model["kind"],
        model["path"],
        out,
        seed,
    )
    draw = synthesis[kind.settings]
    if made.draws_on == "maps":
        draw.update(n=n, **({"sampler": sampler} if sampler else {}), **({"steps": steps} if steps else {}))
        if label in config["classes"]:
            draw.update(target_class=label, per_class={})
        elif label in labels["classes"]:
            draw.update(per_class={label: n})
        elif label is not None:
            raise RegistryError(
                f"--class {label!r} is neither a region class {list(config['classes'])} nor a label {labels['classes']}"
            )
        parent = model_by_id(engine, model["parent_id"]) if model["parent_id"] else None
        manifest = sample(
            kind.name,
            path,
            _slides(config, root, ("train", "val"), "conditioning"),
            out,
            settings=synthesis,
            classes=config["classes"],
            labels=labels,
            conditioning_cfg=config["conditioning"],
            seed=seed,
            autoencoder=root / parent["path"] if parent else None,
        )
    else:
        if label is not None and label not in labels["classes"]:
            raise RegistryError(f"--class {label!r} is not one of the labels {labels['classes']}")
        draw.update(
            n=n, per_class={label: n} if label else {}, **({"steps": steps} if steps and "steps" in draw else {})
        )
        manifest = sample(
            path,
            _slides(config, root, "train", "patches"),
            out,
            settings=synthesis,
            labels=labels,
            size=config["patches"]["size"],
            seed=seed,
            **({"scale": scale} if kind.per_scale else {}),
        )
    with engine.begin() as db:
        register_set(
            db,
            out.name,
            "synthetic",
            read_file_table(out / MANIFEST),
            out / MANIFEST,
            root=root,
            model_ids={model["content_hash"]: model["id"]},
        )
    return manifest
