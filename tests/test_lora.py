"""Stable Diffusion + LoRA (seed 004; histosynth.generators.lora): the base-model checks, prompts,
fine-tuning through the shared loop with small checkpoints and bit-identical resume, the adapter
reloading onto the base model and changing its images, and the per-scale synthetic set. A tiny
Stable Diffusion built in the test (tests/tiny_sd.py), CPU, seconds."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from histosynth.data.io import write_relative
from histosynth.generators import base_model, lora
from histosynth.generators.base_model import LoraError, check_base_model, require_extra
from histosynth.generators.label_sets import lora_stage
from histosynth.generators.lora import class_prompts, load_pipeline, sample, train
from histosynth.generators.set_files import SynthesisError
from histosynth.generators.table import MANIFEST
from histosynth.training.checkpoints import checkpoints

from helpers import Toy
from tiny_sd import write_tiny_stable_diffusion

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LABELS = ["red", "blue"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd", sample_size=32)


def settings(base: Path, **train_settings) -> dict:
    return {
        "base_model": str(base),
        "train": {
            "steps": 4,
            "batch_size": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "sample_every": 2,
            "sample_count": 2,
            "lr": 1e-2,
            "lr_text": 1e-2,
            **train_settings,
        },
    }


FAST = {"lora": {"steps": 2, "guidance": 3.0}}  # preview and set sampling: 2 Euler steps


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    train(Toy(n=6), out, settings(base), seed=0, labels=LABELS, synthesis=FAST)
    return out


def test_base_model_errors_list_what_is_missing_and_how_to_get_it(base, tmp_path):
    assert check_base_model(base) == base
    with pytest.raises(LoraError, match="lora.base_model is not set.*save_pretrained"):
        check_base_model(None)
    with pytest.raises(LoraError, match="no such folder"):
        check_base_model(tmp_path / "absent")
    broken = shutil.copytree(base, tmp_path / "broken")
    shutil.rmtree(broken / "tokenizer")
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(LoraError, match=r"missing tokenizer, unet/ weights \(\*\.safetensors\);.*from_single_file"):
        check_base_model(broken)


def test_missing_extra_names_the_pip_command(monkeypatch):
    require_extra()
    monkeypatch.setattr(base_model, "_absent", lambda module: module == "peft")
    with pytest.raises(LoraError, match=r"need peft: pip install -e '\.\[lora\]'"):
        require_extra()


def test_prompts_from_a_template_or_a_mapping():
    assert class_prompts("histopathology patch, {class}", LABELS) == {
        "red": "histopathology patch, red",
        "blue": "histopathology patch, blue",
    }
    assert class_prompts({"red": "eosin", "blue": "haematoxylin"}, LABELS)["blue"] == "haematoxylin"
    with pytest.raises(LoraError, match=r"labels \['blue'\]"):
        class_prompts({"red": "eosin"}, LABELS)
    with pytest.raises(LoraError, match="has no {class}"):
        class_prompts("histopathology patch", LABELS)


def test_training_writes_a_small_adapter_losses_and_label_rows_of_previews(trained, base):
    files = sorted(p.name for p in (trained / "adapter").iterdir())
    assert files == ["histosynth.json", "pytorch_lora_weights.safetensors"]
    meta = json.loads((trained / "adapter" / "histosynth.json").read_text())
    assert meta["labels"] == LABELS and meta["prompts"]["red"] == "histopathology patch, red"
    assert meta["base_model"] == str(base) and len(meta["base_hash"]) == 64 and meta["resolution"] == 32
    weights = load_file(trained / "adapter" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in weights) and any(k.startswith("text_encoder.") for k in weights)
    with open(trained / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and all(float(r["loss"]) > 0 for r in rows)
    assert {p.name for p in (trained / "samples").iterdir()} == {"step-2.png", "step-4.png"}
    assert Image.open(trained / "samples" / "step-4.png").size == (2 * 34 + 2, 2 * 34 + 2)  # 2 seeds x 2 labels
    # checkpoints hold the LoRA weights alone: a fraction of the base U-Net
    [checkpoint] = [c for c in checkpoints(trained / "checkpoints") if c.name == "step-4"]
    saved = load_file(next((checkpoint / "model").glob("*.safetensors")))
    assert saved and all("lora_" in k for k in saved)
    base_unet = sum(p.stat().st_size for p in (base / "unet").glob("*.safetensors"))
    assert sum(p.stat().st_size for p in (checkpoint / "model").glob("*.safetensors")) < base_unet / 4


def test_the_adapter_reloads_onto_the_base_model_and_changes_its_images(trained):
    pipe, meta = load_pipeline(trained / "adapter")
    draw = dict(size=32, steps=2, guidance=3.0)
    prompts, seeds = ["histopathology patch, red"] * 2, [5, 6]
    adapted, again, plain = (
        sample(pipe, prompts, seeds, **draw),
        sample(pipe, prompts, seeds, **draw, scale=1.0),
        sample(pipe, prompts, seeds, **draw, scale=0.0),
    )
    pipe.unload_lora_weights()
    base_images = sample(pipe, prompts, seeds, **draw)
    assert adapted.shape == (2, 32, 32, 3) and adapted.dtype == np.uint8
    np.testing.assert_array_equal(adapted, again)
    np.testing.assert_array_equal(plain, base_images)  # LoRA weight 0 is the base model
    assert np.abs(adapted.astype(int) - base_images).mean() > 2
    # the trained model's own pipeline gives the reloaded adapter's images
    model = lora.LoraStableDiffusion(meta["base_model"], 4, None, True, meta["prompts"], LABELS)
    model.load_state_dict(load_file(next((trained / "checkpoints" / "step-4" / "model").glob("*.safetensors"))))
    own = model.eval().pipeline()
    own.set_progress_bar_config(disable=True)
    assert np.abs(sample(own, prompts, seeds, **draw).astype(int) - adapted).max() <= 1


def test_resume_is_bit_identical(base, tmp_path):
    """4 steps straight vs 2 steps and a rerun with steps 4 resuming from step-2: the same LoRA
    weights, optimiser state and losses."""
    quiet = {"sample_every": 0}
    train(Toy(n=6), tmp_path / "a", settings(base, **quiet), seed=1, labels=LABELS)
    train(Toy(n=6), tmp_path / "b", settings(base, steps=2, **quiet), seed=1, labels=LABELS)
    train(Toy(n=6), tmp_path / "b", settings(base, **quiet), seed=1, labels=LABELS)
    a, b = (
        load_file(next((tmp_path / run / "checkpoints" / "step-4" / "model").glob("*.safetensors"))) for run in "ab"
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [pd.read_csv(tmp_path / run / "loss.csv")["loss"].tolist() for run in "ab"]
    assert losses[0] == losses[1]


def test_lora_set_per_label_and_scale_at_the_patch_size(trained, base, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    rows = []
    for i, colour in enumerate([(200, 40, 40), (40, 40, 200)] * 2):
        Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(real / f"{i}.png")
        rows.append(
            {
                "patch_id": f"p{i}",
                "slide": "s",
                "image": str(real / f"{i}.png"),
                "split": "train",
                "label": LABELS[i % 2],
            }
        )
    write_relative(pd.DataFrame(rows), real / "index.parquet", ("image",))
    labels = {"source": "sheet", "classes": LABELS, "regions": [], "background": None}
    synthesis = {"batch_size": 2, "grid_per_class": 2, "lora": {"n": 3, "steps": 2, "guidance": 3.0}}
    sets = {
        scale: lora_stage(
            trained / "adapter",
            [real / "index.parquet"],
            tmp_path / f"lora{scale}",
            settings=synthesis,
            labels=labels,
            size=64,
            seed=0,
            scale=scale,
        )
        for scale in (1.0, 0.0)
    }
    full = sets[1.0]
    assert full["class"].tolist() == ["red", "red", "blue"] and full["label"].tolist() == [0, 0, 1]
    assert (full["mode"] == "lora100").all() and full["id"].iloc[0] == "lora100-000000"
    assert full["prompt"].tolist() == ["histopathology patch, red"] * 2 + ["histopathology patch, blue"]
    assert (
        set(full["lora_scale"]) == {1.0}
        and (full["base_hash"] == json.loads((trained / "adapter" / "histosynth.json").read_text())["base_hash"]).all()
    )
    assert full["seed"].tolist() == sets[0.0]["seed"].tolist()  # the scales pair image for image
    written = pd.read_parquet(tmp_path / "lora1.0" / MANIFEST)
    image = np.asarray(Image.open(tmp_path / "lora1.0" / written["image"].iloc[0]))
    assert image.shape == (64, 64, 3)
    other = np.asarray(Image.open(tmp_path / "lora0.0" / "images" / "lora0-000000.png"))  # the same seed at weight 0
    assert np.abs(image.astype(int) - other).mean() > 2
    assert {p.name for p in (tmp_path / "lora1.0").glob("grid_*.png")} == {"grid_red.png", "grid_blue.png"}
    with pytest.raises(SynthesisError, match="trained on the labels"):
        lora_stage(
            trained / "adapter",
            [real / "index.parquet"],
            tmp_path / "wrong",
            settings=synthesis,
            labels={**labels, "classes": ["a", "b"]},
            size=64,
            seed=0,
            scale=1.0,
        )


def test_a_changed_base_model_is_refused(trained, base, tmp_path):
    moved = shutil.copytree(trained / "adapter", tmp_path / "adapter")
    meta = json.loads((moved / "histosynth.json").read_text())
    changed = shutil.copytree(base, tmp_path / "changed-sd")
    config = json.loads((changed / "scheduler" / "scheduler_config.json").read_text())
    (changed / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "beta_end": 0.02}))
    (moved / "histosynth.json").write_text(json.dumps({**meta, "base_model": str(changed)}))
    with pytest.raises(LoraError, match="changed since the adapter"):
        load_pipeline(moved)
