"""The verdict on constructed paired data with known intervals: helped, hurt, no evidence."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from histosynth.evaluation.verdict import paired_difference, sentence, verdict, verdict_word


def scores(values: dict[str, list[float]], classes=("Blood vessel",), slides=("t1",)) -> pd.DataFrame:
    """Tidy rows: values[ratio][seed] for every class, per slide and pooled ('all')."""
    rows = []
    for ratio, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            for name in classes:
                for slide in (*slides, "all"):
                    rows.append({"ratio": ratio, "seed": seed, "slide": slide, "class": name, "metric": "dice", "value": value})
    return pd.DataFrame(rows)


def test_known_interval_and_words():
    # differences 0.1, 0.2, 0.0: mean 0.1, sd 0.1, half-width t(0.975, 2) * 0.1 / sqrt 3
    out = paired_difference([0.6, 0.8, 0.7], [0.5, 0.6, 0.7], seed=0)
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert out["n"] == 3 and out["mean_diff"] == pytest.approx(0.1)
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(0.1 - half), pytest.approx(0.1 + half))
    assert out["p_ttest"] == pytest.approx(1 - math.sqrt(3 / 5))  # t = sqrt 3 with 2 degrees of freedom
    assert -1e-9 <= out["boot_low"] <= 0.1 <= out["boot_high"] <= 0.2 + 1e-9  # resampled means of {0, 0.1, 0.2}
    assert out["boot_low"] < out["boot_high"]
    assert out["verdict"] == "no evidence"  # the interval holds 0
    helped = paired_difference([0.70, 0.72, 0.71, 0.69], [0.60, 0.61, 0.60, 0.59], seed=0)
    hurt = paired_difference([0.50, 0.52, 0.51], [0.60, 0.61, 0.60], seed=0)
    assert helped["ci_low"] > 0 and helped["verdict"] == "helped"
    assert hurt["ci_high"] < 0 and hurt["verdict"] == "hurt"
    assert verdict_word(math.nan, math.nan) == "no evidence"


def test_one_seed_gives_no_interval():
    out = paired_difference([0.9], [0.1], seed=0)
    assert out["mean_diff"] == pytest.approx(0.8) and math.isnan(out["ci_low"]) and out["verdict"] == "no evidence"


def test_verdict_table_pairs_by_seed_on_pooled_rows():
    table = scores({"real": [0.5, 0.6, 0.7], "up": [0.6, 0.7, 0.8], "down": [0.3, 0.45, 0.5]}, slides=("t1", "t2"))
    out = verdict(table, "real", ["dice"], task="segmentation", seed=1, order=["real", "down", "up"]).set_index("ratio")
    assert list(out.index) == ["down", "up"] and (out["n"] == 3).all()  # pooled rows only: one pair per seed
    assert out.loc["up", "mean_diff"] == pytest.approx(0.1) and out.loc["up", "verdict"] == "helped"  # no spread
    assert out.loc["down", "verdict"] == "hurt"
    assert "up vs real, Blood vessel dice: +0.100 [+0.100, +0.100] over 3 seeds: helped" == sentence(out.loc["up"].to_dict() | {"ratio": "up"})
    with pytest.raises(ValueError, match="baseline"):
        verdict(table, "nope", ["dice"], task="segmentation", seed=1)
