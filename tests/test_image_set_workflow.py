"""Integration: the workflow on a labelled image set (plain PNG tiles in class folders, a sheet
written by `histosynth sheet`), classification only, through the snakemake CLI: seeds 003/004's
set-up at tiny scale, with class-conditioned synthesis, seeds 000/001's GAN and seed 004's Stable
Diffusion + LoRA (a tiny base model written by the test) beside it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, run_snakemake
from tiny_sd import write_tiny_stable_diffusion

pytestmark = pytest.mark.integration

OVERLAY = """
slides: sheet.tsv
patches: {tissue: {otsu: false}}   # tiles of tissue throughout
labels: {source: sheet}
diffusion: {num_classes: 2}
synthesis:
  synthesize: {per_class: {low: 3, high: 3}, steps: 2}
  inpaint: {target_class: null}
  gan: {n: 6}
  lora: {n: 6, steps: 2, guidance: 3.0, scales: [1.0, 0.5]}
gan:                 # seeds 000/001's GAN at toy size: 16 px (resized to the 32 px patches), 4 steps
  enabled: true
  size: 16
  ch_max: 32
  width: 8
  attention_g: [8]
  attention_d: [16]
  train: {steps: 4, batch_size: 4, checkpoint_every: 2, log_every: 1, sample_every: 4, sample_count: 2}
lora:                # seed 004's LoRA fine-tuning on a tiny Stable Diffusion, 4 steps
  enabled: true
  base_model: tiny-sd
  train: {steps: 4, checkpoint_every: 2, log_every: 1, sample_every: 4, sample_count: 2}
mixing:
  sources: [synth]
  ratios:
    - {name: real, synthetic: 0}
    - {name: syn6, synthetic: 6}
    - {name: gan6, synthetic: 6, sources: [gan]}
    - {name: lora6, synthetic: 6, sources: [lora100]}
    - {name: cas, synthetic: 6, real: false}
