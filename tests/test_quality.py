"""Image quality: FID/KID/IS maths on features, the weights loading path with random-weight
Inception and AlexNet files, the skip records when weights are missing, the offline feature
space, mask consistency per image and pooled."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histosynth.config import section_defaults
from histosynth.distances import fid, fid_from_features, gaussian_stats, inception_score, kid
from histosynth.evaluation.consistency import nuclei_scores, pooled_consistency, region_scores
from histosynth.evaluation.fidelity import inception_features
from histosynth.evaluation.mask_consistency import set_consistency
from histosynth.evaluation.quality import image_quality
from histosynth.evaluation.quality_table import COLUMNS
from histosynth.nets import WeightsError, load_inception, load_lpips
from histosynth.weights import WEIGHTS, weights_file

CLASSES = ["Blood vessel", "Fat"]
LABELS = {"source": "region", "classes": ["background", *CLASSES], "regions": CLASSES, "background": "background"}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random-init torch-fidelity InceptionV3 state dict (its constructor would download the
    real weights, so the download and the load are bypassed once to get a fresh network)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    class Fresh(fx.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # skip loading the (fake) download
            return None

    patch = pytest.MonkeyPatch()
    patch.setattr(fx, "load_state_dict_from_url", lambda *a, **k: {})
    torch.manual_seed(0)
    net = Fresh("inception-v3-compat", ["2048"])
    patch.undo()
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(torch.nn.Module.state_dict(net), path)
    return path


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features
    path = tmp_path_factory.mktemp("weights") / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def write_images(folder, n, colour, label=None, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
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
                **({"label": label} if label is not None else {}),
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- maths


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fid_matches_the_closed_form_for_known_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, -1.0])
    s1, s2 = np.diag([1.0, 2.0, 3.0]), np.diag([4.0, 2.0, 0.5])
    # Diagonal covariances: tr(sqrt(s1 s2)) = sum sqrt(a_i b_i).
    expected = 1 + 4 + 1 + (1 + 2 + 3) + (4 + 2 + 0.5) - 2 * (2 + 2 + math.sqrt(1.5))
    assert fid_from_features(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # Non-diagonal: rotate both by one orthogonal matrix (FID is rotation invariant).
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    assert fid_from_features(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(expected, rel=1e-8)
    # Sampled features converge to the closed form.
    a = rng.multivariate_normal(mu1, s1, 200_000)
    b = rng.multivariate_normal(mu2, s2, 200_000)
    assert fid(a, b) == pytest.approx(expected, rel=0.02)
    mu, sigma = gaussian_stats(a)
    assert np.allclose(sigma, s1, atol=0.05)


def test_kid_and_is():
    rng = np.random.default_rng(2)
    x = rng.gamma(1.0, 0.3, size=(200, 64))  # non-negative, like pooled post-ReLU Inception features
    mean, _ = kid(x, x, subsets=20, subset_size=100, seed=0)
    assert abs(mean) < 0.01
    far, _ = kid(x, x + 0.5, subsets=20, subset_size=100, seed=0)
    assert far > 20 * abs(mean) and far > 0.1
    # Full sets, one subset: the unbiased MMD^2 of a set with itself is -2 mean(k(x, x)) / m <= 0 and tiny.
    assert kid(x, x, subsets=1, subset_size=200, seed=0)[0] == pytest.approx(0.0, abs=0.05)


def test_inception_score_counts_confident_distinct_classes():
    # confident predictions spread evenly over k of 4 classes give IS = k (KL = log k per image)
    for k in (1, 2, 4):
        confident = np.full((40, 4), -30.0)
        confident[np.arange(40), np.arange(40) % k] = 30.0
        assert inception_score(confident, splits=1, seed=0)[0] == pytest.approx(k, rel=1e-6)
        assert inception_score(confident + 7.0, splits=1, seed=0)[0] == pytest.approx(k, rel=1e-6)  # softmax shift
    # uniform (unsure) predictions give 1 whatever the spread; so do identical confident ones
    assert inception_score(np.zeros((40, 4)), splits=2, seed=0)[0] == pytest.approx(1.0)
    same = np.tile([30.0, -30.0, -30.0, -30.0], (40, 1))
    assert inception_score(same, splits=4, seed=0) == pytest.approx((1.0, 0.0))
    # two equally likely classes for every image: p(y|x) = p(y), so KL = 0 and IS = 1
    assert inception_score(np.tile([5.0, 5.0, -30.0, -30.0], (40, 1)), splits=1, seed=0)[0] == pytest.approx(1.0)
    # between: half the images confident in class 0, half unsure between 0 and 1 -> exp(mean KL)
    # (marginal p(y) = (0.75, 0.25): KL log(1/0.75) for a confident image, 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25) else)
    mixed = np.vstack([np.tile([30.0, -30.0], (20, 1)), np.tile([0.0, 0.0], (20, 1))])
    kl_confident, kl_unsure = np.log(1 / 0.75), 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert inception_score(mixed, splits=1, seed=0)[0] == pytest.approx(
        np.exp((kl_confident + kl_unsure) / 2), rel=1e-6
    )


# ----------------------------------------------------------------------------- weights


def test_weights_lookup_and_skip_notes(tmp_path):
    weights_dir = tmp_path / "weights"
    path, note = weights_file(WEIGHTS["inception"], None, weights_dir)
    assert path is None
    assert str(weights_dir / "weights-inception-2015-12-05-6726825d.pth") in note
    assert "quality.inception_weights" in note and "fetch_weights" in note
    path, note = weights_file(WEIGHTS["lpips"], str(tmp_path / "nope.pth"), weights_dir)
    assert path is None and "nope.pth" in note and "quality.lpips_weights" in note
    fetched = weights_dir / WEIGHTS["inception"].file
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(b"x")
    assert weights_file(WEIGHTS["inception"], None, weights_dir)[0] == fetched
    (tmp_path / "mine.pth").write_bytes(b"x")  # a configured file wins over the weights folder
    assert weights_file(WEIGHTS["inception"], str(tmp_path / "mine.pth"), weights_dir)[0] == tmp_path / "mine.pth"


def wrong_segmenter(rgb):
    """Wrong in a known way on write_images' masks (vessel = top 16 rows): vessel on the top 8 rows
    (8 of the 16 found) and on rows 24-27 (4 false rows), fat on rows 28-31 (there is no fat)."""
    labels = np.zeros(32, np.uint8)
    labels[:8], labels[24:28], labels[28:] = 1, 1, 2
    return np.repeat(labels[:, None], rgb.shape[1], 1)


def test_skipped_metrics_are_recorded_and_the_rest_runs(tmp_path):
    real = write_images(tmp_path / "real", 3, (200, 120, 170))
    syn = write_images(tmp_path / "syn", 3, (200, 120, 170), label=1, seed=1)
    table = image_quality(
        real,
        {"inpaint": syn},
        labels=LABELS,
        weights_dir=tmp_path / "weights",
        settings={"min_images": 2, "device": "cpu"},
        extractor_note="offline FD/KD skipped: no extractor",
    )
    assert list(table.columns) == list(COLUMNS)
    consistency, scores = set_consistency(syn, "inpaint", real, CLASSES, segment=wrong_segmenter)
    table = pd.concat([table, pd.DataFrame(consistency, columns=COLUMNS)], ignore_index=True)
    skipped = table[table.status == "skipped"]
    assert {"fid", "kid", "is", "lpips_diversity", "fd", "kd"} <= set(skipped.metric)
    assert (skipped[skipped.metric == "fd"]["note"] == "offline FD/KD skipped: no extractor").all()
    assert skipped[skipped.metric == "fid"]["note"].str.contains("weights-inception-2015-12-05").all()
    assert skipped[skipped.metric == "lpips_diversity"]["note"].str.contains("alexnet-owt").all()
    ok = table[table.status == "ok"].set_index(["metric", "class"])["value"]
    # per image: vessel intersection 8 rows, truth 16, predicted 12 -> IoU 8/20, Dice 16/28
    assert ok[("mask_iou", "Blood vessel")] == pytest.approx(0.4) and ok[
        ("mask_dice", "Blood vessel")
    ] == pytest.approx(4 / 7)
    assert ok[("mask_iou", "Fat")] == 0.0 and ok[("mask_dice", "Fat")] == 0.0  # predicted, never drawn
    assert list(table.columns) == list(COLUMNS)
    vessel = scores[scores["class"] == "Blood vessel"]
    assert len(vessel) == 3 and (vessel["set"] == "inpaint").all()
    assert list(vessel["intersection"]) == [256] * 3 and list(vessel["truth_pixels"]) == [512] * 3
    assert list(vessel["predicted_pixels"]) == [384] * 3 and vessel["iou"].tolist() == pytest.approx([0.4] * 3)


def test_inception_and_lpips_load_from_files(tmp_path, inception_file, alexnet_file):
    torch.manual_seed(0)
    real = write_images(tmp_path / "real", 2, (200, 120, 170))
    syn = real.assign(label=1)  # the same images on both sides: FID ~ 0 through the whole feature path
    settings = {
        "inception_weights": str(inception_file),
        "lpips_weights": str(alexnet_file),
        "min_images": 2,
        "kid_subsets": 2,
        "feature": 64,
        "device": "cpu",
        "consistency": False,
    }
    table = image_quality(real, {"synth": syn}, labels=LABELS, weights_dir=tmp_path / "weights", settings=settings)
    ok = table[(table.status == "ok") & (table["class"] == "all")].set_index("metric")["value"]
    assert {"fid", "kid", "is", "lpips_diversity"} <= set(ok.index)
    assert ok["fid"] == pytest.approx(0.0, abs=1e-6) and abs(ok["kid"]) < 0.05
    # IS is that of the synthetic images' Inception logits (with the configured splits and seed)
    s = section_defaults("quality", settings)
    _, logits = inception_features(syn["image"].tolist(), load_inception(inception_file, 64), 2)
    assert logits.shape == (2, 1008)
    assert ok["is"] == pytest.approx(inception_score(logits, s["is_splits"], s["seed"])[0], rel=1e-6)
    assert ok["lpips_diversity"] > 0  # distinct noisy images
    assert set(table["class"]) >= {"all", "Blood vessel"}
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="AlexNet"):
        load_lpips(tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="InceptionV3"):
        load_inception(tmp_path / "bad.pth", 64)


def test_nuclei_scores_find_drawn_nuclei_and_miss_absent_ones(tmp_path):
    from histosynth.nuclei.conditioning import write_conditioning

    yy, xx = np.mgrid[:32, :32]
    cond = np.zeros((32, 32, 3), np.uint8)
    drawn = np.full((32, 32, 3), (225, 160, 200), np.uint8)
    for cy, cx in ((8, 8), (22, 20)):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
        drawn[disc], cond[disc, 1] = (70, 40, 130), 1
    blank = np.full((32, 32, 3), (225, 160, 200), np.uint8)  # the same map, no nuclei painted
    for name, image in (("drawn", drawn), ("blank", blank)):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    write_conditioning(cond, tmp_path / "c.png")
    rows = pd.DataFrame(
        {
            "id": ["drawn", "blank"],
            "image": [str(tmp_path / "drawn.png"), str(tmp_path / "blank.png")],
            "conditioning": [str(tmp_path / "c.png")] * 2,
        }
    )
    scores = nuclei_scores(rows, 0.5, section_defaults("nuclei"))
    foreground = scores[scores["class"] == "nuclei"].set_index("id")
    assert foreground.loc["drawn", "dice"] > 0.8
    assert foreground.loc["blank", "dice"] == 0.0 and foreground.loc["blank", "predicted_pixels"] == 0
    pooled = {(r["metric"], r["class"]): r["value"] for r in pooled_consistency(scores)}
    inter, a, b = (foreground[c].sum() for c in ("intersection", "truth_pixels", "predicted_pixels"))
    assert pooled[("nuclei_dice", "nuclei")] == pytest.approx(2 * inter / (a + b))


def test_nuclei_scores_are_exact_for_a_detector_wrong_in_a_known_way(tmp_path, monkeypatch):
    from histosynth.nuclei import stage
    from histosynth.nuclei.conditioning import write_conditioning
    from histosynth.nuclei.instances import class_index

    cond = np.zeros((32, 32, 3), np.uint8)
    cond[0:4, 0:4, 1] = class_index("tumor")  # 16 px
    cond[10:14, 0:4, 1] = class_index("immune")  # 16 px
    write_conditioning(cond, tmp_path / "c.png")
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "a.png")
    instances = np.zeros((32, 32), np.uint16)
    instances[0:4, 2:6] = 1  # the tumour nucleus shifted by 2 columns: 8 of its 16 px
    instances[10:14, 0:4] = 2  # the immune nucleus found exactly, but called stromal
    table = pd.DataFrame({"instance_id": [1, 2], "class": ["tumor", "stromal"]})
    monkeypatch.setattr(stage, "segment_patch", lambda rgb, mpp, shape, params, model=None: (instances, table))
    rows = pd.DataFrame({"id": ["a"], "image": [str(tmp_path / "a.png")], "conditioning": [str(tmp_path / "c.png")]})
    scores = nuclei_scores(rows, 0.5, section_defaults("nuclei")).set_index("class")
    assert list(scores.index) == ["nuclei", "tumor", "stromal", "immune"]  # classes neither drawn nor found: no row
    # foreground: intersection 8 + 16, truth 32, predicted 32 -> IoU 24/40, Dice 48/64
    assert scores.loc["nuclei", ["intersection", "truth_pixels", "predicted_pixels"]].tolist() == [24, 32, 32]
    assert scores.loc["nuclei", "iou"] == pytest.approx(0.6) and scores.loc["nuclei", "dice"] == pytest.approx(0.75)
    assert scores.loc["tumor", "iou"] == pytest.approx(8 / 24) and scores.loc["tumor", "dice"] == pytest.approx(0.5)
    assert scores.loc["immune", "predicted_pixels"] == 0 and scores.loc["immune", "iou"] == 0.0
    assert scores.loc["stromal", "truth_pixels"] == 0 and scores.loc["stromal", "dice"] == 0.0


def test_region_scores_and_pooled_consistency_maths(tmp_path):
    rows = write_images(tmp_path / "imgs", 2, (200, 120, 170))
    # Predict the top 8 rows as vessel: intersection 8 rows, truth 16 rows, prediction 8 rows, per image.
    scores = region_scores(
        rows, CLASSES, lambda rgb: np.where(np.arange(32)[:, None] < 8, 1, 0).repeat(32, 1).astype(np.uint8)
    )
    vessel = scores[scores["class"] == "Blood vessel"]
    assert list(vessel["intersection"]) == [256, 256] and list(vessel["truth_pixels"]) == [512, 512]
    assert vessel["dice"].tolist() == pytest.approx([2 * 8 / 24] * 2)
    values = {(r["metric"], r["class"]): r["value"] for r in pooled_consistency(scores)}
    assert values[("mask_iou", "Blood vessel")] == pytest.approx(0.5)
    assert values[("mask_dice", "Blood vessel")] == pytest.approx(2 * 8 / 24)
    assert math.isnan(values[("mask_iou", "Fat")])


def test_synthetic_sets_get_their_real_source_patches_as_reference(tmp_path):
    real = write_images(tmp_path / "real", 3, (200, 120, 170)).assign(patch_id=["p0", "p1", "p2"])
    syn = write_images(tmp_path / "syn", 2, (90, 40, 120), label=1, seed=1).assign(
        source_patch_id=["p0", "p2"], donor_patch_id=None
    )

    # The segmenter finds the vessel (top half) only in pink, real-looking images.
    def segment(rgb):
        return np.where((np.arange(32)[:, None] < 16) & (rgb[..., 0].mean() > 150), 1, 0).repeat(32, 1).astype(np.uint8)

    # Inpainted: Fat painted into the bottom quarter; the vessel rows above it are the source's pixels.
    painted = write_images(tmp_path / "painted", 2, (90, 40, 120), label=1, seed=1).assign(
        source_patch_id=["p0", "p2"], donor_patch_id="p1", target_class="Fat"
    )
    for path in painted["mask"]:
        mask = np.asarray(Image.open(path)).copy()
        mask[24:] = 2
        Image.fromarray(mask).save(path)
    table = pd.DataFrame(
        [
            row
            for mode, rows in {"synth": syn, "inpaint": painted}.items()
            for row in set_consistency(rows, mode, real, CLASSES, segment=segment)[0]
        ],
        columns=COLUMNS,
    )
    ok = table[table.status == "ok"].set_index(["set", "metric", "class"])["value"]
    assert ok[("synth", "mask_dice", "Blood vessel")] == 0.0 and ok[("synth", "mask_dice_real", "Blood vessel")] == 1.0
    assert ok[("inpaint", "mask_dice_real", "Blood vessel")] == 1.0  # the source's vessel, found in the real patch
    assert ("inpaint", "mask_dice_real", "Fat") not in ok and ("inpaint", "mask_iou_real", "Fat") not in ok
