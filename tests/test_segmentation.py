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

from histosynth.config import section_defaults
from histosynth.data.io import write_table
from histosynth.evaluation.segmentation import (
    BceDiceLoss,
    SegmentationError,
    SegmentationModel,
    build_model,
    encoder_weights_file,
    load_encoder_weights,
    load_model,
    split_rows,
    train,
)
from histosynth.evaluation.segmentation_scores import evaluate, overlay
from histosynth.nets import normalise
from histosynth.overlap import overlap_scores

CLASSES = ["Blood vessel", "Fat"]
TINY = {
    "encoder": "mobilenet_v2",
    "encoder_depth": 3,
    "decoder_channels": [32, 16, 16],
    "encoder_weights": None,
    "epochs": 2,
    "batch_size": 4,
    "lr": 1e-3,
    "patience": 5,
    "device": "cpu",
    "overlays": 2,
}


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
        image[y : y + 6, x : x + 6], mask[y : y + 6, x : x + 6] = (60, 20, 80), 1
        if with_fat:
            image[:, 14:], mask[:, 14:] = (250, 250, 250), 2
        Image.fromarray(image).save(folder / f"{slide}_{i}.png")
        Image.fromarray(mask).save(folder / f"{slide}_{i}_mask.png")
        rows.append(
            {
                "patch_id": f"{slide}_{i}",
                "slide": slide,
                "image": str(folder / f"{slide}_{i}.png"),
                "mask": str(folder / f"{slide}_{i}_mask.png"),
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    train_rows, val_rows = make_rows(root / "train", 8), make_rows(root / "val", 4, seed=1)
    summary = train(
        train_rows, val_rows, CLASSES, root / "run", settings=TINY, seed=3, weights_dir=root / "weights", progress=False
    )
    return root, summary, train_rows, val_rows


def val_loss_of(run, val_rows) -> float:
    """The validation loss of a run's saved model, recomputed (the 4 val rows are one batch, as in training)."""
    from histosynth.evaluation.segmentation import SegmentationDataset

    model = load_model(run, "cpu")
    batch = [SegmentationDataset(val_rows, list(model.classes.values()))[i] for i in range(len(val_rows))]
    images, targets = torch.stack([b["image"] for b in batch]), torch.stack([b["target"] for b in batch])
    with torch.no_grad():
        return float(BceDiceLoss()(model.net(normalise(images)), targets))


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
    # the kept epoch is the one of lowest validation loss, and the saved model is that epoch's
    best = int(loss.loc[loss["val_loss"].idxmin(), "epoch"])
    assert summary["best_epoch"] == best == meta["best_epoch"]
    assert summary["best_val_loss"] == pytest.approx(loss["val_loss"].min(), rel=1e-6)
    assert val_loss_of(run, trained[3]) == pytest.approx(loss["val_loss"].min(), rel=1e-4)
    assert "random init" in summary["encoder_weights"]


def test_deterministic_given_seed(trained, tmp_path):
    root, _, train_rows, val_rows = trained
    train(
        train_rows, val_rows, CLASSES, tmp_path / "again", settings=TINY, seed=3, weights_dir=tmp_path, progress=False
    )
    a, b = pd.read_csv(root / "run" / "loss.csv"), pd.read_csv(tmp_path / "again" / "loss.csv")
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))


def test_early_stopping(trained, tmp_path):
    _, _, train_rows, val_rows = trained
    settings = {**TINY, "epochs": 6, "patience": 1, "min_delta": 1e9}  # nothing counts as better after epoch 1
    summary = train(
        train_rows, val_rows, CLASSES, tmp_path / "es", settings=settings, seed=0, weights_dir=tmp_path, progress=False
    )
    assert summary["epochs_run"] == 2 and summary["best_epoch"] == 1
    loss = pd.read_csv(tmp_path / "es" / "loss.csv")
    assert len(loss) == 2 and loss["val_loss"].iloc[0] != loss["val_loss"].iloc[1]
    # the model kept is epoch 1's, not the last one trained
    assert val_loss_of(tmp_path / "es", val_rows) == pytest.approx(loss["val_loss"].iloc[0], rel=1e-4)


