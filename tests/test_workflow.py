"""Integration: the workflow on the tiny preset, in a temporary directory, through the snakemake CLI."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REPO, run_snakemake

pytestmark = pytest.mark.integration


def snakemake(workdir, *args, overlay: str | None = None, snakefile=REPO / "Snakefile"):
    """Run the workflow on the tiny preset in workdir; `overlay` is YAML layered on top."""
    configs = [REPO / "config/config.yaml", REPO / "config/tiny.yaml"]
    if overlay:
        (workdir / "overlay.yaml").write_text(overlay)
        configs.append(workdir / "overlay.yaml")
    return run_snakemake(workdir, configs, *args, snakefile=snakefile)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_patches_for_every_slide_with_its_split(tiny_run):
    sheet = pd.read_csv(REPO / "config/slides.tiny.tsv", sep="\t")
    for slide, split in zip(sheet["slide"], sheet["split"]):
        index = pd.read_parquet(tiny_run / f"results/patches/{slide}.parquet")
        assert len(index) > 20
        assert set(index["split"]) == {split}
        assert (index["tissue_fraction"] >= 0.5).all()
        assert (tiny_run / f"results/patches/{slide}.qc.png").is_file()
        for row in index.sample(5, random_state=0).itertuples():
            image = np.asarray(Image.open(tiny_run / "results/patches" / row.image))
            mask = np.asarray(Image.open(tiny_run / "results/patches" / row.mask))
            assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
            assert (mask == 1).mean() == pytest.approx(row.frac_blood_vessel)


def test_every_label_class_appears_somewhere(tiny_run):
    index = pd.concat(pd.read_parquet(p) for p in (tiny_run / "results/patches").glob("*.parquet"))
    for column in ("frac_blood_vessel", "frac_inflammation", "frac_fat"):
        assert index[column].max() > 0.5, column


def test_nuclei_and_conditioning_maps(tiny_run):

    from histosynth.nuclei.conditioning import read_conditioning
    from histosynth.nuclei.instances import read_instances

    patches = pd.read_parquet(tiny_run / "results/patches/tiny_a.parquet")
    nuclei = pd.read_parquet(tiny_run / "results/nuclei/tiny_a.parquet")
    assert set(nuclei["patch_id"]) <= set(patches["patch_id"]) and len(nuclei) > 100
    for patch_id in patches["patch_id"][:5]:
        assert read_instances(tiny_run / f"results/nuclei/tiny_a/{patch_id}.png").shape == (32, 32)
    geojson = json.loads((tiny_run / "results/nuclei/tiny_a.geojson").read_text())
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) > 100
    conditioning = pd.read_parquet(tiny_run / "results/conditioning/tiny_a.parquet")
    assert len(conditioning) == len(patches)
    encoded = read_conditioning(tiny_run / "results/conditioning" / conditioning["conditioning"].iloc[0])
    assert encoded.shape == (32, 32, 3)
    quality = pd.read_csv(tiny_run / "results/nuclei/tiny_a.quality.csv").set_index("metric")["value"]
    assert quality["f1"] > 0.3 and quality["images"] == len(patches)


def test_models_trained_with_their_reports(tiny_run):
    import math

    import torch

    from histosynth.config import load_preset
    from histosynth.generators.autoencoder import decode, encode, load_autoencoder
    from histosynth.generators.datasets import patch_dataset

    metrics = json.loads((tiny_run / "results/autoencoder/metrics.json").read_text())
    assert metrics["split"] == "val"
    # the recorded PSNR is the saved model's on the first val_items validation patches (tiny_b)
    config = load_preset("tiny")
    val = patch_dataset(
        [tiny_run / "results/patches/tiny_a.parquet", tiny_run / "results/patches/tiny_b.parquet"], "val", config
    )
    images = torch.stack([val[i]["image"] for i in range(min(len(val), config["autoencoder"]["val_items"]))]).float()
    with torch.no_grad():
        autoencoder = load_autoencoder(tiny_run / "results/autoencoder/model")
        reconstruction = decode(autoencoder, encode(autoencoder, images))
    mse = float((((reconstruction + 1) / 2 - (images + 1) / 2) ** 2).mean())
    assert metrics["n_images"] == len(images) and metrics["psnr"] == pytest.approx(10 * math.log10(1 / mse), abs=0.01)
    assert (tiny_run / "results/autoencoder/reconstructions.png").is_file()
    for stage in ("autoencoder", "diffusion"):
        assert (tiny_run / f"results/{stage}/model/config.json").is_file()
        losses = pd.read_csv(tiny_run / f"results/{stage}/loss.csv")
        assert len(losses) == 4 and losses["loss"].notna().all()
    assert list((tiny_run / "results/diffusion/samples").glob("step-*.png"))


def test_synthetic_sets_with_manifests(tiny_run):
    from histosynth.data.io import read_patch_index

    for mode in ("synth", "inpaint"):
        folder = tiny_run / "results/synthetic" / mode
        manifest = read_patch_index(folder / "manifest.parquet", columns=("image", "mask", "conditioning"))
        assert len(manifest) == 4 and set(manifest["mode"]) == {mode} and set(manifest["split"]) == {"synthetic"}
        assert manifest["model_hash"].str.len().min() > 0 and manifest["seed"].is_unique
        for row in manifest.itertuples():
            image, mask = np.asarray(Image.open(row.image)), np.asarray(Image.open(row.mask))
            assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
            assert (mask == 1).mean() == pytest.approx(row.frac_blood_vessel)
        assert list(folder.glob("grid_*.png"))
    inpainted = read_patch_index(tiny_run / "results/synthetic/inpaint/manifest.parquet", columns=("mask",))
    assert (inpainted["frac_blood_vessel"] > 0).all() and inpainted["donor_patch_id"].notna().all()


def planned_jobs(output: str) -> set[str]:
    """Rule names in the 'Job stats' table of a dry run."""
    if "Job stats:" not in output:
        return set()
    table = output.split("Job stats:")[1].strip().split("\n\n")[0]
    return {line.split()[0] for line in table.splitlines()[2:] if line.split()[0] != "total"}


EVALUATION = {
    "curate_synthetic",
    "mix_dataset",
    "train_segmentation",
    "evaluate_segmentation",
    "train_classifier",
    "evaluate_classifier",
    "image_quality",
    "mask_consistency",
    "summarize",
    "registry",
    "all",
}


def test_changing_one_stage_reruns_it_and_its_descendants_only(tiny_run):
    result = snakemake(tiny_run, "--dry-run", overlay="diffusion: {cond_dropout: 0.2}")
    assert result.returncode == 0, result.stdout[-2000:]
    assert planned_jobs(result.stdout + result.stderr) == {
        "train_diffusion",
        "synthesize",
        "inpaint",
        "realism",
        *EVALUATION,
    }
    result = snakemake(tiny_run, "--dry-run", overlay="nuclei: {min_solidity: 0.7}")
    assert planned_jobs(result.stdout + result.stderr) == {
        "nuclei_masks",
        "nuclei_quality",
        "conditioning_maps",
        "train_diffusion",
        "synthesize",
        "inpaint",
        "realism",
        *EVALUATION,
    }
    # the baseline's first model re-segments for quality, which curation reads, whose sets the other ratios mix;
    # the realism test needs no model of the run, so it stays
    result = snakemake(tiny_run, "--dry-run", overlay="segmentation: {lr: 1.0e-3}")
    assert planned_jobs(result.stdout + result.stderr) == EVALUATION
    # curation reads the realism test only when it rejects on it: a realism setting reruns the test and the report
    result = snakemake(tiny_run, "--dry-run", overlay="realism: {epochs: 2}")
    assert planned_jobs(result.stdout + result.stderr) == {"realism", "summarize", "registry", "all"}


# The tiny preset with the GAN and LoRA enabled, for the tests of what reruns (they record a run rather than run it).
GENERATORS = {
    "gan": {
        "enabled": True,
        "size": 16,
        "ch_max": 32,
        "width": 8,
        "attention_g": [8],
        "attention_d": [16],
        "train": {"steps": 4},
    },
    "lora": {"enabled": True},
    "synthesis": {"lora": {"scales": [1.0]}},
}


def merged(base: dict, change: dict) -> dict:
    """`base` with `change` laid over it key by key (as Snakemake layers config files)."""
    out = dict(base)
    for key, value in change.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def fake_stable_diffusion(folder):
    """The files lora.base_model must hold for the workflow to start (a dry run loads no weights)."""
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / part).mkdir(parents=True)
    for name in (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
        "unet/w.safetensors",
        "vae/w.safetensors",
        "text_encoder/w.safetensors",
    ):
        (folder / name).write_text("{}")
    return folder


def recorded_run(workdir, settings: dict) -> dict:
    """A working directory where, as far as Snakemake knows, every job of the tiny preset with `settings`
    has run: each planned output made empty, then recorded (params, code, inputs) by --touch --forceall.
    Returns the settings with lora.base_model pointing at a stand-in base model."""
    settings = merged(settings, {"lora": {"base_model": str(fake_stable_diffusion(workdir / "sd"))}})
    overlay = yaml.safe_dump(settings)
    plan = snakemake(workdir, "--dry-run", overlay=overlay)
    assert plan.returncode == 0, (plan.stdout + plan.stderr)[-3000:]
    outputs = {
        path.strip()
        for line in plan.stdout.splitlines()
        if line.startswith("    output: ")
        for path in line.removeprefix("    output: ").split(",")
    }
    for path in map(workdir.joinpath, outputs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch() if path.suffix else path.mkdir(exist_ok=True)
    result = snakemake(workdir, "--touch", "--forceall", overlay=overlay)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    recorded = snakemake(workdir, "--dry-run", overlay=overlay)
    assert planned_jobs(recorded.stdout) == set(), recorded.stdout[-3000:]
    return settings


def plan_after(workdir, settings: dict, change: dict) -> set[str]:
    """The rules a dry run plans once `change` is laid over the recorded run's settings."""
    result = snakemake(workdir, "--dry-run", overlay=yaml.safe_dump(merged(settings, change)))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return planned_jobs(result.stdout + result.stderr)


