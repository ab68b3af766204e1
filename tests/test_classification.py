"""Classification: hand-worked metrics (NaN for an absent class), the confusion matrix, class
weights, slide-grouped stratified folds, a timm test model (test_efficientnet, 32 px) learning
red from blue, seed-fixed initial weights, a frozen backbone, offline ImageNet weights (weights
folder and Hugging Face cache, never the network) and the rule entries end to end."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histosynth.config import section_defaults
from histosynth.data.io import write_relative
from histosynth.evaluation import classification
from histosynth.evaluation.classification import class_weights, train
from histosynth.evaluation.classification_metrics import classification_metrics, confusion
from histosynth.evaluation.classification_stage import (
    evaluate_classifier,
    fold_assignment,
    train_classifier,
    training_sets,
)
from histosynth.evaluation.classifier import (
    ClassificationDataset,
    ClassificationError,
    build_classifier,
    classifier_weights_file,
    initial_model,
    load_backbone_weights,
    load_classifier,
)
from histosynth.evaluation.mixing import write_mix

CLASSES = ["blue", "red"]
MODEL = "test_efficientnet"  # timm's own tiny test network (~0.4 M parameters)
TINY = {"model": MODEL, "pretrained": False, "epochs": 3, "batch_size": 8, "lr": 3e-3, "patience": 5, "device": "cpu"}
LABELS = {"source": "sheet", "classes": CLASSES, "regions": [], "background": "background"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_rows(folder, n, slide, label, seed=0) -> pd.DataFrame:
    """n noisy 32 px PNGs of one slide: reddish for 'red', bluish for 'blue'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tint = np.array([70, -35, -35]) if label == "red" else np.array([-35, -35, 70])
    rows = []
    for i in range(n):
        image = np.clip(rng.normal(150, 35, (32, 32, 3)) + tint, 0, 255).astype(np.uint8)
        path = folder / f"{slide}_{i}.png"
        Image.fromarray(image).save(path)
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / f"{slide}_{i}_mask.png")
        rows.append(
            {
                "patch_id": f"{slide}_{i}",
                "slide": slide,
                "image": str(path),
                "mask": str(folder / f"{slide}_{i}_mask.png"),
                "class": label,
                "label": label,
            }
        )
    return pd.DataFrame(rows)


def two_slides(folder, n, first, seed=0) -> pd.DataFrame:
    """n images of a red and n of a blue slide."""
    return pd.concat(
        [make_rows(folder, n, f"{first}r", "red", seed), make_rows(folder, n, f"{first}b", "blue", seed + 1)],
        ignore_index=True,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    train_rows = two_slides(root / "train", 12, "t").assign(source=["real"] * 20 + ["synthetic"] * 4)
    val_rows = two_slides(root / "val", 8, "v", seed=5)
    summary = train(
        train_rows, val_rows, CLASSES, root / "run", settings=TINY, seed=3, weights_dir=root / "weights", progress=False
    )
    return root, summary, train_rows, val_rows


# ----------------------------------------------------------------------------- metrics

# 6 patches, 3 classes; argmax predictions 0 1 1 1 2 0 against targets 0 0 1 1 2 2
TARGET = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])


def scores(table: pd.DataFrame) -> dict:
    return {(row["class"], row["metric"]): row["value"] for row in table.to_dict("records")}


