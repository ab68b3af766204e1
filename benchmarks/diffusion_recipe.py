"""Benchmark (not a test): train one diffusion recipe on the demo's conditioning maps, synthesise
and inpaint with it, and print what the quality and realism stages measure: training time, mask
consistency per class (the real-only segmenter and the nuclei detector) beside its ceiling on the
real source patches, offline Fréchet distance and KID, and the realism rows (C2ST AUC with its
interval, Laplacian and high-frequency ratios) against the real patches of --real-split.

Needs a demo run up to the conditioning maps and the real-only segmenter:

    .venv/bin/snakemake results/segmentation/real/seed0 --cores 2 --resources gpu=1
    .venv/bin/python benchmarks/diffusion_recipe.py --name base
    .venv/bin/python benchmarks/diffusion_recipe.py --name vpred --set diffusion.prediction=v_prediction \\
        --set diffusion.train.steps=3000 --set synthesis.synthesize.sampler=ddim

--set KEY=VALUE (dotted config keys, YAML values) layers on the preset (--config FILE layers a
config file first, e.g. a real data set's). Each run writes OUT/NAME/ (model, loss.csv, synth/,
inpaint/, quality.parquet, scores.parquet, realism.*) and appends one row to OUT/recipes.csv, so a
search is a series of calls. --model DIR samples from an already trained model (a sampler
comparison without retraining). --real-split test compares with patches of slides the generator
never saw (held-out real tissue).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def apply_overrides(config: dict, pairs: list[str]) -> dict:
    """config with each dotted KEY=VALUE (YAML-parsed) set."""
    for pair in pairs:
        key, _, text = pair.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
    return config


def demo_inputs(config: dict, results: Path, real_split: str = "train") -> tuple[list[str], list[str]]:
    """(conditioning indexes of the training slides, patch indexes of `real_split`), as the
    workflow's rules pick them from the slide sheet."""
    from histosynth.config import read_slide_sheet

    split = read_slide_sheet(ROOT / config["slides"])["split"]
    conditioning = [
        str(results / "conditioning" / f"{slide}.parquet") for slide in split.index[split.isin(["train", "val"])]
    ]
    real = [str(results / "patches" / f"{slide}.parquet") for slide in split.index[split == real_split]]
    return conditioning, real


def realism_row(config: dict, real: list[str], manifests: dict, out: Path) -> dict:
    """The realism stage per set against `real` patch indexes (all their rows count as real: the
    stage keeps split 'train', so other splits are relabelled): C2ST AUC, its interval and the
    sharpness ratios of class 'all'."""
    from histosynth.data.io import read_patch_index, write_table
    from histosynth.evaluation.realism import realism_stage

    row = {}
    table = pd.concat([read_patch_index(p) for p in real], ignore_index=True).assign(split="train")
    write_table(table, out / "real.parquet")
    for mode, manifest in manifests.items():
        found = realism_stage(
            [out / "real.parquet"],
            manifest,
            mode=mode,
            table_out=out / f"{mode}.realism.parquet",
            images_out=out / f"{mode}.realism_images.parquet",
            figure_out=out / f"{mode}.realism.png",
            config=config,
        )
        found = found[(found["class"] == "all") & (found["status"] == "ok")].set_index("metric")["value"]
        row.update({f"{mode}:{metric}": round(float(value), 3) for metric, value in found.items()})
    return row