@pytest.fixture(scope="module")
def generators_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("generators")
    return workdir, recorded_run(workdir, GENERATORS)


TRAININGS = {
    "train_autoencoder",
    "train_diffusion",
    "train_gan",
    "train_lora",
    "train_segmentation",
    "train_classifier",
}


def test_a_conditioning_setting_retrains_only_the_diffusion_model(generators_run):
    """The GAN, LoRA and the autoencoder never see conditioning maps: they neither rerun nor change checkpoint folders."""
    planned = plan_after(*generators_run, {"conditioning": {"boundaries": False}})
    assert {"conditioning_maps", "train_diffusion", "synthesize", "inpaint"} <= planned
    assert not planned & {"train_gan", "train_lora", "train_autoencoder", "gan_synthesize", "lora_synthesize"}, planned


def test_a_report_only_quality_setting_reruns_the_report_only(generators_run):
    """quality.lpips_pairs is read by the distribution scores alone: no consistency, curation, mixing or model."""
    planned = plan_after(*generators_run, {"quality": {"lpips_pairs": 8}})
    assert planned == {"image_quality", "summarize", "registry", "all"}, planned


def test_the_gans_synthesis_settings_rerun_no_diffusion_sampling(generators_run):
    planned = plan_after(*generators_run, {"synthesis": {"gan": {"n": 8}}})
    assert "gan_synthesize" in planned
    assert not planned & {"synthesize", "inpaint", "lora_synthesize", *TRAININGS}, planned