def test_metrics_of_a_hand_worked_example():
    got = scores(classification_metrics(TARGET, PROBS, ["a", "b", "c"]))
    assert got[("all", "accuracy")] == pytest.approx(4 / 6)
    # recall a 1/2, b 2/2, c 1/2; precision a 1/2, b 2/3, c 1/1
    assert got[("all", "balanced_accuracy")] == pytest.approx(2 / 3) == got[("all", "recall")]
    assert got[("all", "precision")] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    f1 = {"a": 0.5, "b": 2 * (2 / 3) / (5 / 3), "c": 2 * 0.5 / 1.5}
    for name, value in f1.items():
        assert got[(name, "f1")] == pytest.approx(value)
    assert got[("all", "f1")] == pytest.approx(sum(f1.values()) / 3)
    # one-vs-rest AUROC by pair counting: a 7/8 (0.3 < the negative 0.5), b 7/8 (0.5 < 0.6), c 8/8
    auroc = {"a": 7 / 8, "b": 7 / 8, "c": 1.0}
    for name, value in auroc.items():
        assert got[(name, "auroc")] == pytest.approx(value)
    assert got[("all", "auroc")] == pytest.approx(11 / 12)
    assert np.array_equal(confusion(TARGET, PROBS.argmax(1), 3), [[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_perfect_predictions_score_one():
    probs = np.eye(3)[TARGET] * 0.8 + 0.2 / 3
    table = classification_metrics(TARGET, probs, ["a", "b", "c"])
    assert len(table) == 6 + 2 * 3 and np.allclose(table["value"], 1.0)


def test_metrics_with_absent_classes():
    """Class c is predicted but never true, class d neither: NaN where undefined, macros over the defined."""
    target = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array(
        [
            [0.8, 0.1, 0.1, 0],
            [0.6, 0.2, 0.2, 0],
            [0.2, 0.7, 0.1, 0],
            [0.1, 0.2, 0.7, 0],
            [0.3, 0.3, 0.4, 0],
            [0.3, 0.6, 0.1, 0],
        ]
    )
    got = scores(classification_metrics(target, probs, ["a", "b", "c", "d"]))  # predictions 0 0 1 2 2 1
    assert got[("all", "balanced_accuracy")] == pytest.approx(2 / 3)  # a 2/3, b 2/3; c and d have no recall
    assert got[("c", "f1")] == 0.0 and math.isnan(got[("d", "f1")])  # c was predicted (wrongly), d never
    assert got[("all", "f1")] == pytest.approx((0.8 + 0.8 + 0) / 3)
    assert math.isnan(got[("c", "auroc")]) and math.isnan(got[("d", "auroc")])
    # a: positives .8 .6 .3 against .2 .1 .3 -> 8.5 of 9 pairs (a tie counts half); b: 7.5 of 9
    assert got[("a", "auroc")] == pytest.approx(8.5 / 9) and got[("b", "auroc")] == pytest.approx(7.5 / 9)
    assert got[("all", "auroc")] == pytest.approx((8.5 / 9 + 7.5 / 9) / 2)


def test_confusions_per_ratio_in_one_png(tmp_path):
    from histosynth.evaluation.report_plots import plot_confusions

    predictions = pd.DataFrame(
        {
            "ratio": ["real"] * 6 + ["syn"] * 6,
            "fold": 0,
            "seed": 0,
            "true": np.tile(TARGET, 2),
            "pred": np.tile(PROBS.argmax(1), 2),
        }
    )
    with Image.open(plot_confusions(predictions, ["a", "b", "c"], tmp_path / "c.png", ["real", "syn"])) as image:
        assert image.format == "PNG" and image.width > 1.6 * image.height  # two panels side by side


def test_class_weights_are_inverse_frequency():
    weights = class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([4 / 6, 4 / 2, 0.0])  # n / (k n_c), k = 2 classes present
    assert float(weights[torch.tensor([0, 0, 0, 1])].sum()) == pytest.approx(4)  # mean weight per image 1


# ----------------------------------------------------------------------------- folds


def test_folds_group_slides_stratify_and_repeat():
    # 9 slides of class a, 3 of b, 5 patches each: a stratified 3-fold split puts one b slide in every fold
    rows = pd.DataFrame([{"slide": f"s{j:02d}", "class": "a" if j < 9 else "b"} for j in range(12) for _ in range(5)])
    for seed in (0, 1, 2):
        folds = fold_assignment(rows, 3, seed)
        assert sorted(folds) == sorted(rows["slide"].unique()) and set(folds.values()) == {0, 1, 2}
        b_slides = [folds[s] for s in ("s09", "s10", "s11")]
        assert sorted(b_slides) == [0, 1, 2]
        assert fold_assignment(rows, 3, seed) == folds
    assert len({tuple(fold_assignment(rows, 3, seed).items()) for seed in range(4)}) > 1  # the seed shuffles
    with pytest.raises(ClassificationError, match=r"classification.folds=13 .* found 12"):
        fold_assignment(rows, 13, 0)


def test_training_sets_of_folds(tmp_path):
    real = pd.concat(
        [
            make_rows(tmp_path, 3, f"s{j}", "red" if j % 2 else "blue").assign(split="train" if j < 4 else "val")
            for j in range(6)
        ],
        ignore_index=True,
    ).assign(source="real")
    synthetic = pd.concat(
        [
            make_rows(tmp_path, 2, "syn_a", "red").assign(source_slide="s1"),
            make_rows(tmp_path, 1, "syn_b", "blue").assign(source_slide="s2"),
        ],
        ignore_index=True,
    )
    manifest = pd.concat([real[real["split"] == "train"], synthetic.assign(source="synthetic")], ignore_index=True)
    train_rows, val_rows = training_sets(manifest, real, folds=1, fold=0, seed=0)
    assert train_rows is manifest and set(val_rows["slide"]) == {"s4", "s5"}
    seen = set()
    for fold in range(3):
        train_rows, val_rows = training_sets(manifest, real, folds=3, fold=fold, seed=0)
        held = set(val_rows["slide"])
        assert held and not held & set(train_rows.loc[train_rows["source"] == "real", "slide"])
        # the manifest's synthetic rows train in every fold, except those made from a validating slide's maps
        made_from = train_rows.loc[train_rows["source"] == "synthetic", "source_slide"]
        assert set(made_from) == {"s1", "s2"} - held and len(made_from) == 2 * ("s1" in set(made_from)) + (
            "s2" in set(made_from)
        )
        assert len(train_rows[train_rows["source"] == "real"]) + len(val_rows) == len(real)  # real rows from the index
        seen |= held
    assert seen == set(real["slide"])
    with pytest.raises(ClassificationError, match="fold 3"):
        training_sets(manifest, real, folds=3, fold=3, seed=0)


# ----------------------------------------------------------------------------- training


def test_training_learns_red_from_blue_and_writes_the_run(trained):
    root, summary, _, val_rows = trained
    run = root / "run"
    loss = pd.read_csv(run / "loss.csv")
    assert list(loss.columns) == ["step", "epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"]
    assert loss["epoch"].tolist() == [1, 2, 3] and loss["step"].tolist() == [3, 6, 9]  # 24 images, batch 8
    assert loss["val_accuracy"].iloc[-1] > 0.9 and loss["train_loss"].iloc[-1] < loss["train_loss"].iloc[0]
    best = int(loss.loc[loss["val_loss"].idxmin(), "epoch"])
    meta = json.loads((run / "model" / "histosynth.json").read_text())
    assert summary["best_epoch"] == best == meta["best_epoch"] and meta["class_names"] == CLASSES
    assert meta["model"] == MODEL and meta["normalisation"]["mean"] == [0.485, 0.456, 0.406]
    assert (summary["n_train"], summary["n_val"], summary["n_train_real"], summary["n_train_synthetic"]) == (
        24,
        16,
        20,
        4,
    )
    assert summary["train_class_counts"] == {"blue": 12, "red": 12} and "random init" in summary["weights"]
    assert json.loads((run / "summary.json").read_text())["best_val_loss"] == pytest.approx(loss["val_loss"].min())
    # the saved model is the best epoch's: it reproduces that epoch's validation loss and accuracy
    model = load_classifier(run, "cpu")
    probs = model.predict_proba(val_rows)
    target = np.array([CLASSES.index(c) for c in val_rows["class"]])
    assert -np.log(probs[np.arange(len(target)), target]).mean() == pytest.approx(loss["val_loss"].min(), rel=1e-4)
    assert (probs.argmax(1) == target).mean() == pytest.approx(loss.loc[loss["epoch"] == best, "val_accuracy"].item())
    # uint8 batches give the same probabilities as rows
    images = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(p)).transpose(2, 0, 1).copy()) for p in val_rows["image"]]
    )
    assert np.allclose(model.predict_proba(images, batch_size=5), probs, atol=1e-5)


