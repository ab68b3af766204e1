"""The verdict from per-image tables: pooled metrics rebuilt equal to the evaluation's, the jackknife,
multiplicity adjustments against their definitions, the primary endpoint, words and sentences."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from histosynth.config import section_defaults
from histosynth.evaluation.replicates import (
    classification_replicates,
    classification_scores,
    jackknife_units,
    segmentation_replicates,
)
from histosynth.evaluation.statistics import benjamini_hochberg, holm, jackknife_cov, paired_effect
from histosynth.evaluation.verdict import answer, primary_endpoint, sentence, verdict_table

SETTINGS = section_defaults("verdict")
CLASSES = ("Blood vessel", "Fat")


def image_table(
    dice_shift: dict[str, list[float]], *, images: int = 40, slides: int = 2, seed: int = 0
) -> pd.DataFrame:
    """Per-image TP/FP/FN of every ratio x seed: each image has its own difficulty (shared by every
    run), each run its own noise; a ratio's shift moves FP+FN pixels into TP (a higher Dice)."""
    rng = np.random.default_rng(seed)
    hard = rng.uniform(0.1, 0.5, (images, len(CLASSES)))
    truth = rng.integers(200, 400, (images, len(CLASSES)))
    rows = []
    for ratio, shifts in dice_shift.items():
        for run_seed, shift in enumerate(shifts):
            miss = np.clip(hard - shift + rng.normal(0, 0.05, hard.shape), 0.0, 0.9)
            fn = np.round(truth * miss).astype(int)
            fp = np.round(truth * miss * 0.5).astype(int)
            for i in range(images):
                for c, name in enumerate(CLASSES):
                    rows.append(
                        {
                            "ratio": ratio,
                            "seed": run_seed,
                            "patch_id": f"p{i}",
                            "slide": f"s{i % slides}",
                            "class": name,
                            "tp": truth[i, c] - fn[i, c],
                            "fp": fp[i, c],
                            "fn": fn[i, c],
                        }
                    )
    return pd.DataFrame(rows)


def test_pooled_segmentation_scores_rebuilt_from_the_images_equal_the_evaluation():
    from histosynth.evaluation.segmentation_scores import slide_scores

    images = image_table({"real": [0.0]})
    pooled = slide_scores(images.drop(columns=["ratio", "seed"]))
    pooled = pooled[pooled["slide"] == "all"].set_index(["class", "metric"])["value"]
    unit, name = jackknife_units(images, min_slides=5, groups=100, seed=0)
    assert name == "images" and unit.nunique() == 40  # 2 slides < min_slides: images are the units
    for metric in ("dice", "precision", "recall"):
        full, reps = segmentation_replicates(images, unit, metric)
        assert full == pytest.approx([pooled[(c, metric)] for c in sorted(CLASSES)])
        assert reps.shape == (2, 40)
    # with one image left out, the counts of the others
    rest = images[images["patch_id"] != "p0"].groupby("class")[["tp", "fp", "fn"]].sum().loc["Fat"]
    full, reps = segmentation_replicates(images, unit, "dice")
    assert reps[1, unit["p0"]] == pytest.approx(2 * rest.tp / (2 * rest.tp + rest.fp + rest.fn))
    slides, name = jackknife_units(images, min_slides=2, groups=100, seed=0)
    grouped, _ = jackknife_units(images, min_slides=5, groups=7, seed=0)
    assert name == "slides" and slides.nunique() == 2 and grouped.nunique() == 7


@pytest.mark.parametrize("n_classes, seed", [(2, 0), (4, 1), (4, 2)])
def test_classification_scores_rebuilt_from_the_predictions_equal_the_evaluation(n_classes, seed):
    from histosynth.evaluation.classification_metrics import classification_metrics

    rng = np.random.default_rng(seed)
    true = rng.integers(0, n_classes - (seed == 2), 60)  # seed 2: the last class absent from the targets
    probs = rng.dirichlet(np.ones(n_classes), 60)
    probs[:, 0] = np.round(probs[:, 0], 1)  # ties
    probs /= probs.sum(1, keepdims=True)
    expected = classification_metrics(true, probs, [f"c{i}" for i in range(n_classes)])
    ours = classification_scores(true, probs)
    for row in expected.itertuples():
        key = ("all" if row._1 == "all" else int(row._1[1:]), row.metric)
        if key in ours:
            assert ours[key] == pytest.approx(row.value, abs=1e-6, nan_ok=True), key
    table = pd.DataFrame(
        {
            "patch_id": [f"p{i}" for i in range(60)],
            "slide": "s",
            "true": true,
            **{f"prob_{i}": probs[:, i] for i in range(n_classes)},
        }
    )
    unit, _ = jackknife_units(table, min_slides=5, groups=10, seed=0)
    full, reps = classification_replicates(table, unit, n_classes, [("all", "accuracy"), (0, "auroc")])
    assert full[0] == pytest.approx((probs.argmax(1) == true).mean()) and reps.shape == (2, 10)
    kept = unit.to_numpy() != 3
    assert reps[0, 3] == pytest.approx((probs.argmax(1) == true)[kept].mean())


