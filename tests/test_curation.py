"""Curation: planted copies (exact, flipped, noised) among distinct images are flagged, real
held-out patches are flagged at about copy_quantile, inpainted images are compared inside the
painted region, images contradicting their masks are rejected for consistency, and the audit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from histosynth.config import section_defaults
from histosynth.evaluation.curation import audit, closest_pairs, curate, image_consistency, load_reference
from histosynth.evaluation.features import FeatureExtractor

SIDE = 32


def tissue(rng, n) -> np.ndarray:
    """(n, 32, 32, 3) uint8 smooth random textures, each distinct."""
    noise = rng.normal(size=(n, SIDE, SIDE, 3))
    smooth = ndi.gaussian_filter(noise, (0, 1.5, 1.5, 0))
    smooth = (smooth - smooth.mean()) / smooth.std()
    return np.clip(150 + 50 * smooth, 0, 255).astype(np.uint8)


def write(folder, name, images, masks=None) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(images):
        path, mask_path = folder / f"{name}{i}.png", folder / f"{name}{i}_mask.png"
        Image.fromarray(image).save(path)
        Image.fromarray(np.zeros((SIDE, SIDE), np.uint8) if masks is None else masks[i]).save(mask_path)
        rows.append({"id": f"{name}{i}", "patch_id": f"{name}{i}", "image": str(path), "mask": str(mask_path)})
    return pd.DataFrame(rows)


def pooled_pixels() -> FeatureExtractor:
    """A fixed offline feature space for tests: 4x4 average-pooled colours."""
    return FeatureExtractor("pooled pixels", lambda x: torch.nn.functional.avg_pool2d(x.float(), 8).flatten(1))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    rng = np.random.default_rng(0)
    train = write(root / "train", "t", tissue(rng, 60))
    heldout = write(root / "val", "v", tissue(rng, 200))
    return root, rng, train, heldout


def settings(**overrides):
    return section_defaults("curation", {"copy_quantile": 0.1, **overrides})


def test_planted_copies_are_flagged_and_distinct_images_mostly_kept(real):
    root, rng, train, heldout = real
    pixels = np.stack([np.asarray(Image.open(p)) for p in train["image"][:6]])
    noised = np.clip(pixels[4:6].astype(float) + rng.normal(0, 8, pixels[4:6].shape), 0, 255).astype(np.uint8)
    planted = [pixels[0], pixels[1], pixels[2][:, ::-1], np.rot90(pixels[3]), *noised]
    distinct = tissue(np.random.default_rng(7), 30)
    synthetic = write(root / "syn", "s", np.concatenate([np.stack(planted), distinct]))
    reference = load_reference(train, heldout, pooled_pixels(), batch_size=64)
    curated = curate(synthetic, pd.DataFrame(), reference, ["Blood vessel"], settings=settings(),
                     extractor=pooled_pixels(), batch_size=64)
    assert curated["copy"][:6].all(), curated[["feature_distance", "pixel_correlation"]][:6]
    assert curated["closer_to_train"][:6].all()
    assert list(curated["copy_of"][:6]) == list(train["patch_id"][:6])
    assert (~curated["keep"][:6]).all() and curated["reason"][:6].str.contains("copy of t").all()
    assert curated["copy"][6:].mean() <= 0.25  # distinct images: about copy_quantile of them
    report = audit(curated, len(train))
    assert report["train_copied_share"] == pytest.approx(curated["copy_of"].dropna().nunique() / 60)
    assert report["train_copied_share"] >= 6 / 60 and report["copy_rate"] == pytest.approx(curated["copy"].mean())
    assert report["rejected_copy"] == int(curated["copy"].sum())
    montage = closest_pairs(curated, reference, n=4)
    assert montage.shape == (4 * (SIDE + 6), 2 * SIDE + 6, 3)
    assert (montage[0, 0] == (220, 30, 30)).all()  # the closest pair is a copy, framed red
    rows = [montage[k * (SIDE + 6) + 3:(k + 1) * (SIDE + 6) - 3, 3:-3] for k in range(4)]
    # the four closest are the exact, flipped and rotated copies: shown in the view that matched, they line up
    assert all(np.array_equal(r[:, :SIDE], r[:, SIDE:]) for r in rows)


def test_held_out_real_patches_are_flagged_at_about_the_quantile(real):
    root, _, train, heldout = real
    fresh = write(root / "fresh", "f", tissue(np.random.default_rng(11), 200))  # real, like the held-out ones
    reference = load_reference(train, heldout, pooled_pixels(), batch_size=64)
    curated = curate(fresh, pd.DataFrame(), reference, [], settings=settings(), extractor=pooled_pixels(), batch_size=64)
    assert 0.03 <= curated["copy"].mean() <= 0.2  # copy_quantile 0.1
    # real images never trained on are as often nearer train as the held-out reference says
    assert abs(curated["closer_to_train"].mean() - curated["closer_to_train_real"].iloc[0]) < 0.15


def test_inpainted_copies_are_measured_inside_the_painted_region(real):
    root, rng, train, heldout = real
    donor = np.asarray(Image.open(train["image"][5]))
    region = np.zeros((SIDE, SIDE), bool)
    region[8:24, 8:24] = True
    images = tissue(np.random.default_rng(3), 6)
    images[0][region] = donor[region]  # the donor's pixels pasted back: a copy inside the region
    masks = np.where(region, 1, 0).astype(np.uint8)[None].repeat(6, 0)
    synthetic = write(root / "inpaint", "i", images, masks).assign(donor_patch_id="t5", target_class="Blood vessel")
    reference = load_reference(train, heldout, pooled_pixels(), batch_size=64)
    curated = curate(synthetic, pd.DataFrame(), reference, ["Blood vessel"], settings=settings(),
                     extractor=pooled_pixels(), batch_size=64)
    assert curated["copy"][0] and curated["copy_of"][0] == "t5"
    assert curated["feature_distance"].isna().all()  # the rest of the image is real by design: not compared
    assert not curated["copy"][1:].any()


def test_consistency_rejects_images_that_contradict_their_mask(real):
    root, _, train, heldout = real
    synthetic = write(root / "cons", "c", tissue(np.random.default_rng(5), 3))
    scores = pd.DataFrame([  # per-image region scores as the quality stage writes them
        {"id": "c0", "kind": "region", "class": "Blood vessel", "intersection": 90, "truth_pixels": 100, "predicted_pixels": 100},
        {"id": "c1", "kind": "region", "class": "Blood vessel", "intersection": 0, "truth_pixels": 100, "predicted_pixels": 80},
        {"id": "c2", "kind": "region", "class": "Blood vessel", "intersection": 0, "truth_pixels": 0, "predicted_pixels": 0},
    ]).assign(iou=np.nan, dice=np.nan)
    assert image_consistency(scores)["consistency"].tolist()[:2] == [pytest.approx(0.9), 0.0]
    reference = load_reference(train, heldout, None, batch_size=64)
    curated = curate(synthetic, scores, reference, ["Blood vessel"], settings=settings(copy_quantile=0.001),
                     extractor=None, batch_size=64)
    assert curated["keep"].tolist() == [True, False, True]  # c2: nothing drawn, nothing found
    assert "consistency 0.00 < curation.min_consistency 0.5" in curated["reason"][1]
    assert not curated["reason"][0] and not curated["reason"][2]
    disabled = curate(synthetic, scores, reference, ["Blood vessel"], settings=settings(enabled=False), extractor=None,
                      batch_size=64)
    assert disabled["keep"].all() and disabled["reason"][1]  # still scored, the reason kept for the audit


def test_an_image_is_not_judged_against_its_own_source_patch(real):
    root, rng, train, heldout = real
    pixels = np.stack([np.asarray(Image.open(p)) for p in train["image"][:2]])
    follows = np.clip(pixels[0].astype(float) + rng.normal(0, 8, pixels[0].shape), 0, 255).astype(np.uint8)
    synthetic = write(root / "own", "o", np.stack([follows, pixels[1]])).assign(source_patch_id=["t0", "t0"])
    reference = load_reference(train, heldout, pooled_pixels(), batch_size=64)
    curated = curate(synthetic, pd.DataFrame(), reference, [], settings=settings(), extractor=pooled_pixels(), batch_size=64)
    assert not curated["copy"][0] and curated["nearest_patch_pixels"][0] != "t0"  # drawn from t0's map: follows it
    assert curated["source_correlation"][0] > 0.9
    assert curated["copy"][1] and curated["copy_of"][1] == "t1"  # a copy of another training patch still counts