def test_deterministic_given_seed(trained, tmp_path):
    root, _, train_rows, val_rows = trained
    train(
        train_rows, val_rows, CLASSES, tmp_path / "again", settings=TINY, seed=3, weights_dir=tmp_path, progress=False
    )
    a, b = pd.read_csv(root / "run" / "loss.csv"), pd.read_csv(tmp_path / "again" / "loss.csv")
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))


def start_states(monkeypatch) -> list[dict]:
    """Record the state dict of every network train() starts from."""
    states = []

    def recording(*args, **kwargs):
        net, note = initial_model(*args, **kwargs)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
        return net, note

    monkeypatch.setattr(classification, "initial_model", recording)
    return states


def test_initial_weights_depend_on_the_seed_only(trained, tmp_path, monkeypatch):
    _, _, train_rows, val_rows = trained
    states = start_states(monkeypatch)
    other = two_slides(tmp_path / "other", 5, "o", seed=9)  # a different training set, as another ratio's
    one = {**TINY, "epochs": 1}
    for i, (rows, seed) in enumerate(((train_rows, 4), (other, 4), (other, 5))):
        train(
            rows, val_rows, CLASSES, tmp_path / f"r{i}", settings=one, seed=seed, weights_dir=tmp_path, progress=False
        )
    assert len(states) == 3
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_freeze_trains_the_head_alone(trained, tmp_path, monkeypatch):
    _, _, train_rows, val_rows = trained
    states = start_states(monkeypatch)
    train(
        train_rows,
        val_rows,
        CLASSES,
        tmp_path / "frozen",
        settings={**TINY, "epochs": 2, "freeze": True},
        seed=1,
        weights_dir=tmp_path,
        progress=False,
    )
    trained_state = load_classifier(tmp_path / "frozen", "cpu").net.state_dict()
    backbone = [k for k in trained_state if k.startswith("backbone.")]
    head = [k for k in trained_state if k.startswith("head.")]
    assert backbone and head
    assert all(torch.equal(states[0][k], trained_state[k]) for k in backbone)  # weights and BatchNorm statistics
    assert not torch.equal(states[0]["head.2.weight"], trained_state["head.2.weight"])
    assert not torch.equal(states[0]["head.0.running_mean"], trained_state["head.0.running_mean"])


