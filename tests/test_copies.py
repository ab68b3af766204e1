"""The copy test's parts: alignment over flips/rotations and shifts, the joint calibration of its
two thresholds, and benchmarks/copies.py run small (every planted kind found, genuine images flagged
at about copy_quantile)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from histosynth.evaluation.copies import aligned_ncc, eight_views, grey, thresholds

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("copies_benchmark", REPO / "benchmarks/copies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aligned_ncc_finds_a_rotated_and_shifted_copy():
    bench = load_benchmark()
    rng = np.random.default_rng(0)
    train = bench.tissue(rng, 3, 48)
    moved = np.roll(train[1], (2, -3), axis=(0, 1))  # shifted by (2, -3) px
    query = eight_views(moved[None])[3, 0]  # and flipped/rotated
    pairs = np.array([[0, 0], [0, 1], [0, 2]])
    best, local, view, offset = aligned_ncc(grey(query[None], 128), grey(train, 128), pairs, shift=4)
    assert best[1] == pytest.approx(1.0, abs=1e-4) and best[[0, 2]].max() < 0.6
    assert local[1] == pytest.approx(1.0, abs=1e-4) and local[[0, 2]].max() < 0.6
    # the view that matched undoes the flip/rotation, and the query's centre sits 2 down, 3 left of the patch's
    assert np.array_equal(eight_views(query[None])[view[1], 0], moved)
    assert tuple(offset[1]) == (4 - 2, 4 + 3)


def test_thresholds_flag_the_quantile_of_the_calibration_patches_together():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 2))
    similarity, relative = z[:, 0], 1 - 0.1 * (0.6 * z[:, 0] + 0.8 * z[:, 1])  # correlated, as the two measures are
    t_sim, t_rel = thresholds(similarity, relative, 0.1)
    flagged = (similarity > t_sim) | (relative < t_rel)
    assert 0.08 <= flagged.mean() <= 0.1
    assert 0.05 <= (similarity > t_sim).mean() < flagged.mean()  # each measure takes a share, neither all of it


def test_the_benchmark_finds_every_kind_of_planted_copy(capsys):
    table = load_benchmark().main(["--tiny", "--per-kind", "3", "--copy-quantile", "0.1"])
    kinds = table[table["measure"] == "copy kind"].set_index("name")
    assert (kinds["recall"] == 1).all(), kinds  # each planted copy flagged, with its own source as copy_of
    assert (kinds["precision"] > 0.5).all()
    fresh = table[table["measure"] == "fresh real class"].set_index("name")
    assert set(fresh.index) == {"texture", "nuclei"} and (fresh["false_positive_rate"] <= 0.25).all()
    assert "inpaint" in capsys.readouterr().out


def test_a_descriptor_replaces_the_pixel_measure():
    from histosynth.config import section_defaults
    from histosynth.evaluation.copies import Space, find_copies, unit

    bench = load_benchmark()
    train, _, heldout, classes = bench.tiny_patches(seed=3, n=20)
    rng = np.random.default_rng(4)  # not the stream the patches were drawn from
    images = np.stack([bench.plant("flip", train[7], heldout[0], rng), *bench.tissue(rng, 3, 64)])

    def views(x):  # a stand-in descriptor (Space's interface): 8 x 8 average-pooled grey values of each view
        return unit(
            np.stack(
                [
                    grey(v, 8).reshape(len(x), -1) - grey(v, 8).reshape(len(x), -1).mean(1, keepdims=True)
                    for v in eight_views(x)
                ]
            )
        )

    space = Space(views(train)[0], views(images), views(heldout))
    found = find_copies(
        images,
        train,
        heldout,
        classes=np.full(4, "texture"),
        heldout_classes=classes,
        settings=section_defaults("curation", {"copy_quantile": 0.1}),
        descriptor=space,
    )
    assert (
        found["copy"][0] and found["matches"].index[0, 0] == 7 and found["similarity"][0] == pytest.approx(1, abs=1e-5)
    )
    assert not found["copy"][1:].any()