def test_a_segmentation_setting_retrains_no_generator(generators_run):
    """The GAN monitors fidelity in no space of a downstream model, so it waits for no segmenter."""
    planned = plan_after(*generators_run, {"segmentation": {"lr": 1.0e-3}})
    assert "train_segmentation" in planned
    assert not planned & {"train_gan", "gan_synthesize", "train_lora", "train_diffusion"}, planned


def test_kid_settings_retrain_no_gan_that_does_not_monitor_fidelity(tmp_path):
    settings = recorded_run(tmp_path, merged(GENERATORS, {"gan": {"train": {"eval_every": 0}}}))
    planned = plan_after(tmp_path, settings, {"quality": {"kid_subsets": 5}})
    assert planned == {"image_quality", "summarize", "registry", "all"}, planned


def test_nuclei_training_settings_rerun_nothing_while_the_classical_detector_runs(tiny_run):
    result = snakemake(tiny_run, "--dry-run", overlay="nuclei: {train: {steps: 7}}")
    assert planned_jobs(result.stdout + result.stderr) == set(), result.stdout[-2000:]


def test_trained_nuclei_model_through_the_workflow(tmp_path):
    overlay = (
        "nuclei: {model: trained, train: {steps: 6, batch_size: 2, crop: 64, encoder_depth: 3, mpp: 1.0,\n"
        "         decoder_channels: [16, 16, 16], checkpoint_every: 3, log_every: 1}}"
    )
    result = snakemake(tmp_path, "--until", "nuclei_quality", overlay=overlay)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # trained on the one train slide's ground truth (tiny_a), then used on every slide
    assert output.count("rule train_nuclei:") == 1 and output.count("rule nuclei_masks:") == 3
    loss = pd.read_csv(tmp_path / "results/nuclei_model/loss.csv")
    assert loss["step"].iloc[-1] == 6 and {"foreground", "boundary", "distance", "class"} <= set(loss.columns)
    assert "tiny_a" in (tmp_path / "logs/train_nuclei.log").read_text()
    quality = pd.read_csv(tmp_path / "results/nuclei/tiny_c.quality.csv").set_index("metric")["value"]
    assert {"f1", "aji", "pq", "dice"} <= set(quality.index)
    # a changed training setting retrains the model and re-segments with it
    result = snakemake(
        tmp_path, "--dry-run", "--until", "nuclei_quality", overlay=overlay.replace("steps: 6", "steps: 8")
    )
    assert planned_jobs(result.stdout + result.stderr) == {"train_nuclei", "nuclei_masks", "nuclei_quality"}
    # while the model detects, a classical detector's setting reruns nothing
    result = snakemake(
        tmp_path,
        "--dry-run",
        "--until",
        "nuclei_quality",
        overlay=overlay.replace("model: trained,", "model: trained, smoothing_um: 0.75,"),
    )
    assert planned_jobs(result.stdout + result.stderr) == set(), result.stdout[-2000:]


