"""Mixing: counts and fractions, synthetic-only, nesting, the curation shortfall (error or
use_available), errors, class share, only kept curated images drawn, manifests written relative
to their folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histosynth.data.io import write_table
from histosynth.evaluation.mixing import (
    MixingError,
    class_share,
    mix,
    mix_dataset,
    read_mix,
    read_synthetic,
    synthetic_count,
)

CLASSES = ["Blood vessel", "Fat"]
LABELS = {"source": "region", "classes": ["background", *CLASSES], "regions": CLASSES, "background": "background"}


def real_table(n_train=10, n_val=2, n_test=2) -> pd.DataFrame:
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return pd.DataFrame(
        {
            "patch_id": [f"p{i}" for i in range(len(splits))],
            "slide": [f"s_{s}" for s in splits],
            "image": [f"/r/img{i}.png" for i in range(len(splits))],
            "mask": [f"/r/mask{i}.png" for i in range(len(splits))],
            "frac_blood_vessel": 0.1,
            "frac_fat": 0.2,
            "split": splits,
        }
    )


def synthetic_table(n=6, mode="inpaint") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"{mode}{i}" for i in range(n)],
            "image": [f"/s/{mode}{i}.png" for i in range(n)],
            "mask": [f"/s/{mode}m{i}.png" for i in range(n)],
            "mode": mode,
            "source_patch_id": "p0",
            "frac_blood_vessel": 0.5,
            "frac_fat": 0.0,
            "split": "synthetic",
            "class": "Blood vessel",
            "source_slide": "s_train",
        }
    )


def test_counts_and_fractions():
    assert synthetic_count({"name": "a", "synthetic": 3}, 10) == 3
    assert synthetic_count({"name": "a", "synthetic": 0.25}, 10) == 3  # 2.5 rounds half up
    assert synthetic_count({"name": "a", "synthetic": 1.0}, 10) == 10
    with pytest.raises(MixingError, match="count"):
        synthetic_count({"name": "a", "synthetic": -1}, 10)
    real, pool = real_table(), synthetic_table()
    m = mix(
        real,
        pool,
        {"name": "k4", "synthetic": 4, "real": True},
        seed=1,
        on_shortfall="error",
        labels=LABELS,
        classes=CLASSES,
    )
    assert (m["source"] == "real").sum() == 10 and (m["source"] == "synthetic").sum() == 4
    assert set(m["split"]) == {"train"} and m["origin_id"].is_unique
    assert set(m.loc[m.source == "real", "origin_id"]) == {f"p{i}" for i in range(10)}  # train rows only
    half = mix(
        real, pool, {"name": "half", "synthetic": 0.5}, seed=1, on_shortfall="error", labels=LABELS, classes=CLASSES
    )
    assert (half["source"] == "synthetic").sum() == 5


def test_deterministic_and_nested():
    real, pool = real_table(), synthetic_table(6)
    a = mix(real, pool, {"name": "k2", "synthetic": 2}, seed=7, on_shortfall="error", labels=LABELS)
    b = mix(real, pool, {"name": "k2", "synthetic": 2}, seed=7, on_shortfall="error", labels=LABELS)
    c = mix(real, pool, {"name": "k5", "synthetic": 5}, seed=7, on_shortfall="error", labels=LABELS)
    pd.testing.assert_frame_equal(a, b)
    syn = lambda m: m.loc[m.source == "synthetic", "origin_id"].tolist()  # noqa: E731
    assert syn(c)[:2] == syn(a)  # the smaller ratio is a prefix of the larger one
    others = [
        syn(mix(real, pool, {"name": "k5", "synthetic": 5}, seed=s, on_shortfall="error", labels=LABELS))
        for s in range(5)
    ]
    assert len({tuple(o) for o in others}) > 1  # the seed changes the draw


def test_synthetic_only_and_zero():
    real, pool = real_table(), synthetic_table(10)
    only = mix(
        real, pool, {"name": "syn", "synthetic": 1.0, "real": False}, seed=0, on_shortfall="error", labels=LABELS
    )
    assert set(only["source"]) == {"synthetic"} and len(only) == 10  # 100 % of the real set's size
    baseline = mix(
        real, synthetic_table(0), {"name": "real", "synthetic": 0}, seed=0, on_shortfall="error", labels=LABELS
    )
    assert set(baseline["source"]) == {"real"} and len(baseline) == 10
    with pytest.raises(MixingError, match="empty"):
        mix(real, pool, {"name": "none", "synthetic": 0, "real": False}, seed=0, on_shortfall="error", labels=LABELS)


def test_shortfall_is_an_error_or_uses_what_curation_kept(caplog):
    kept = "inpaint: 3 of 5 kept; rejected: 2 consistency"
    with pytest.raises(
        MixingError,
        match=r"asks for 8 synthetic images but only 3 are available \(inpaint: 3 of 5 kept; "
        r"rejected: 2 consistency\).*mixing.on_shortfall: use_available",
    ):
        mix(
            real_table(),
            synthetic_table(3),
            {"name": "k8", "synthetic": 8},
            seed=0,
            on_shortfall="error",
            labels=LABELS,
            kept=kept,
        )
    with caplog.at_level(logging.WARNING):
        m = mix(
            real_table(),
            synthetic_table(3),
            {"name": "k8", "synthetic": 8},
            seed=0,
            on_shortfall="use_available",
            labels=LABELS,
            kept=kept,
        )
    syn = m.loc[m.source == "synthetic", "origin_id"]
    assert sorted(syn) == ["inpaint0", "inpaint1", "inpaint2"]  # each kept image once, no duplicates
    assert "using all 3" in caplog.text


def test_empty_pool_names_the_stage():
    with pytest.raises(MixingError, match=r"rule inpaint"):
        mix(
            real_table(),
            synthetic_table(0),
            {"name": "k4", "synthetic": 4},
            seed=0,
            on_shortfall="error",
            labels=LABELS,
            sources=["inpaint"],
        )
    with pytest.raises(MixingError, match=r"rule synthesize"):
        mix(
            real_table(),
            synthetic_table(0),
            {"name": "k4", "synthetic": 4},
            seed=0,
            on_shortfall="error",
            labels=LABELS,
            sources=["synth"],
        )


def test_test_slide_leakage_is_refused():
    pool = synthetic_table(2)
    pool["source_patch_id"] = "p13"  # a test patch
    with pytest.raises(MixingError, match="test-slide"):
        mix(real_table(), pool, {"name": "k1", "synthetic": 1}, seed=0, on_shortfall="error", labels=LABELS)


def test_class_share_matches_table_6_1_arithmetic():
    m = mix(
        real_table(),
        synthetic_table(10),
        {"name": "k10", "synthetic": 10},
        seed=0,
        on_shortfall="error",
        labels=LABELS,
        classes=CLASSES,
    )
    share = class_share(m, CLASSES, "k10").set_index("class")["share"]
    assert share["Blood vessel"] == pytest.approx((10 * 0.1 + 10 * 0.5) / 20)
    assert share["Fat"] == pytest.approx(0.1)
    assert share.sum() == pytest.approx(1.0)


def test_mix_dataset_writes_relative_manifest(tmp_path):
    patches = tmp_path / "results" / "patches"
    (patches / "s").mkdir(parents=True)
    rows = []
    for i, split in enumerate(["train", "train", "test"]):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(patches / "s" / f"i{i}.png")
        Image.fromarray(np.full((8, 8), i % 2, np.uint8)).save(patches / "s" / f"m{i}.png")
        rows.append(
            {
                "patch_id": f"s{i}",
                "slide": "s",
                "image": f"s/i{i}.png",
                "mask": f"s/m{i}.png",
                "frac_blood_vessel": float(i % 2),
                "frac_fat": 0.0,
                "split": split,
            }
        )
    write_table(pd.DataFrame(rows), patches / "s.parquet")
    syn_dir = tmp_path / "results" / "synthetic" / "inpaint"
    (syn_dir / "masks").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 2, np.uint8)).save(syn_dir / "masks" / "x.png")  # all Fat, no frac columns
    write_table(
        pd.DataFrame(
            {
                "id": ["x", "y"],
                "image": ["images/x.png", "images/y.png"],
                "mask": ["masks/x.png"] * 2,
                "source_patch_id": ["s0", "s1"],
                "source_slide": "s",
                "class": ["Fat", "Fat"],
                "keep": [True, False],
                "reason": ["", "consistency 0.10 < curation.min_consistency 0.5"],
            }
        ),
        syn_dir / "curated.parquet",
    )  # a curated set: y was rejected
    out = tmp_path / "results" / "mixing" / "k1.parquet"
    share_out = tmp_path / "results" / "mixing" / "k1.share.parquet"
    mix_dataset(
        [patches / "s.parquet"],
        {"inpaint": syn_dir / "curated.parquet"},
        {"name": "k1", "synthetic": 1},
        3,
        CLASSES,
        LABELS,
        out,
        share_out,
        on_shortfall="error",
    )
    with pytest.raises(MixingError, match=r"only 1 are available \(inpaint: 1 of 2 kept; rejected: 1 consistency\)"):
        mix_dataset(
            [patches / "s.parquet"],
            {"inpaint": syn_dir / "curated.parquet"},
            {"name": "k2", "synthetic": 2},
            3,
            CLASSES,
            LABELS,
            out,
            share_out,
            on_shortfall="error",
        )
    stored = pd.read_parquet(out)
    assert not any(Path(p).is_absolute() for p in stored["image"])
    back = read_mix(out)
    assert all(Path(p).is_file() for p in back["mask"])
    assert back.loc[back.source == "synthetic", "mode"].tolist() == ["inpaint"]
    assert back.loc[back.source == "synthetic", "origin_id"].tolist() == ["x"]  # the rejected y is never drawn
    share = pd.read_parquet(share_out).set_index("class")["share"]
    assert share["Fat"] == pytest.approx(1 / 3)  # read from the synthetic mask
    assert share["Blood vessel"] == pytest.approx(1 / 3)
    pool, kept = read_synthetic({"inpaint": syn_dir / "curated.parquet"})
    assert pool["id"].tolist() == ["x"] and kept == "inpaint: 1 of 2 kept; rejected: 1 consistency"