def test_jackknife_of_a_mean_is_the_usual_standard_error_and_the_interval_adds_the_shared_test_set():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 30))  # 3 seeds' per-image differences
    reps = (x.sum(-1, keepdims=True) - x) / 29
    cov = jackknife_cov(reps)
    assert np.diag(cov) == pytest.approx(x.var(axis=1, ddof=1) / 30)
    out = paired_effect(x.mean(-1), reps, confidence=0.95, power=0.8)
    seed_only = out["t_high"] - out["estimate"]
    assert out["ci_high"] - out["estimate"] > seed_only > 0  # the test set's share adds to the seed-only interval
    assert out["var_shared"] == pytest.approx((cov.sum() - np.trace(cov)) / 6)


def test_adjusted_p_values_follow_their_definitions():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.2])
    assert holm(p)[[0, 2, 1, 4]] == pytest.approx([0.04, 0.09, 0.09, 0.2])  # 4*.01, 3*.03, max(2*.04, .09), .2
    assert math.isnan(holm(p)[3])
    assert benjamini_hochberg(p)[[0, 2, 1, 4]] == pytest.approx(
        [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2]
    )  # min over ranks >= r of p m / rank


def test_primary_endpoint_defaults():
    config = {
        "verdict": {"primary": None},
        "classes": ["Inflammation", "Blood vessel", "Fat"],
        "segmentation": {"enabled": True, "classes": None},
        "mixing": {
            "sources": ["synth"],
            "ratios": [{"name": "real", "synthetic": 0}, {"name": "i", "synthetic": 4, "sources": ["inpaint"]}],
        },
        "synthesis": {"synthesize": {"target_class": None}, "inpaint": {"target_class": "Fat"}},
    }
    assert primary_endpoint(config) == {"task": "segmentation", "class": "Fat", "metric": "dice"}
    config["mixing"]["ratios"].pop()
    assert primary_endpoint(config)["class"] == "Inflammation"  # no set targets a class: the first segmented one
    config["segmentation"]["enabled"] = False
    assert primary_endpoint(config) == {"task": "classification", "class": "all", "metric": "balanced_accuracy"}


def test_verdict_table_primary_first_with_adjusted_secondary_rows_and_a_plan():
    images = image_table({"real": [0.0, 0.0, 0.0], "up": [0.15, 0.14, 0.16], "same": [0.0, 0.0, 0.0]})
    primary = {"task": "segmentation", "class": "Fat", "metric": "dice"}
    table = verdict_table(
        images=images,
        predictions=None,
        class_names=[],
        segmentation_metrics=["dice", "recall"],
        classification_metrics=[],
        baseline="real",
        order=["real", "same", "up"],
        settings=SETTINGS,
        primary=primary,
        seed=0,
        sources={"up": "inpaint", "same": "synth"},
    )
    assert list(table["endpoint"][:2]) == ["primary"] * 2 and (table["endpoint"][2:] == "secondary").all()
    assert len(table) == 2 * 2 * 2 and (table["n"] == 3).all() and (table["unit"] == "images").all()
    up = table[(table["ratio"] == "up") & (table["endpoint"] == "primary")].iloc[0]
    assert up["verdict"] == "helped" and up["ci_low"] > 0 and up["sources"] == "inpaint"
    fixed_seed = stats.t.ppf(0.975, 40 - 1) * math.sqrt(up["var_within"] / 3 + max(up["var_shared"], 0.0))
    assert (up["ci_high"] - up["ci_low"]) / 2 >= fixed_seed  # never narrower than these models on another test set
    secondary = table[table["endpoint"] == "secondary"]
    assert (secondary["p_holm"] >= secondary["p_bh"]).all() and (secondary["p_bh"] >= secondary["p"]).all()
    assert secondary.loc[secondary["ratio"] == "up", "verdict"].eq("helped").all()
    same = table[(table["ratio"] == "same") & (table["endpoint"] == "primary")].iloc[0]
    assert same["verdict"] == "no evidence" and same["mde"] > 0
    assert same["seeds_needed"] >= 2 or math.isnan(same["seeds_needed"])
    assert "up helped" in answer(table) and "This run could see a change of ±" in answer(table)
    assert sentence(up).startswith("up vs real, Fat dice: +") and "over 3 seeds and 40 test images: helped" in sentence(
        up
    )
    with pytest.raises(ValueError, match="baseline"):
        verdict_table(
            images=images,
            predictions=None,
            class_names=[],
            segmentation_metrics=["dice"],
            classification_metrics=[],
            baseline="nope",
            order=["real"],
            settings=SETTINGS,
            primary=primary,
            seed=0,
        )


def test_one_seed_gives_no_interval():
    images = image_table({"real": [0.0], "up": [0.2]})
    table = verdict_table(
        images=images,
        predictions=None,
        class_names=[],
        segmentation_metrics=["dice"],
        classification_metrics=[],
        baseline="real",
        order=["real", "up"],
        settings=SETTINGS,
        primary={"task": "segmentation", "class": "Fat", "metric": "dice"},
        seed=0,
    )
    assert (table["n"] == 1).all() and table["ci_low"].isna().all() and (table["verdict"] == "no evidence").all()
    assert table["mean_diff"].gt(0).all()