def test_a_gan_ratio_trains_classifiers_only(tiny_run):
    overlay = (
        "gan: {enabled: true, size: 16, ch_max: 32, width: 8, attention_g: [8], attention_d: [16], train: {steps: 4}}\n"
        "mixing: {ratios: [{name: real, synthetic: 0}, {name: gan4, synthetic: 4, sources: [gan]}]}"
    )
    result = snakemake(tiny_run, "--dry-run", overlay=overlay)
    output = result.stdout + result.stderr
    # enabling the GAN adds its own jobs and reruns nothing that ran: quality, realism and curation of its set
    # only, its ratio's mix and classifiers, the report
    assert planned_jobs(output) == {
        "train_gan",
        "gan_synthesize",
        "image_quality",
        "mask_consistency",
        "realism",
        "curate_synthetic",
        "mix_dataset",
        "train_classifier",
        "evaluate_classifier",
        "summarize",
        "registry",
        "all",
    }, output[-3000:]
    assert (
        output.count("rule image_quality:")
        == output.count("rule curate_synthetic:")
        == output.count("rule realism:")
        == output.count("rule mask_consistency:")
        == 1
    )
    assert "set=gan" in output
    # gan4: its mix and 2 folds x 1 seed of train_classifier and evaluate_classifier; no segmentation run
    assert output.count("ratio=gan4") == 1 + 2 + 2