segmentation: {enabled: false}
quality: {consistency: false, extractor: resnet18}
classification: {folds: 1, seeds: [0, 1]}
"""


def write_tiles(folder, label: str, radius: int, n: int, seed: int) -> None:
    """n 256 px H&E-like tiles: pink stroma with purple nuclei of the given radius (the 'atypia')."""
    rng = np.random.default_rng(seed)
    (folder / label).mkdir(parents=True)
    yy, xx = np.mgrid[:256, :256]
    for i in range(n):
        rgb = np.empty((256, 256, 3), np.uint8)
        rgb[:] = (232, 178, 200)
        for cy, cx in rng.integers(0, 256, (60, 2)):
            rgb[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = (110, 55, 150)
        Image.fromarray(rgb).save(folder / label / f"{label}_{i}.png")


def snakemake(workdir, *args):
    configs = [REPO / "config/config.yaml", REPO / "config/tiny.yaml", workdir / "overlay.yaml"]
    return run_snakemake(workdir, configs, *args)


@pytest.fixture(scope="module")
def image_set_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("image_set")
    write_tiles(workdir / "tiles", "low", 2, 8, seed=0)
    write_tiles(workdir / "tiles", "high", 4, 8, seed=1)
    sheet = subprocess.run(
        [
            sys.executable,
            "-m",
            "histosynth.cli",
            "sheet",
            "tiles",
            "--mpp",
            "1.0",
            "--split",
            "train=0.5,val=0.25,test=0.25",
            "--out",
            "sheet.tsv",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    assert sheet.returncode == 0, sheet.stderr
    write_tiny_stable_diffusion(workdir / "tiny-sd", sample_size=32)
    (workdir / "overlay.yaml").write_text(OVERLAY)
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_patches_inherit_their_image_label_and_splits_stay_by_image(image_set_run):
    sheet = pd.read_csv(image_set_run / "sheet.tsv", sep="\t", dtype=str)
    assert set(sheet["label"]) == {"low", "high"} and sheet.groupby("split")["label"].nunique().eq(2).all()
    for row in sheet.itertuples():
        index = pd.read_parquet(image_set_run / f"results/patches/{row.slide}.parquet")
        assert len(index) == 16 and set(index["label"]) == {row.label} and set(index["split"]) == {row.split}


def test_class_conditioned_synthesis_feeds_classification_only(image_set_run):
    manifest = pd.read_parquet(image_set_run / "results/synthetic/synth/manifest.parquet")
    assert list(manifest["class"]) == ["high"] * 3 + ["low"] * 3 and list(manifest["label"]) == [0] * 3 + [1] * 3
    assert not (image_set_run / "results/segmentation").exists()  # segmentation.enabled: false
    cas = pd.read_parquet(image_set_run / "results/mixing/cas.parquet")
    assert (cas["source"] == "synthetic").all() and sorted(cas["class"]) == ["high"] * 3 + ["low"] * 3
    table = pd.read_parquet(image_set_run / "results/report/metrics.parquet")
    assert set(table["kind"]) == {"classification", "quality"}
    decided = pd.read_csv(image_set_run / "results/report/verdict.csv")
    assert set(decided["task"]) == {"classification"} and set(decided["ratio"]) == {"syn6", "gan6", "lora6", "cas"}
    assert (decided["n"] == 2).all() and (decided["paired_by"] == "seed").all()
    assert (image_set_run / "results/report/confusion.png").stat().st_size > 5000
    assert not (image_set_run / "results/report/metrics.png").exists()  # the segmentation figure


def test_the_gan_set_per_label_beside_the_diffusion_sets(image_set_run):
    manifest = pd.read_parquet(image_set_run / "results/synthetic/gan/manifest.parquet")
    assert sorted(manifest["class"]) == ["high"] * 3 + ["low"] * 3 and "mask" not in manifest
    image = Image.open(image_set_run / "results/synthetic/gan" / manifest["image"].iloc[0])
    assert image.size == (32, 32)  # drawn at gan.size 16, resized to the patches
    assert (image_set_run / "results/gan/loss.csv").is_file() and list(
        (image_set_run / "results/gan/samples").glob("*.png")
    )
    mixed = pd.read_parquet(image_set_run / "results/mixing/gan6.parquet")
    assert set(mixed.loc[mixed["source"] == "synthetic", "mode"]) == {"gan"} and mixed["mask"].isna().sum() == 6
    quality = pd.read_parquet(image_set_run / "results/quality/gan.parquet")
    assert set(quality["set"]) == {"gan"} and {"high", "low"} <= set(quality["class"])
    audit = pd.read_csv(image_set_run / "results/report/memorisation.csv").set_index("set")
    assert set(audit.index) == {"synth", "gan", "lora100", "lora50"}
    # quality.extractor resnet18 has no weights here and Inception is absent: no fidelity during
    # training, and the log says why (tests/test_gan.py measures it)
    assert pd.read_csv(image_set_run / "results/gan/loss.csv")["fd"].isna().all()
    assert (
        "no fd/kd (quality.extractor='resnet18' needs quality.extractor_weights"
        in (image_set_run / "logs/train_gan.log").read_text()
    )
    assert (image_set_run / "results/report/loss/gan.png").is_file()


def test_stable_diffusion_lora_sets_per_scale_feed_classification(image_set_run):
    adapter = image_set_run / "results/lora/adapter"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file() and (adapter / "histosynth.json").is_file()
    sets = {
        scale: pd.read_parquet(image_set_run / f"results/synthetic/lora{scale}/manifest.parquet") for scale in (100, 50)
    }
    for scale, manifest in sets.items():
        assert sorted(manifest["class"]) == ["high"] * 3 + ["low"] * 3 and set(manifest["lora_scale"]) == {scale / 100}
        assert manifest["prompt"].str.startswith("histopathology patch, ").all() and "mask" not in manifest
    assert sets[100]["seed"].tolist() == sets[50]["seed"].tolist()
    image = Image.open(image_set_run / "results/synthetic/lora100" / sets[100]["image"].iloc[0])
    assert image.size == (32, 32)
    mixed = pd.read_parquet(image_set_run / "results/mixing/lora6.parquet")
    assert set(mixed.loc[mixed["source"] == "synthetic", "mode"]) == {"lora100"}
    quality = pd.concat(pd.read_parquet(image_set_run / f"results/quality/lora{scale}.parquet") for scale in (100, 50))
    assert {"high", "low"} <= set(quality["class"])
    assert (image_set_run / "results/report/loss/lora.png").is_file() and list(
        (image_set_run / "results/lora/samples").glob("*.png")
    )
