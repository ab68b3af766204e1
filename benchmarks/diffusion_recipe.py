"""Benchmark (not a test): train one diffusion recipe on the demo's conditioning maps, synthesise
and inpaint with it, and print what the quality stage measures: training time, mask consistency
per class (the real-only segmenter and the nuclei detector), offline Fréchet distance and KID.

Needs a demo run up to the conditioning maps and the real-only segmenter:

    .venv/bin/snakemake results/segmentation/real/seed0 --cores 2 --resources gpu=1
    .venv/bin/python benchmarks/diffusion_recipe.py --name base
    .venv/bin/python benchmarks/diffusion_recipe.py --name vpred --set diffusion.prediction=v_prediction \\
        --set diffusion.train.steps=3000 --set synthesis.synthesize.sampler=ddim

--set KEY=VALUE (dotted config keys, YAML values) layers on the preset. Each run writes
OUT/NAME/ (model, loss.csv, synth/, inpaint/, quality.parquet, scores.parquet) and appends one row to
OUT/recipes.csv, so a search is a series of calls.
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


def demo_inputs(config: dict, results: Path) -> tuple[list[str], list[str]]:
    """(conditioning indexes of the training slides, patch indexes of the train split), as the
    workflow's rules pick them from the slide sheet."""
    from histosynth.config import read_slide_sheet

    split = read_slide_sheet(ROOT / config["slides"])["split"]
    conditioning = [str(results / "conditioning" / f"{slide}.parquet") for slide in split.index[split.isin(["train", "val"])]]
    real = [str(results / "patches" / f"{slide}.parquet") for slide in split.index[split == "train"]]
    return conditioning, real


def evaluate(config: dict, results: Path, real: list[str], manifests: dict, out: Path) -> dict:
    """The quality stage on `manifests` ({set: manifest}) with the real-only segmenter: one flat row
    of pooled mask-consistency Dice per set and class, and offline FD/KD per set."""
    from histosynth.evaluation.quality import image_quality_stage

    table = image_quality_stage(real, manifests, out / "quality.parquet", scores_out=out / "scores.parquet", config=config,
                                segmentation_model=results / "segmentation" / "real" / "seed0")
    ok = table[table["status"] == "ok"]
    row = {}
    for _, r in ok[ok["metric"].isin(["mask_dice", "nuclei_dice"])].iterrows():
        if r["metric"] == "mask_dice" or r["class"] == "nuclei":
            row[f"{r['set']}:{r['class']}"] = round(float(r["value"]), 3)
    for _, r in ok[ok["metric"].isin(["fd", "kd"]) & (ok["class"] == "all")].iterrows():
        row[f"{r['set']}:{r['metric']}"] = round(float(r["value"]), 4)
    return row


def append_row(row: dict, path: Path) -> None:
    previous = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    pd.concat([previous, pd.DataFrame([row])], ignore_index=True).to_csv(path, index=False)
    print(pd.DataFrame([row]).T.to_string(header=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the recipe's name (its folder under --out)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--results", default="results", help="the workflow's results folder (conditioning, segmentation)")
    parser.add_argument("--out", default="results/benchmarks/recipes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    from histosynth.config import load_preset, validated
    from histosynth.generators.datasets import patch_dataset
    from histosynth.generators.train_diffusion import train_diffusion
    from histosynth.generators.synthesis import run_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    config = validated(apply_overrides(load_preset(args.preset), args.set), f"preset {args.preset} + --set")
    results, out = Path(args.results), Path(args.out) / args.name
    indexes, real = demo_inputs(config, results)
    train, val = patch_dataset(indexes, "train", config), patch_dataset(indexes, "val", config)

    start = time.perf_counter()
    train_diffusion(train, out, config["diffusion"], seed=config["seed"], val_dataset=val,
                    checkpoint_dir=out / "checkpoints")
    row = {"recipe": args.name, "settings": json.dumps(args.set), "train_s": round(time.perf_counter() - start)}
    for mode in ("synth", "inpaint"):
        start = time.perf_counter()
        run_stage(mode, out / "model", indexes, out / mode, settings=config["synthesis"], classes=config["classes"],
                  conditioning_cfg=config["conditioning"], seed=config["seed"])
        row[f"{mode}_s"] = round(time.perf_counter() - start)
    manifests = {mode: out / mode / "manifest.parquet" for mode in ("synth", "inpaint")}
    row.update(evaluate(config, results, real, manifests, out))
    append_row(row, Path(args.out) / "recipes.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
