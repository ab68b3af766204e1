"""Offline feature spaces: the segmentation encoder and a local timm model as extractors, Fréchet
distance and KID in them (zero for a set against itself, growing with a known shift), feature
diversity, and the quality table's offline rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histosynth.distances import fid, kid
from histosynth.evaluation.features import (
    FeatureError,
    build_extractor,
    image_features,
    pairwise_diversity,
    timm_encoder,
)
from histosynth.evaluation.quality import image_quality
from histosynth.evaluation.segmentation import load_model

CLASSES = ["Blood vessel", "Fat"]
LABELS = {"source": "region", "classes": ["background", *CLASSES], "regions": CLASSES, "background": "background"}


def tissue_images(folder, n, shift=0, seed=0):
    """n textured pink 32 px images; `shift` darkens every pixel by that many grey levels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        base = np.array((210, 140, 180)) + rng.normal(0, 25, (32, 32, 3))
        image = np.clip(base - shift, 0, 255).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[:16] = 1
        Image.fromarray(image).save(folder / f"{i}.png")
        Image.fromarray(mask).save(folder / f"{i}_m.png")
        rows.append(
            {
                "image": str(folder / f"{i}.png"),
                "mask": str(folder / f"{i}_m.png"),
                "split": "train",
                "frac_blood_vessel": 0.5,
                "frac_fat": 0.0,
                "label": 1,
            }
        )
    return pd.DataFrame(rows)


def test_segmentation_encoder_fd_is_zero_on_itself_and_grows_with_the_shift(tmp_path, segmentation_run):
    extractor = build_extractor("segmentation", None, load_model(segmentation_run, "cpu"))
    real = image_features(tissue_images(tmp_path / "real", 24)["image"].tolist(), extractor, 8)
    assert real.shape == (24, 64 + 64 + 128)  # resnet18 stages 1-3, pooled
    assert fid(real, real) == pytest.approx(0.0, abs=1e-6)
    distances, kernel = [], []
    for shift in (10, 40, 80):
        shifted = image_features(
            tissue_images(tmp_path / f"s{shift}", 24, shift, seed=1)["image"].tolist(), extractor, 8
        )
        distances.append(fid(real, shifted))
        kernel.append(kid(real, shifted, subsets=5, subset_size=24, seed=0)[0])
    assert distances[0] < distances[1] < distances[2]
    assert kernel[0] < kernel[1] < kernel[2]


def test_timm_encoder_loads_a_local_file_and_says_what_is_missing(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", pretrained=False)  # with its head: the loader drops it
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    extractor = timm_encoder("test_efficientnet", tmp_path / "weights.pth", "cpu")
    features = image_features(tissue_images(tmp_path / "imgs", 3)["image"].tolist(), extractor, 2)
    assert features.shape[0] == 3 and np.isfinite(features).all()
    assert "test_efficientnet" in extractor.name and "weights.pth" in extractor.name
    with pytest.raises(FeatureError, match="quality.extractor_weights"):
        timm_encoder("test_efficientnet", None)
    with pytest.raises(FeatureError, match="no such file"):
        timm_encoder("test_efficientnet", tmp_path / "absent.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(FeatureError, match="does not fit"):
        timm_encoder("test_efficientnet", tmp_path / "other.pth")
    with pytest.raises(FeatureError, match="segmentation run"):
        build_extractor("segmentation", None, None)


def test_pairwise_diversity():
    same = np.tile(np.arange(1.0, 9.0), (6, 1))
    assert pairwise_diversity(same, 100, 0) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    assert pairwise_diversity(rng.normal(size=(6, 8)), 100, 0) > 0.5
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert pairwise_diversity(opposite, 100, 0) == pytest.approx(2.0)


def test_quality_table_has_offline_rows_without_any_weights(tmp_path, segmentation_run):
    real = tissue_images(tmp_path / "real", 12)
    near, far = tissue_images(tmp_path / "near", 12, 5, seed=1), tissue_images(tmp_path / "far", 12, 70, seed=2)
    extractor = build_extractor("segmentation", None, load_model(segmentation_run, "cpu"))
    assert str(segmentation_run / "model") in extractor.name
    table = image_quality(
        real,
        {"near": near, "far": far},
        labels=LABELS,
        extractor=extractor,
        weights_dir=tmp_path / "weights",
        settings={"min_images": 10, "device": "cpu", "kid_subsets": 5},
    )
    offline = table[table["metric"].isin(["fd", "kd", "feature_diversity"])]
    assert (offline["status"] == "ok").all() and set(offline["class"]) == {"all", "Blood vessel"}
    assert offline["extractor"].str.startswith("segmentation encoder").all()
    fd = offline[(offline["metric"] == "fd") & (offline["class"] == "all")].set_index("set")["value"]
    assert fd["near"] < fd["far"]
    fid_rows = table[table["metric"] == "fid"]
    assert (fid_rows["status"] == "skipped").all()
    missing = str(tmp_path / "weights" / "weights-inception-2015-12-05-6726825d.pth")  # the file weights_dir lacks
    assert (
        fid_rows["note"].str.contains(missing, regex=False).all()
        and fid_rows["note"].str.contains("fetch_weights").all()
    )