def test_evaluate_per_slide_pooled_and_overlays(trained, tmp_path):
    root, *_ = trained
    model = load_model(root / "run", "cpu")
    # Slide "b" has no fat at all: its per-slide Fat Dice/recall must be NaN, pooled still defined.
    rows = pd.concat(
        [make_rows(tmp_path / "a", 3, "a", seed=5), make_rows(tmp_path / "b", 2, "b", seed=6, with_fat=False)]
    )
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
    assert overlap_scores(5, 5, 0) == {"dice": pytest.approx(10 / 15), "iou": 0.5, "precision": 0.5, "recall": 1.0}
    empty = overlap_scores(0, 0, 0)
    assert all(math.isnan(v) for v in empty.values())
    assert overlap_scores(0, 0, 0, empty=1.0) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    image = np.zeros((1, 3, 3), np.uint8)
    out = overlay(image, np.array([[1, 1, 0]], bool), np.array([[1, 0, 1]], bool))
    assert out[0, 0, 1] > 0 and out[0, 0, 0] == 0  # TP green
    assert out[0, 1, 2] > 0 and out[0, 1, 0] == 0  # FN blue
    assert out[0, 2, 0] > 0 and out[0, 2, 1] == 0  # FP red


def test_encoder_weights_offline(tmp_path):
    from safetensors.torch import save_file

    weights_dir = tmp_path / "weights"
    imagenet = section_defaults("segmentation", {"encoder": "resnet18", "encoder_weights": "imagenet"})
    path, note = encoder_weights_file(imagenet, weights_dir)
    expected = weights_dir / "smp-resnet18-imagenet.safetensors"
    assert path is None and str(expected) in note and "fetch_weights" in note and "random init" in note
    assert "segmentation.encoder_weights_path" in note
    # the fetched file in weights_dir is found and loads into the encoder
    source = build_model(imagenet, 2)
    weights_dir.mkdir()
    save_file({f"encoder.{k}": v.contiguous() for k, v in source.encoder.state_dict().items()}, expected)
    path, note = encoder_weights_file(imagenet, weights_dir)
    assert path == expected and "ImageNet" in note
    other = build_model(imagenet, 2)
    load_encoder_weights(other, path)
    for a, b in zip(source.encoder.state_dict().values(), other.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # encoder_weights null: random init even with the file present
    assert encoder_weights_file({**imagenet, "encoder_weights": None}, weights_dir)[0] is None
    # A configured state dict is loaded into the encoder.
    settings = section_defaults("segmentation", TINY)
    source = build_model(settings, 2)
    torch.save(source.encoder.state_dict(), tmp_path / "enc.pt")
    settings["encoder_weights_path"] = str(tmp_path / "enc.pt")
    path, _ = encoder_weights_file(settings, weights_dir)
    assert path == tmp_path / "enc.pt"
    other = build_model(settings, 2)
    load_encoder_weights(other, path)
    for a, b in zip(source.encoder.state_dict().values(), other.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(SegmentationError, match="does not exist"):
        encoder_weights_file({**settings, "encoder_weights_path": str(tmp_path / "missing.pt")}, weights_dir)


def test_bad_settings():
    with pytest.raises(SegmentationError, match="scse"):
        build_model({**section_defaults("segmentation", TINY), "decoder_channels": [32, 16, 8]}, 1)
    with pytest.raises(SegmentationError, match="encoder_depth"):
        build_model({**section_defaults("segmentation", TINY), "decoder_channels": [32, 16]}, 1)


def test_training_learns_the_toy_masks(tmp_path):
    """Dark squares are vessel, the pale band fat: a few epochs lower the validation loss and
    raise the validation Dice far above the untrained network's."""
    train_rows, val_rows = make_rows(tmp_path / "train", 16), make_rows(tmp_path / "val", 8, seed=1)
    settings = {**TINY, "epochs": 8, "lr": 1e-2, "augment": False, "batch_size": 8, "patience": 100}
    summary = train(
        train_rows, val_rows, CLASSES, tmp_path / "run", settings=settings, seed=0, weights_dir=tmp_path, progress=False
    )
    loss = pd.read_csv(tmp_path / "run" / "loss.csv")
    assert len(loss) == 8 and summary["best_epoch"] == int(loss.loc[loss["val_loss"].idxmin(), "epoch"])
    assert loss["train_loss"].iloc[-1] < 0.3 * loss["train_loss"].iloc[0]
    assert loss["val_loss"].iloc[-1] < 0.5 * loss["val_loss"].iloc[0]
    assert loss["val_dice"].iloc[-1] > 0.8 and loss["val_dice"].iloc[-1] > loss["val_dice"].iloc[0] + 0.3
    dice = evaluate(load_model(tmp_path / "run", "cpu"), val_rows, batch_size=8)
    dice = dice[(dice.slide == "all") & (dice.metric == "dice")].set_index("class")["value"]
    assert dice["Blood vessel"] > 0.8 and dice["Fat"] > 0.8


class Ramp(torch.nn.Module):
    """A stand-in network: the vessel probability rises across the columns, (c + 0.5) / width in
    column c; fat is never likely (probability ~1e-9)."""

    def forward(self, x):
        n, _, h, w = x.shape
        vessel = torch.logit((torch.arange(w) + 0.5) / w).expand(n, 1, h, w)
        return torch.cat([vessel, torch.full_like(vessel, -20.0)], 1)


@pytest.mark.filterwarnings("ignore:class 'Fat' has no pixels")
def test_threshold_decides_the_positive_pixels(tmp_path):
    rows = make_rows(tmp_path / "rows", 3, with_fat=False)
    truth = np.stack([np.asarray(Image.open(m)) == 1 for m in rows["mask"]])
    image = np.asarray(Image.open(rows["image"][0]))
    for threshold, first in ((0.5, 8), (0.8, 13)):  # p >= 0.5 from column 8 on, p >= 0.8 from column 13
        model = SegmentationModel(Ramp(), {"Blood vessel": 1, "Fat": 2}, threshold, torch.device("cpu"))
        expected = np.zeros((16, 16), np.uint8)
        expected[:, first:] = 1
        assert np.array_equal(model.predict(image), expected)
        table = evaluate(model, rows, batch_size=2)
        counts = table[(table.slide == "all") & (table.metric == "dice")].set_index("class").loc["Blood vessel"]
        pred = np.zeros_like(truth)
        pred[..., first:] = True
        assert (counts.tp, counts.fp, counts.fn) == ((truth & pred).sum(), (~truth & pred).sum(), (truth & ~pred).sum())


class RampVesselOnly(torch.nn.Module):
    """Ramp's vessel channel alone: a one-class (binary, as in the thesis) model."""

    def forward(self, x):
        return Ramp()(x)[:, :1]


def test_evaluate_scores_a_single_class(tmp_path):
    rows = make_rows(tmp_path / "rows", 3, with_fat=False)
    truth = np.stack([np.asarray(Image.open(m)) == 1 for m in rows["mask"]])
    model = SegmentationModel(RampVesselOnly(), {"Blood vessel": 1}, 0.5, torch.device("cpu"))
    table = evaluate(model, rows, batch_size=2)
    assert set(table["class"]) == {"Blood vessel"}
    pooled = table[(table.slide == "all") & (table.metric == "dice")].iloc[0]
    pred = np.zeros_like(truth)
    pred[..., 8:] = True
    assert (pooled.tp, pooled.fp, pooled.fn) == ((truth & pred).sum(), (~truth & pred).sum(), (truth & ~pred).sum())


def test_validation_dice_uses_the_threshold(trained, tmp_path):
    root, _, train_rows, val_rows = trained
    train(
        train_rows,
        val_rows,
        CLASSES,
        tmp_path / "strict",
        settings={**TINY, "threshold": 0.95},
        seed=3,
        weights_dir=tmp_path,
        progress=False,
    )
    default, strict = pd.read_csv(root / "run" / "loss.csv"), pd.read_csv(tmp_path / "strict" / "loss.csv")
    # the threshold changes nothing of the training, only which pixels count as found
    pd.testing.assert_frame_equal(default[["train_loss", "val_loss"]], strict[["train_loss", "val_loss"]])
    assert (default["val_dice"] != strict["val_dice"]).all()
    assert load_model(tmp_path / "strict", "cpu").threshold == 0.95 and load_model(root / "run", "cpu").threshold == 0.5


def test_split_rows_reads_one_split_with_absolute_paths(tmp_path):
    for name, splits in (("a", ["train", "val"]), ("b", ["val", "test"])):
        index = pd.DataFrame(
            {
                "patch_id": [f"{name}{i}" for i in range(2)],
                "split": splits,
                "image": [f"{name}/images/{i}.png" for i in range(2)],
                "mask": [f"{name}/masks/{i}.png" for i in range(2)],
            }
        )
        write_table(index, tmp_path / "indexes" / f"{name}.parquet")
    paths = [tmp_path / "indexes" / "a.parquet", tmp_path / "indexes" / "b.parquet"]
    val = split_rows(paths, "val")
    assert val["patch_id"].tolist() == ["a1", "b0"] and val.index.tolist() == [0, 1]
    assert val["image"].tolist() == [
        str(tmp_path / "indexes" / "a/images/1.png"),
        str(tmp_path / "indexes" / "b/images/0.png"),
    ]
    assert val["mask"].tolist() == [
        str(tmp_path / "indexes" / "a/masks/1.png"),
        str(tmp_path / "indexes" / "b/masks/0.png"),
    ]
    assert split_rows(paths, "test")["patch_id"].tolist() == ["b1"] and split_rows(paths, "none").empty
