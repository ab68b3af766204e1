"""Realism (histosynth.evaluation.realism): the classifier two-sample test sees blur and JPEG
artefacts and not sampling noise; sharpness and spectrum ratios; the rule's stage end to end."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from histosynth.config import section_defaults
from histosynth.data.io import write_png, write_table
from histosynth.evaluation.realism import IMAGE_COLUMNS, matched_real, realism, realism_stage
from histosynth.evaluation.texture import image_measures, laplacian_variance
from histosynth.evaluation.two_sample import TwoSampleTest, _linear_probabilities, auc, two_sample_test

TINY = section_defaults("realism", {"epochs": 3, "width": 4, "batch_size": 32})


def tissue(n: int, seed: int, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8 H&E-like patches: pink stroma with fine texture and dark purple nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        image = np.ones((size, size, 3), np.float32) * (np.array([230, 170, 200]) + rng.normal(0, 10, 3))
        image += ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 0.7)[..., None] * 25
        for _ in range(rng.integers(3, 9)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 4)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            image[inside] = image[inside] * 0.45 + np.array([60, 30, 110]) * 0.55 + rng.normal(0, 12, (inside.sum(), 1))
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(out)


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack(
        [
            np.clip(ndimage.gaussian_filter(i.astype(np.float32), (sigma, sigma, 0)), 0, 255).astype(np.uint8)
            for i in images
        ]
    )


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out.append(np.array(Image.open(buffer)))
    return np.stack(out)


@pytest.fixture(scope="module")
def real():
    return tissue(120, seed=1)


def c2st_auc(real, synthetic):
    test = two_sample_test(real, synthetic, TINY, seed=0)
    return test.auc(), test.interval(0.95)


def test_two_samples_of_the_same_images_are_indistinguishable(real):
    value, (low, high) = c2st_auc(real[:80], real[80:])
    assert low < 0.5 < high, (value, low, high)
    assert abs(value - 0.5) < 0.15


def test_blur_of_one_pixel_is_told_apart(real):
    value, (low, _) = c2st_auc(real[:80], blurred(real[80:], 1.0))
    assert value >= 0.95 and low > 0.85


def test_jpeg_artefacts_raise_the_auc(real):
    value, (low, _) = c2st_auc(real[:80], jpeg(real[80:], 30))
    assert value >= 0.8 and low > 0.6


def test_auc_is_the_rank_statistic():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    scores = rng.normal(labels * 0.8, 1.0).round(1)  # ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert np.isnan(auc(np.ones(5, bool), np.arange(5)))


def test_the_interval_holds_0_5_as_often_as_it_says_when_nothing_differs():
    """Corrected resampled t over folds, by simulation: the texture learner alone on features of
    two identical distributions (the CNN's share of the variance is smaller), 95 % intervals."""
    held = []
    for draw in range(100):
        rng = np.random.default_rng(draw)
        labels = np.r_[np.zeros(120, bool), np.ones(40, bool)]
        fold = np.r_[np.arange(120) % 5, np.arange(40) % 5]
        features = rng.normal(size=(160, 20))
        probability = np.zeros(160)
        for k in range(5):
            probability[fold == k] = _linear_probabilities(
                features, labels, np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            )
        low, high = TwoSampleTest(labels, probability, probability, probability, fold).interval(0.95)
        held.append(low < 0.5 < high)
    assert 0.9 <= np.mean(held) <= 0.99


def test_sharpness_and_spectrum_fall_under_blur(real):
    sharp, soft, softer = (
        laplacian_variance(real),
        laplacian_variance(blurred(real, 1.0)),
        laplacian_variance(blurred(real, 2.0)),
    )
    assert np.all(soft < sharp) and np.all(softer < soft)
    sharp_measures, soft_measures = image_measures(real), image_measures(blurred(real, 1.0))
    assert np.all(soft_measures["high_frequency_share"] < sharp_measures["high_frequency_share"])
    frequencies, spectrum = sharp_measures["frequencies"], sharp_measures["spectrum"]
    assert frequencies[0] > 0 and frequencies[-1] < 0.5 and spectrum.shape == (len(real), len(frequencies))
    spectrum_blurred = soft_measures["spectrum"]
    assert np.all(np.median(spectrum_blurred[:, -4:], 0) < np.median(spectrum[:, -4:], 0))


def test_rows_per_class_ratio_one_for_a_set_against_itself(real):
    real, classes = real[:60], np.array(["a", "b"] * 30)
    rows, measures = realism(real, classes, real, classes, TINY, groups=["a", "b"], min_images=10)
    table = pd.DataFrame(rows).set_index(["class", "metric"])["value"]
    for group in ("all", "a", "b"):
        assert table[group, "laplacian_ratio"] == pytest.approx(1.0)
        assert table[group, "high_frequency_ratio"] == pytest.approx(1.0)
        assert table[group, "c2st_low"] <= table[group, "c2st_auc"] <= table[group, "c2st_high"]
    rows, _ = realism(real, classes, blurred(real, 1.0), classes, TINY, groups=["a"], min_images=40)
    table = pd.DataFrame(rows).set_index(["class", "metric"])
    assert table.loc[("all", "laplacian_ratio"), "value"] < 0.5
    assert (
        table.loc[("a", "c2st_auc"), "status"] == "skipped"
        and "realism.min_images=40" in table.loc[("a", "c2st_auc"), "note"]
    )
    assert (
        len(measures["p_synthetic"]) == 2 * len(real)
        and ((0 <= measures["p_synthetic"]) & (measures["p_synthetic"] <= 1)).all()
    )


def test_real_images_follow_the_synthetic_class_composition():
    real = np.array(["a"] * 50 + ["b"] * 50 + ["c"] * 3 + ["d"] * 20)
    picked = real[matched_real(real, np.array(["a"] * 4 + ["b"] * 8 + ["c"] * 2), 4, seed=0)]
    assert dict(zip(*np.unique(picked, return_counts=True), strict=True)) == {"a": 16, "b": 32, "c": 3}


def test_stage_writes_rows_images_and_figure(tmp_path):
    real_dir, syn_dir = tmp_path / "patches", tmp_path / "synthetic"
    (real_dir / "images").mkdir(parents=True)
    (syn_dir / "images").mkdir(parents=True)
    images = tissue(60, seed=3)
    rows = []
    for i, image in enumerate(images[:40]):
        write_png(image, real_dir / "images" / f"p{i}.png")
        rows.append(
            {
                "patch_id": f"p{i}",
                "image": f"images/p{i}.png",
                "mask": f"images/p{i}.png",
                "split": "train",
                "frac_fat": float(i % 2),
                "label": None,
            }
        )
    write_table(pd.DataFrame(rows), real_dir / "index.parquet")
    for i, image in enumerate(blurred(images[40:], 1.0)):
        write_png(image, syn_dir / "images" / f"s{i}.png")
    write_table(
        pd.DataFrame(
            {
                "id": [f"s{i}" for i in range(20)],
                "image": [f"images/s{i}.png" for i in range(20)],
                "class": ["Fat", "background"] * 10,
            }
        ),
        syn_dir / "manifest.parquet",
    )
    config = {
        "realism": TINY | {"min_images": 5},
        "labels": {
            "source": "region",
            "classes": ["background", "Fat"],
            "regions": ["Fat"],
            "background": "background",
        },
    }
    out = {"table_out": tmp_path / "t.parquet", "images_out": tmp_path / "i.parquet", "figure_out": tmp_path / "f.png"}
    table = realism_stage(
        [real_dir / "index.parquet"], syn_dir / "manifest.parquet", mode="synth", config=config, **out
    )
    auc_rows = table[table["metric"] == "c2st_auc"].set_index("class")
    assert set(auc_rows.index) == {"all", "background", "Fat"} and (auc_rows["value"] > 0.8).all()
    assert (auc_rows["n_synthetic"] == [20, 10, 10]).all() and auc_rows.loc["all", "n_real"] == 40
    assert pd.read_parquet(out["table_out"]).equals(table)
    per_image = pd.read_parquet(out["images_out"])
    assert list(per_image.columns) == list(IMAGE_COLUMNS) and (per_image["kind"] == "synthetic").sum() == 20
    assert Image.open(out["figure_out"]).size[0] >= 1000

    write_table(
        pd.DataFrame({"id": ["s0"], "image": ["images/s0.png"], "class": ["Fat"]}), syn_dir / "manifest.parquet"
    )
    table = realism_stage(
        [real_dir / "index.parquet"], syn_dir / "manifest.parquet", mode="synth", config=config, **out
    )
    assert (table["status"] == "skipped").all() and "fewer than realism.folds" in table["note"].iloc[0]