def evaluate(config: dict, results: Path, real: list[str], manifests: dict, out: Path) -> dict:
    """The quality stage on `manifests` ({set: manifest}) with the real-only segmenter: one flat row
    of pooled mask-consistency Dice per set and class, and offline FD/KD per set."""
    from histosynth.evaluation.mask_consistency import consistency_stage
    from histosynth.evaluation.quality import image_quality_stage

    segmenter = results / "segmentation" / "real" / "seed0"
    quality = image_quality_stage(real, manifests, out / "quality.parquet", config=config, segmentation_model=segmenter)
    consistency, _ = consistency_stage(
        real,
        manifests,
        out / "consistency.parquet",
        out / "scores.parquet",
        config=config,
        segmentation_model=segmenter,
    )
    table = pd.concat([quality, consistency], ignore_index=True)
    ok = table[table["status"] == "ok"]
    row = {}
    for _, r in ok[ok["metric"].isin(["mask_dice", "mask_dice_real", "nuclei_dice"])].iterrows():
        if r["metric"] != "nuclei_dice" or r["class"] == "nuclei":
            row[f"{r['set']}:{r['class']}" + (" (real)" if r["metric"] == "mask_dice_real" else "")] = round(
                float(r["value"]), 3
            )
    for _, r in ok[ok["metric"].isin(["fd", "kd"]) & (ok["class"] == "all")].iterrows():
        row[f"{r['set']}:{r['metric']}"] = round(float(r["value"]), 4)
    return row


def _flat(tree: dict, prefix: str = ""):
    """(dotted key, leaf value) pairs of a nested mapping."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def append_row(row: dict, path: Path) -> None:
    previous = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    pd.concat([previous, pd.DataFrame([row])], ignore_index=True).to_csv(path, index=False)
    print(pd.DataFrame([row]).T.to_string(header=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the recipe's name (its folder under --out)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument(
        "--results", default="results", help="the workflow's results folder (conditioning, segmentation)"
    )
    parser.add_argument("--out", default="results/benchmarks/recipes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--config", help="a config file layered on the preset before --set (e.g. a real data set's)")
    parser.add_argument("--model", help="sample from this trained model folder instead of training one")
    parser.add_argument("--real-split", default="train", help="slides whose patches the realism test compares with")
    parser.add_argument("--sets", default="synth,inpaint", help="synthetic sets to make (comma-separated)")
    args = parser.parse_args(argv)

    from histosynth.config import load_preset, read_slide_sheet, validated
    from histosynth.data.labels import run_labels
    from histosynth.generators.datasets import patch_dataset
    from histosynth.generators.synthesis import run_stage
    from histosynth.generators.train_diffusion import train_diffusion

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = load_preset(args.preset)
    if args.config:
        preset = apply_overrides(
            preset, [f"{k}={json.dumps(v)}" for k, v in _flat(yaml.safe_load(Path(args.config).read_text()))]
        )
    config = validated(apply_overrides(preset, args.set), f"preset {args.preset} + --config + --set")
    config["labels"] = run_labels(config, read_slide_sheet(ROOT / config["slides"])["label"].fillna("").tolist())
    results, out = Path(args.results), Path(args.out) / args.name
    indexes, train_real = demo_inputs(config, results)
    _, real = demo_inputs(config, results, args.real_split)
    row = {"recipe": args.name, "settings": json.dumps(args.set)}
    model = Path(args.model) if args.model else out / "model"
    if not args.model:
        train, val = patch_dataset(indexes, "train", config), patch_dataset(indexes, "val", config)
        start = time.perf_counter()
        train_diffusion(
            train, out, config["diffusion"], seed=config["seed"], val_dataset=val, checkpoint_dir=out / "checkpoints"
        )
        row["train_s"] = round(time.perf_counter() - start)
    sets = args.sets.split(",")
    for mode in sets:
        start = time.perf_counter()
        run_stage(
            mode,
            model,
            indexes,
            out / mode,
            settings=config["synthesis"],
            classes=config["classes"],
            labels=config["labels"],
            conditioning_cfg=config["conditioning"],
            seed=config["seed"],
        )
        row[f"{mode}_s"] = round(time.perf_counter() - start)
    manifests = {mode: out / mode / "manifest.parquet" for mode in sets}
    row.update(evaluate(config, results, train_real, manifests, out))
    row.update(realism_row(config, real, manifests, out))
    append_row(row, Path(args.out) / "recipes.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