def test_dataset_resizes_and_normalises(tmp_path):
    rows = make_rows(tmp_path, 1, "s", "red")
    item = ClassificationDataset(rows, CLASSES, image_size=48, mean=(0.5,) * 3, std=(0.5,) * 3)[0]
    assert item["image"].shape == (3, 48, 48) and item["target"].item() == 1
    raw = np.asarray(Image.open(rows["image"][0])).astype(np.float32) / 255
    assert float(item["image"][0].mean()) == pytest.approx((raw[..., 0].mean() - 0.5) / 0.5, abs=0.02)
    with pytest.raises(ValueError, match="green"):
        ClassificationDataset(rows.assign(**{"class": "green"}), CLASSES)


# ----------------------------------------------------------------------------- weights


def test_backbone_weights_from_a_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    settings = section_defaults("classification", {**TINY, "pretrained": True})
    weights_dir = tmp_path / "weights"
    path, note = classifier_weights_file(settings, weights_dir)
    expected = weights_dir / f"timm-{MODEL}.safetensors"
    assert path is None and str(expected) in note and "fetch_weights" in note and "random init" in note
    assert f"timm.create_model('{MODEL}', pretrained=True)" in note
    # an ImageNet-style timm state dict, with its 1000-class classifier, saved where fetch_weights puts it
    torch.manual_seed(123)
    source = timm.create_model(MODEL, pretrained=False)
    weights_dir.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, expected)
    path, note = classifier_weights_file(settings, weights_dir)
    assert path == expected and "ImageNet" in note
    net, _ = initial_model(settings, 2, seed=0, weights_dir=weights_dir)
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    # pretrained false: random init even with the file there; a configured file wins
    assert classifier_weights_file({**settings, "pretrained": False}, weights_dir)[0] is None
    assert classifier_weights_file({**settings, "weights_path": str(expected)}, tmp_path)[0] == expected
    with pytest.raises(ClassificationError, match="does not exist"):
        classifier_weights_file({**settings, "weights_path": str(tmp_path / "missing.pt")}, weights_dir)
    # a file lacking backbone tensors is refused
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("conv_stem")}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ClassificationError, match="missing"):
        load_backbone_weights(build_classifier(settings, 2), tmp_path / "partial.pt")


