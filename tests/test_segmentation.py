"""Segmentation: a 16 px smp U-Net (mobilenet_v2, scse decoder) trained for 2 epochs on 8 images;
determinism, the run folder, early stopping, evaluation maths per slide and pooled, NaN for an
absent class, overlays, and the offline encoder-weights decision."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histosynth.evaluation.segmentation import (
    SegmentationError, build_model, encoder_weights_file, evaluate, load_model, overlay, scores_from_counts, settings_from,
    train,
)

CLASSES = ["Blood vessel", "Fat"]
TINY = {"encoder": "mobilenet_v2", "encoder_depth": 3, "decoder_channels": [32, 16, 16], "encoder_weights": None,
        "epochs": 2, "batch_size": 4, "lr": 1e-3, "patience": 5, "device": "cpu", "overlays": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_rows(folder, n, slide="s", seed=0, with_fat=True) -> pd.DataFrame:
    """16 px images: a dark 'vessel' square (class 1) and, optionally, a pale 'fat' band (class 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = np.full((16, 16, 3), (214, 120, 170), np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        y, x = rng.integers(0, 10, 2)
        image[y:y + 6, x:x + 6], mask[y:y + 6, x:x + 6] = (60, 20, 80), 1
        if with_fat:
            image[:, 14:], mask[:, 14:] = (250, 250, 250), 2
        Image.fromarray(image).save(folder / f"{slide}_{i}.png")
        Image.fromarray(mask).save(folder / f"{slide}_{i}_mask.png")
        rows.append({"patch_id": f"{slide}_{i}", "slide": slide, "image": str(folder / f"{slide}_{i}.png"),
                     "mask": str(folder / f"{slide}_{i}_mask.png")})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    train_rows, val_rows = make_rows(root / "train", 8), make_rows(root / "val", 4, seed=1)
    summary = train(train_rows, val_rows, CLASSES, root / "run", settings=TINY, seed=3, progress=False)
    return root, summary, train_rows, val_rows


def test_run_folder_and_loss_csv(trained):
    root, summary, *_ = trained
    run = root / "run"
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "config.json").is_file()
    meta = json.loads((run / "model" / "histosynth.json").read_text())
    assert meta["classes"] == {"Blood vessel": 1, "Fat": 2}
    loss = pd.read_csv(run / "loss.csv")
    assert list(loss["epoch"]) == [1, 2] and loss[["train_loss", "val_loss"]].notna().all().all()
    assert loss["step"].tolist() == [2, 4]  # 8 images, batch 4
    assert loss["lr"].iloc[1] == pytest.approx(loss["lr"].iloc[0] * 0.98)  # exponential decay
    assert summary["best_epoch"] in (1, 2) and "random init" in summary["encoder_weights"]


def test_deterministic_given_seed(trained, tmp_path):
    root, _, train_rows, val_rows = trained
    train(train_rows, val_rows, CLASSES, tmp_path / "again", settings=TINY, seed=3, progress=False)
    a, b = pd.read_csv(root / "run" / "loss.csv"), pd.read_csv(tmp_path / "again" / "loss.csv")
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))


def test_early_stopping(trained, tmp_path):
    _, _, train_rows, val_rows = trained
    settings = {**TINY, "epochs": 6, "patience": 1, "min_delta": 1e9}  # nothing counts as better after epoch 1
    summary = train(train_rows, val_rows, CLASSES, tmp_path / "es", settings=settings, seed=0, progress=False)
    assert summary["epochs_run"] == 2 and summary["best_epoch"] == 1


def test_evaluate_per_slide_pooled_and_overlays(trained, tmp_path):
    root, *_ = trained
    model = load_model(root / "run", "cpu")
    # Slide "b" has no fat at all: its per-slide Fat Dice/recall must be NaN, pooled still defined.
    rows = pd.concat([make_rows(tmp_path / "a", 3, "a", seed=5), make_rows(tmp_path / "b", 2, "b", seed=6, with_fat=False)])
    with pytest.warns(UserWarning, match="no pixels"):
        # 5 rows in batches of 4: the last batch holds one patch (torchmetrics squeezes its stats).
        table = evaluate(model, rows.reset_index(drop=True), batch_size=4, overlays_dir=tmp_path / "ov", n_overlays=2)
    assert set(table["slide"]) == {"a", "b", "all"} and set(table["metric"]) == {"dice", "precision", "recall"}
    fat_b = table[(table.slide == "b") & (table["class"] == "Fat")].set_index("metric")["value"]
    assert math.isnan(fat_b["dice"]) and math.isnan(fat_b["recall"])
    # Pooled counts are the sums of the per-slide counts, and the scores follow from them.
    d = table[table.metric == "dice"].set_index(["slide", "class"])
    for c in CLASSES:
        for col in ("tp", "fp", "fn"):
            assert d.loc[("all", c), col] == d.loc[("a", c), col] + d.loc[("b", c), col]
        tp, fp, fn = d.loc[("all", c), ["tp", "fp", "fn"]]
        assert d.loc[("all", c), "value"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert tp + fn == (36 * 5 if c == "Blood vessel" else 32 * 3)  # labelled pixels
    overlays = sorted((tmp_path / "ov").glob("*.png"))
    assert len(overlays) == 2 and all(p.stat().st_size > 0 for p in overlays)
    with Image.open(overlays[0]) as im:
        assert im.width == 3 * im.height  # image + one panel per class


def test_scores_and_overlay_colours():
    assert scores_from_counts(5, 5, 0) == {"dice": pytest.approx(10 / 15), "precision": 0.5, "recall": 1.0}
    empty = scores_from_counts(0, 0, 0)
    assert all(math.isnan(v) for v in empty.values())
    image = np.zeros((1, 3, 3), np.uint8)
    out = overlay(image, np.array([[1, 1, 0]], bool), np.array([[1, 0, 1]], bool))
    assert out[0, 0, 1] > 0 and out[0, 0, 0] == 0  # TP green
    assert out[0, 1, 2] > 0 and out[0, 1, 0] == 0  # FN blue
    assert out[0, 2, 0] > 0 and out[0, 2, 1] == 0  # FP red


def test_encoder_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    path, note = encoder_weights_file(settings_from({"encoder": "resnet18", "encoder_weights": "imagenet"}))
    assert path is None and "smp-hub/resnet18.imagenet" in note and "encoder_weights_path" in note
    # A configured state dict is loaded into the encoder.
    settings = settings_from(TINY)
    source = build_model(settings, 2)
    torch.save(source.encoder.state_dict(), tmp_path / "enc.pt")
    settings["encoder_weights_path"] = str(tmp_path / "enc.pt")
    path, _ = encoder_weights_file(settings)
    from histosynth.evaluation.segmentation import load_encoder_weights

    other = build_model(settings, 2)
    load_encoder_weights(other, path)
    for a, b in zip(source.encoder.state_dict().values(), other.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(SegmentationError, match="does not exist"):
        encoder_weights_file({**settings, "encoder_weights_path": str(tmp_path / "missing.pt")})


def test_bad_settings():
    with pytest.raises(SegmentationError, match="scse"):
        build_model({**settings_from(TINY), "decoder_channels": [32, 16, 8]}, 1)
    with pytest.raises(SegmentationError, match="encoder_depth"):
        build_model({**settings_from(TINY), "decoder_channels": [32, 16]}, 1)
