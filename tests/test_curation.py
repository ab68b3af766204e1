"""Curation: planted copies of every kind are flagged with their source, distinct drawings of one
uniform class are not (even where a feature space puts them all at one point), real held-out
patches are flagged at about copy_quantile with thresholds per class, inpainted images are compared
inside the painted region, images contradicting their masks are rejected for consistency, and the
audit and its montage."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histosynth.config import section_defaults
from histosynth.evaluation.curation import curate, image_consistency, load_reference, reason_kinds
from histosynth.evaluation.features import FeatureExtractor
from histosynth.evaluation.memorisation import audit, montage_rows, write_montage

REPO = Path(__file__).resolve().parents[1]
SIDE = 64


def _benchmark():
    """benchmarks/copies.py: its planted-copy kinds and drawn test images."""
    spec = importlib.util.spec_from_file_location("copies_benchmark", REPO / "benchmarks/copies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _benchmark()


def write(folder, name, images, masks=None, classes=None) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(images):
        path, mask_path = folder / f"{name}{i}.png", folder / f"{name}{i}_mask.png"
        Image.fromarray(image).save(path)
        Image.fromarray(np.zeros((SIDE, SIDE), np.uint8) if masks is None else masks[i]).save(mask_path)
        rows.append(
            {
                "id": f"{name}{i}",
                "patch_id": f"{name}{i}",
                "image": str(path),
                "mask": str(mask_path),
                **({} if classes is None else {"class": classes[i]}),
            }
        )
    return pd.DataFrame(rows)


def pooled_colours(pool: int = 16) -> FeatureExtractor:
    """A fixed offline feature space for tests (the FeatureExtractor interface of
    histosynth.evaluation.features): pool x pool average-pooled colours; pool = SIDE maps every
    image to its mean colour, a space where all drawings of one class sit at one point."""
    return FeatureExtractor("pooled colours", lambda x: torch.nn.functional.avg_pool2d(x.float(), pool).flatten(1))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    train, train_classes, heldout, heldout_classes = bench.tiny_patches(seed=0, n=30)
    return (
        root,
        write(root / "train", "t", train, classes=train_classes),
        write(root / "val", "v", heldout, classes=heldout_classes),
    )


def settings(**overrides):
    return section_defaults("curation", {"copy_quantile": 0.1, "min_class_patches": 40, **overrides})


def pixels(table: pd.DataFrame) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in table["image"]])


def test_planted_copies_of_every_kind_are_found_with_their_source(real):
    root, train, heldout = real
    rng = np.random.default_rng(1)
    sources = rng.choice(len(train), 2 * len(bench.KINDS), replace=False)
    train_pixels, fill = pixels(train), pixels(heldout)[-1]
    planted = [bench.plant(kind, train_pixels[s], fill, rng) for kind, s in zip(np.repeat(bench.KINDS, 2), sources)]
    distinct = np.concatenate([bench.tissue(rng, 10, SIDE), bench.nuclei(rng, 10, SIDE)])
    classes = list(train["class"].iloc[sources]) + ["texture"] * 10 + ["nuclei"] * 10
    synthetic = write(root / "syn", "s", np.concatenate([np.stack(planted), distinct]), classes=classes)
    reference = load_reference(train, heldout, pooled_colours(), batch_size=64)
    curated = curate(
        synthetic, pd.DataFrame(), reference, [], settings=settings(), extractor=pooled_colours(), batch_size=64
    )
    n = len(planted)
    assert curated["copy"][:n].all(), curated[["similarity", "relative_distance"]][:n]
    assert list(curated["copy_of"][:n]) == list(train["patch_id"].iloc[sources])
    assert (~curated["keep"][:n]).all() and curated["reason"][:n].str.startswith("copy of t").all()
    assert curated["calibration"].isin(["texture", "nuclei"]).all()  # 60 held-out patches per class >= 40
    assert curated["copy"][n:].mean() <= 0.25  # distinct images: about copy_quantile of them
    assert curated["second_patch"].notna().all() and (curated["second_patch"] != curated["nearest_patch"]).all()
    rows = audit(curated, len(train), "synth").set_index("class")
    assert rows.loc["all", "copy_rate"] == pytest.approx(curated["copy"].mean())
    assert rows.loc["all", "train_copied_share"] == pytest.approx(curated["copy_of"].dropna().nunique() / len(train))
    assert rows.loc["all", "rejected_copy"] == int(curated["copy"].sum())
    assert set(rows.index) == {"all", "texture", "nuclei"}
    assert rows.loc["texture", "images"] + rows.loc["nuclei", "images"] == len(curated)
    shown = montage_rows(curated, 8)
    assert shown["copy"].head(n if n < 8 else 8).all()  # copies first
    path = write_montage(curated, reference, root / "pairs.png")
    width, height = Image.open(path).size
    assert width >= 3 * 128 and height >= 8 * 128  # three images of at least 128 px per row, 8 rows


def test_distinct_drawings_of_a_uniform_class_are_not_copies(real):
    root, train, heldout = real
    drawings = bench.nuclei(np.random.default_rng(2), 20, SIDE)  # 20 different drawings of packed nuclei
    synthetic = write(root / "uniform", "u", drawings, classes=["nuclei"] * 20)
    mean_colour = pooled_colours(SIDE)
    reference = load_reference(train, heldout, mean_colour, batch_size=64)
    curated = curate(
        synthetic,
        pd.DataFrame(),
        reference,
        [],
        settings=settings(copy_quantile=0.05),
        extractor=mean_colour,
        batch_size=64,
    )
    # in the mean-colour space every drawing sits on a training patch, as a copy would (a
    # nearest-feature test cannot tell them from copies), yet the image test does not call them copies
    assert (curated["feature_distance"] < 1e-4).all()
    assert curated["copy"].sum() <= 2, curated[["similarity", "similarity_threshold", "relative_distance"]]


def test_fresh_real_patches_are_flagged_at_about_the_quantile(real):
    root, train, heldout = real
    _, _, fresh, fresh_classes = bench.tiny_patches(seed=11, n=50)
    fresh_set = write(root / "fresh", "f", fresh, classes=fresh_classes)  # real, like the held-out ones
    reference = load_reference(train, heldout, pooled_colours(), batch_size=64)
    curated = curate(
        fresh_set, pd.DataFrame(), reference, [], settings=settings(), extractor=pooled_colours(), batch_size=64
    )
    assert 0.03 <= curated["copy"].mean() <= 0.2  # copy_quantile 0.1
    for name, part in curated.groupby("class"):
        assert part["copy"].mean() <= 0.25, name  # and per class
    # real images never trained on are as often nearer train as the held-out reference says
    assert abs(curated["closer_to_train"].mean() - curated["closer_to_train_real"].iloc[0]) < 0.15


def test_a_class_too_small_for_its_own_thresholds_is_judged_pooled(real):
    root, train, heldout = real
    synthetic = write(root / "small", "m", bench.tissue(np.random.default_rng(4), 4, SIDE), classes=["texture"] * 4)
    reference = load_reference(train, heldout, None, batch_size=64)
    own = curate(synthetic, pd.DataFrame(), reference, [], settings=settings(), extractor=None, batch_size=64)
    pooled = curate(
        synthetic, pd.DataFrame(), reference, [], settings=settings(min_class_patches=61), extractor=None, batch_size=64
    )
    assert (own["calibration"] == "texture").all() and (pooled["calibration"] == "pooled").all()
    assert own["similarity_threshold"].iloc[0] != pooled["similarity_threshold"].iloc[0]


def test_inpainted_copies_are_measured_inside_the_painted_region(real):
    root, train, heldout = real
    donor = pixels(train)[5]
    region = np.zeros((SIDE, SIDE), bool)
    region[16:48, 16:48] = True
    images = bench.tissue(np.random.default_rng(3), 6, SIDE)
    images[0][region] = donor[region]  # the donor's pixels pasted back: a copy inside the region
    masks = np.where(region, 1, 0).astype(np.uint8)[None].repeat(6, 0)
    masks[5] = 0
    masks[5, 30:33, 30] = 1  # a 3 px region: any 3 values correlate almost perfectly with some patch
    images[5][masks[5] == 1] = donor[masks[5] == 1]
    synthetic = write(root / "inpaint", "i", images, masks).assign(donor_patch_id="t5", target_class="Blood vessel")
    reference = load_reference(train, heldout, pooled_colours(), batch_size=64)
    curated = curate(
        synthetic,
        pd.DataFrame(),
        reference,
        ["Blood vessel"],
        settings=settings(),
        extractor=pooled_colours(),
        batch_size=64,
    )
    assert curated["copy"][0] and curated["copy_of"][0] == "t5"
    assert curated["feature_distance"].isna().all()  # the rest of the image is real by design: not compared
    assert not curated["copy"][1:].any()
    assert np.isnan(curated["similarity"][5])  # too few pixels to judge


def test_consistency_rejects_images_that_contradict_their_mask(real):
    root, train, heldout = real
    synthetic = write(root / "cons", "c", bench.tissue(np.random.default_rng(5), 3, SIDE))
    scores = pd.DataFrame(
        [  # per-image region scores as the quality stage writes them
            {
                "id": "c0",
                "kind": "region",
                "class": "Blood vessel",
                "intersection": 90,
                "truth_pixels": 100,
                "predicted_pixels": 100,
            },
            {
                "id": "c1",
                "kind": "region",
                "class": "Blood vessel",
                "intersection": 0,
                "truth_pixels": 100,
                "predicted_pixels": 80,
            },
            {
                "id": "c2",
                "kind": "region",
                "class": "Blood vessel",
                "intersection": 0,
                "truth_pixels": 0,
                "predicted_pixels": 0,
            },
        ]
    ).assign(iou=np.nan, dice=np.nan)
    assert image_consistency(scores)["consistency"].tolist()[:2] == [pytest.approx(0.9), 0.0]
    reference = load_reference(train, heldout, None, batch_size=64)
    curated = curate(
        synthetic,
        scores,
        reference,
        ["Blood vessel"],
        settings=settings(copy_quantile=0.001),
        extractor=None,
        batch_size=64,
    )
    assert curated["keep"].tolist() == [True, False, True]  # c2: nothing drawn, nothing found
    assert "consistency 0.00 < curation.min_consistency 0.5" in curated["reason"][1]
    assert not curated["reason"][0] and not curated["reason"][2]
    assert (curated["calibration"] == "pooled").all()  # no class column: every image judged pooled
    disabled = curate(
        synthetic, scores, reference, ["Blood vessel"], settings=settings(enabled=False), extractor=None, batch_size=64
    )
    assert disabled["keep"].all() and disabled["reason"][1]  # still scored, the reason kept for the audit


def test_realism_rejects_only_what_a_classifier_finds_obviously_synthetic(real):
    root, train, heldout = real
    synthetic = write(root / "realism", "r", bench.tissue(np.random.default_rng(6), 3, SIDE))
    realism = pd.DataFrame({"id": ["r0", "r1", "r2"], "p_synthetic": [0.2, 0.95, 0.6]})
    reference = load_reference(train, heldout, None, batch_size=64)
    unused = curate(
        synthetic,
        pd.DataFrame(),
        reference,
        [],
        settings=settings(copy_quantile=0.001),
        extractor=None,
        batch_size=64,
        realism=realism,
    )
    assert unused["p_synthetic"].tolist() == [0.2, 0.95, 0.6] and unused["keep"].all()  # off by default: scored only
    curated = curate(
        synthetic,
        pd.DataFrame(),
        reference,
        [],
        settings=settings(copy_quantile=0.001, max_synthetic_probability=0.9),
        extractor=None,
        batch_size=64,
        realism=realism,
    )
    assert curated["keep"].tolist() == [True, False, True]
    assert curated["reason"][1].startswith("realism: p(synthetic) 0.95 > curation.max_synthetic_probability 0.9")
    assert reason_kinds(curated)["realism"] == 1
    missing = curate(
        synthetic, pd.DataFrame(), reference, [], settings=settings(copy_quantile=0.001), extractor=None, batch_size=64
    )
    assert missing["p_synthetic"].isna().all()


def test_an_image_is_not_judged_against_its_own_source_patch(real):
    root, train, heldout = real
    rng = np.random.default_rng(6)
    source = pixels(train)[:2]
    follows = np.clip(source[0].astype(float) + rng.normal(0, 8, source[0].shape), 0, 255).astype(np.uint8)
    synthetic = write(root / "own", "o", np.stack([follows, source[1]])).assign(source_patch_id=["t0", "t0"])
    reference = load_reference(train, heldout, pooled_colours(), batch_size=64)
    curated = curate(
        synthetic, pd.DataFrame(), reference, [], settings=settings(), extractor=pooled_colours(), batch_size=64
    )
    assert not curated["copy"][0] and curated["nearest_patch"][0] != "t0"  # drawn from t0's map: follows it
    assert curated["source_similarity"][0] > 0.9
    assert curated["copy"][1] and curated["copy_of"][1] == "t1"  # a copy of another training patch still counts