def test_hugging_face_cache_is_read_without_network(tmp_path, monkeypatch):
    """The HF cache layout (huggingface_hub's models--<org>--<name>/refs, snapshots) is planted;
    any socket connection or hub download fails the test."""
    import huggingface_hub
    import timm
    from safetensors.torch import save_file

    from histosynth.weights import read_state_dict

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    settings = section_defaults("classification", {**TINY, "pretrained": True})
    assert classifier_weights_file(settings, tmp_path / "weights")[0] is None  # empty cache: random init
    repo = timm.models.get_pretrained_cfg(MODEL).hf_hub_id  # timm/test_efficientnet.r160_in1k
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in timm.create_model(MODEL).state_dict().items()},
        folder / "snapshots" / "abc123" / "model.safetensors",
    )
    path, note = classifier_weights_file(settings, tmp_path / "weights")
    assert path == folder / "snapshots" / "abc123" / "model.safetensors" and "Hugging Face cache" in note
    net, _ = initial_model(settings, 2, seed=0, weights_dir=tmp_path / "weights")
    assert torch.equal(net.backbone.conv_stem.weight, read_state_dict(path)["conv_stem.weight"])


# ----------------------------------------------------------------------------- rule entries


def test_train_and_evaluate_entries(tmp_path):
    index_dir = tmp_path / "patches"
    for name, split, seed in (("a", "train", 0), ("b", "val", 2), ("c", "test", 4)):
        table = two_slides(index_dir / name, 6 if split != "test" else 5, name, seed).assign(split=split)
        write_relative(table.drop(columns="class"), index_dir / f"{name}.parquet", ("image", "mask"))
    indexes = [index_dir / f"{n}.parquet" for n in "abc"]
    train_index = pd.read_parquet(indexes[0])
    manifest = pd.DataFrame(
        {
            "source": "real",
            "mode": "real",
            "image": [str(index_dir / p) for p in train_index["image"]],
            "mask": [str(index_dir / p) for p in train_index["mask"]],
            "split": "train",
            "origin_id": train_index["patch_id"],
            "slide": train_index["slide"],
            "source_slide": train_index["slide"],
            "class": train_index["label"],
        }
    )
    write_mix(manifest, tmp_path / "mixing" / "real.parquet")
    config = {"classification": {**TINY, "epochs": 2}, "labels": LABELS, "seed": 0, "weights_dir": str(tmp_path / "w")}
    summary = train_classifier(
        tmp_path / "mixing" / "real.parquet", indexes[:2], tmp_path / "run", config=config, seed=7, fold=0
    )
    assert (summary["n_train"], summary["n_val"], summary["n_train_synthetic"]) == (12, 12, 0)
    metrics = evaluate_classifier(
        tmp_path / "run",
        indexes[2:],
        tmp_path / "m.parquet",
        tmp_path / "p.parquet",
        config=config,
        ratio="real",
        fold=0,
        seed=1,
    )
    table, predictions = pd.read_parquet(tmp_path / "m.parquet"), pd.read_parquet(tmp_path / "p.parquet")
    pd.testing.assert_frame_equal(table, metrics)
    assert list(table.columns) == ["task", "ratio", "seed", "fold", "slide", "class", "metric", "value"]
    assert set(table["task"]) == {"classification"} and set(table["slide"]) == {"all"}
    assert (table["ratio"] == "real").all() and (table["seed"] == 1).all() and (table["fold"] == 0).all()
    assert set(table["metric"]) == {"accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc"}
    assert len(predictions) == 10 and set(predictions["slide"]) == {"cr", "cb"}
    assert predictions["true"].tolist() == [1] * 5 + [0] * 5  # red slide first; class indices of CLASSES
    probs = predictions[["prob_0", "prob_1"]].to_numpy()
    assert np.allclose(probs.sum(1), 1) and (predictions["pred"] == probs.argmax(1)).all()
    accuracy = table[(table["class"] == "all") & (table["metric"] == "accuracy")]["value"].item()
    assert accuracy == pytest.approx((predictions["true"] == predictions["pred"]).mean())
    with pytest.raises(ClassificationError, match="no `class` column"):
        write_mix(manifest.drop(columns="class"), tmp_path / "mixing" / "bare.parquet")
        train_classifier(
            tmp_path / "mixing" / "bare.parquet", indexes[:2], tmp_path / "bare", config=config, seed=7, fold=0
        )