def test_registry_shows_lineage_and_generate_reproduces_the_sets_images(tiny_run):
    """The registry rule's database: the diffusion model's lineage, and `histosynth generate` with
    the workflow's seed and settings (its registered config) remaking the synth set byte for byte."""

    def cli(*args):
        result = subprocess.run(
            [sys.executable, "-m", "histosynth.cli", *args], cwd=tiny_run, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    [model] = json.loads(cli("registry", "models", "--kind", "diffusion", "--json"))
    assert model["path"] == "results/diffusion/model" and model["parent_id"]  # latent space: its autoencoder
    shown = cli("registry", "show", str(model["id"]))
    assert "parent: model" in shown and "set" in shown and " synth: " in shown and "inpaint" in shown
    assert "dataset" in shown and "vs real" in shown  # the ratios holding its images and their verdict rows
    manifest = pd.read_parquet(tiny_run / "results/synthetic/synth/manifest.parquet")
    printed = cli("generate", str(len(manifest)), "--out", "more")
    assert f"{len(manifest)} images -> more/" in printed
    made = pd.read_parquet(tiny_run / "more/manifest.parquet")
    assert made["seed"].tolist() == manifest["seed"].tolist()
    for ours, theirs in zip(made["image"], manifest["image"]):
        assert (tiny_run / "more" / ours).read_bytes() == (tiny_run / "results/synthetic/synth" / theirs).read_bytes()
    assert "more" in cli("registry", "sets")


def test_seeds_and_run_ids_cause_no_spurious_reruns(tiny_run):
    result = snakemake(tiny_run, "--dry-run", overlay="run_id: another_name")
    assert "Nothing to be done" in result.stdout + result.stderr
    # A third seed trains and scores the new runs only; the report gathers them.
    result = snakemake(tiny_run, "--dry-run", overlay="segmentation: {seeds: [0, 1, 2]}")
    output = result.stdout + result.stderr
    assert planned_jobs(output) == {"train_segmentation", "evaluate_segmentation", "summarize", "registry", "all"}
    assert "seed=0" not in output and "seed=1" not in output and output.count("rule train_segmentation") == 3


def test_editing_a_script_reruns_its_rules(tiny_run, tmp_path):
    """A copy of the workflow with one script edited: the jobs of that script's rules rerun, nothing else."""
    import shutil

    copy = tmp_path / "workflow"
    copy.mkdir()
    for name in ("Snakefile", "workflow", "scripts", "config", "envs"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, copy / name)
    unchanged = snakemake(tiny_run, "--dry-run", snakefile=copy / "Snakefile")
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr, unchanged.stdout[-2000:]
    with open(copy / "scripts/summarize.py", "a") as script:
        script.write("# edited\n")
    edited = snakemake(tiny_run, "--dry-run", snakefile=copy / "Snakefile")
    output = edited.stdout + edited.stderr
    # the registry reads the report's tables, so it follows
    assert (
        planned_jobs(output) == {"summarize", "registry", "all"} and "Code has changed since last execution" in output
    )


def test_replacing_one_slides_annotations_reruns_only_that_slides_chain(tiny_run):
    """New annotations for the test slide tiny_c: its patches, nuclei and maps, then the evaluation;
    no model is retrained (test slides feed no training) and no other slide is touched."""

    annotations = json.loads((tiny_run / "results/demo/tiny_c.geojson").read_text())
    annotations["features"] = annotations["features"][:-1]
    (tiny_run / "tiny_c.edited.geojson").write_text(json.dumps(annotations))
    sheet = pd.read_csv(REPO / "config/slides.tiny.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet.loc[sheet["slide"] == "tiny_c", "annotations"] = "tiny_c.edited.geojson"
    sheet.to_csv(tiny_run / "slides.edited.tsv", sep="\t", index=False)
    result = snakemake(tiny_run, "--dry-run", overlay="slides: slides.edited.tsv")
    output = result.stdout + result.stderr
    assert planned_jobs(output) == {
        "extract_patches",
        "nuclei_masks",
        "nuclei_quality",
        "conditioning_maps",
        "evaluate_segmentation",
        "evaluate_classifier",
        "summarize",
        "registry",
        "all",
    }, output[-3000:]
    assert "slide=tiny_c" in output and "slide=tiny_a" not in output and "slide=tiny_b" not in output


def test_evaluation_table_and_report(tiny_run):
    table = pd.read_parquet(tiny_run / "results/report/metrics.parquet")
    seg = table[table["kind"] == "segmentation"]
    # 3 ratios x 2 seeds x (1 test slide + pooled) x 3 classes x 3 metrics
    assert len(seg) == 3 * 2 * 2 * 3 * 3 and set(seg["ratio"]) == {"real", "syn4", "synonly"}
    assert seg["value"].between(0, 1).all()
    quality = table[table["kind"] == "quality"]
    skipped = quality[quality["status"] == "skipped"]
    assert set(skipped["metric"]) >= {"fid", "kid", "is", "lpips_diversity"}  # no weights here
    for_weights = skipped[
        skipped["metric"].isin(["fid", "kid", "kid_std", "is", "is_std", "lpips_diversity"])
        & ~skipped["note"].str.contains("min_images")
    ]
    assert len(for_weights) and for_weights["note"].str.contains("fetch_weights").all()
    offline = quality[quality["metric"].isin(["fd", "kd"]) & (quality["class"] == "all")]
    assert set(offline["set"]) == {"synth", "inpaint"} and (offline["status"] == "ok").all()  # no weights needed
    assert offline["extractor"].str.startswith("segmentation encoder").all()
    consistency = quality[quality["metric"].str.contains("iou") & (quality["status"] == "ok")]
    assert len(consistency) and consistency["value"].between(0, 1).all()
    shares = pd.read_csv(tiny_run / "results/report/class_share.csv")
    counts = shares.groupby("ratio")[["n_real", "n_synthetic"]].first()
    assert counts.loc["syn4", "n_synthetic"] == 4 and counts.loc["synonly", "n_real"] == 0
    assert counts.loc["real", "n_real"] == counts.loc["syn4", "n_real"] > 0
    assert set(pd.read_parquet(tiny_run / "results/mixing/syn4.parquet").query("source == 'synthetic'")["mode"]) == {
        "inpaint"
    }
    assert set(pd.read_parquet(tiny_run / "results/mixing/synonly.parquet")["mode"]) == {"synth", "inpaint"}
    decided = pd.read_csv(tiny_run / "results/report/verdict.csv")
    assert set(decided["baseline"]) == {"real"} and set(decided["ratio"]) == {"syn4", "synonly"}
    assert (decided["n"] == 2).all() and decided["ci_low"].notna().all()  # two seeds: every row has an interval
    assert set(decided["verdict"]) <= {"helped", "hurt", "no evidence"}
    audit = pd.read_csv(tiny_run / "results/report/memorisation.csv").set_index("set")
    assert set(audit.index) == {"synth", "inpaint"} and (audit["kept"] == audit["images"]).all()  # curation off in tiny
    curated = pd.read_parquet(tiny_run / "results/curated/synth.parquet")
    assert curated["keep"].all() and curated["similarity"].notna().all() and curated["relative_distance"].notna().all()
    assert curated["feature_distance"].notna().all()  # the baseline segmenter proposes candidates
    for png in ("verdict", "metrics", "class_share", "quality", "rulegraph", "classification", "confusion"):
        assert (tiny_run / f"results/report/{png}.png").stat().st_size > 5000
    assert len(list((tiny_run / "results/report/loss").glob("*.png"))) == 3 * 2 + 3 * 2 + 2
    assert list((tiny_run / "results/evaluation/real/seed0_overlays").glob("*.png"))
    cls = table[table["kind"] == "classification"]
    # 3 ratios x 2 folds x 1 seed, pooled; accuracy, balanced accuracy, macro precision/recall/F1/AUROC + F1/AUROC x 4 labels
    assert len(cls) == 3 * 2 * (6 + 2 * 4) and set(cls["fold"]) == {0, 1} and cls["value"].between(0, 1).all()
    labelled = decided[decided["task"] == "classification"]
    assert set(labelled["metric"]) == {"accuracy", "balanced_accuracy", "f1", "auroc"}
    assert (labelled["paired_by"] == "fold x seed").all() and (labelled["n"] == 2).all()  # 2 folds x 1 seed
    summary = json.loads((tiny_run / "results/classification/syn4/fold0/seed0/summary.json").read_text())
    assert summary["n_train_synthetic"] == 4 and summary["n_train_real"] > 0
    predictions = pd.read_parquet(tiny_run / "results/classification_evaluation/real/fold1/seed0.predictions.parquet")
    test_patches = pd.read_parquet(tiny_run / "results/patches/tiny_c.parquet")
    assert sorted(predictions["patch_id"]) == sorted(test_patches["patch_id"])  # always scored on the test slide
    result = snakemake(tiny_run, "--report", "report.html")
    assert result.returncode == 0, result.stderr[-2000:]
    html = (tiny_run / "report.html").read_text()
    for text in (
        "1. Verdict",
        "4. Generative models",
        "8. Results",
        "9. Training curves",
        "rulegraph.png",
        "Did synthetic data help?",
        "Curation and memorisation",
    ):
        assert text in html


def test_logs_and_benchmarks_written(tiny_run):
    log = (tiny_run / "logs/extract_patches/tiny_a.log").read_text()
    assert "kept" in log and "patches/s" in log
    assert (tiny_run / "results/benchmarks/extract_patches/tiny_a.tsv").is_file()


def test_second_run_has_nothing_to_do(tiny_run):
    result = snakemake(tiny_run, "--dry-run")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_config_of_wrong_type_is_a_schema_error(tmp_path):
    result = snakemake(tmp_path, "--dry-run", overlay="patches: {size: big}")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "patches.size: 'big' is not of type 'integer'" in output


def test_every_rule_declares_its_resources():
    """threads, mem_mb, runtime and gpu on every rule, so profiles can size and place each job."""
    import re

    blocks, declared = [], 0
    for path in sorted((REPO / "workflow/rules").glob("*.smk")):
        text = path.read_text()
        blocks += re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", text, flags=re.M | re.S)
        declared += len(re.findall(r"^rule ", text, flags=re.M))
    assert len(blocks) == declared >= 16
    for name, body in blocks:
        assert re.search(r"^    threads: \d+", body, flags=re.M), name
        for resource in ("gpu", "mem_mb", "runtime"):
            assert re.search(rf"^        {resource}=", body, flags=re.M), f"{name}: {resource}"


def test_workflow_passes_snakemake_lint(tmp_path):
    result = snakemake(tmp_path, "--lint")
    assert result.returncode == 0 and "Congratulations" in result.stdout + result.stderr, result.stdout[-3000:]


def test_profiles_name_only_rules_of_the_workflow():
    """A renamed rule left in a profile would silently lose its threads or partition."""
    import re

    rules = {
        name
        for path in (REPO / "workflow/rules").glob("*.smk")
        for name in re.findall(r"^rule (\w+):", path.read_text(), flags=re.M)
    }
    for profile in ("cpu", "default", "slurm"):
        settings = yaml.safe_load((REPO / f"profiles/{profile}/config.yaml").read_text())
        for key in ("set-threads", "set-resources"):
            assert set(settings.get(key, {})) <= rules, (profile, key, set(settings.get(key, {})) - rules)
    cpu = yaml.safe_load((REPO / "profiles/cpu/config.yaml").read_text())
    assert not {"train_diffusion", "train_autoencoder", "train_gan", "train_lora", "train_nuclei"} & set(
        cpu["set-threads"]
    )


def test_the_cpu_profile_runs_model_jobs_side_by_side(tiny_run):
    """profiles/cpu lifts the one-gpu limit: its one-thread model jobs overlap on the 2 cores (read
    from the first run's log: jobs started and not yet finished)."""
    import re

    one_thread = set(yaml.safe_load((REPO / "profiles/cpu/config.yaml").read_text())["set-threads"])
    log = sorted((tiny_run / ".snakemake/log").glob("*.snakemake.log"))[0].read_text()
    running, most, rule = {}, 0, None
    for line in log.splitlines():
        if started := re.match(r"(?:local)?rule (\w+):", line):
            rule = started.group(1)
        elif (job := re.match(r"\s+jobid: (\d+)", line)) and rule:
            running[job.group(1)], rule = rule, None
            most = max(most, sum(name in one_thread for name in running.values()))
        elif finished := re.match(r"Finished jobid: (\d+)", line):
            running.pop(finished.group(1), None)
    assert most >= 2
