"""The verdict's interval, false-positive rate, multiplicity control and detectable effect, by
simulation against known truth: per-image scores with a seed effect, a seed x arm effect, an image
effect, an image x arm effect (the test set's share of the uncertainty) and residual noise, and a
planted ratio effect. Run with -s to see the figures config/README.md quotes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from histosynth.evaluation.statistics import design_terms, holm, mde, paired_effect

IMAGES = 100
SD = {"seed": 0.05, "seed_arm": 0.01, "image": 0.1, "image_arm": 0.05, "residual": 0.1}  # per-image score scale


def simulate(rng: np.random.Generator, experiments: int, seeds: int, effect: float, endpoints: int = 1):
    """(differences (E, K, S), leave-one-image-out replicates (E, K, S, I)) of the pooled (mean)
    per-image score, ratio minus baseline, for K independent endpoints."""
    shape = (experiments, endpoints)
    arm = np.array([0.0, 1.0]).reshape(1, 1, 2, 1, 1)
    y = (
        0.7
        + rng.normal(0, SD["seed"], (*shape, 1, seeds, 1))
        + rng.normal(0, SD["seed_arm"], (*shape, 2, seeds, 1))
        + rng.normal(0, SD["image"], (*shape, 1, 1, IMAGES))
        + arm * (effect + rng.normal(0, SD["image_arm"], (*shape, 1, 1, IMAGES)))
        + rng.normal(0, SD["residual"], (*shape, 2, seeds, IMAGES))
    )
    d = y[:, :, 1] - y[:, :, 0]
    return d.mean(-1), (d.sum(-1, keepdims=True) - d) / (IMAGES - 1)


def components() -> dict[str, float]:
    """The true per-run variance components of the simulated design (statistics.variance_components' meaning)."""
    return {
        "seed": 2 * SD["seed_arm"] ** 2,
        "shared": SD["image_arm"] ** 2 / IMAGES,
        "within": 2 * SD["residual"] ** 2 / IMAGES,
    }


def covers(out: dict, effect: float, low: str = "ci_low", high: str = "ci_high") -> float:
    return float(np.mean((out[low] <= effect) & (effect <= out[high])))


@pytest.mark.parametrize("seeds, lowest, highest", [(5, 0.93, 0.98), (3, 0.90, 1.0)])
def test_interval_covers_the_planted_effect(seeds, lowest, highest):
    out = paired_effect(*simulate(np.random.default_rng(seeds), 2000, seeds, 0.02), confidence=0.95, power=0.8)
    new, seed_only = covers(out, 0.02), covers(out, 0.02, "t_low", "t_high")
    print(
        f"\n{seeds} seeds x {IMAGES} images, 2000 experiments: 95 % interval covers {new:.3f}, seed-only t {seed_only:.3f}"
    )
    assert lowest <= new <= highest
    assert seed_only < new  # the seed-only interval misses the test images' share


@pytest.mark.parametrize("seeds", [5, 3])
def test_no_effect_is_rarely_called_and_holm_keeps_the_family_wise_rate(seeds):
    rng = np.random.default_rng(10 + seeds)
    primary = paired_effect(*simulate(rng, 2000, seeds, 0.0), confidence=0.95, power=0.8)
    called = float(np.mean(primary["p"] < 0.05))
    assert np.array_equal(
        primary["p"] < 0.05, (primary["ci_low"] > 0) | (primary["ci_high"] < 0)
    )  # p and interval agree
    secondary = paired_effect(*simulate(rng, 1000, seeds, 0.0, endpoints=12), confidence=0.95, power=0.8)["p"]
    raw = float(np.mean((secondary < 0.05).any(axis=1)))
    family = float(np.mean([(holm(p) < 0.05).any() for p in secondary]))
    print(
        f"\n{seeds} seeds, no effect: primary called {called:.3f}; 12 secondary rows, any called: raw {raw:.3f}, Holm {family:.3f}"
    )
    assert called <= 0.06 and family <= 0.06 < raw


def test_the_printed_detectable_effect_is_detected_four_times_in_five():
    seeds = 5
    seed_term, shared = design_terms(components(), seeds)
    effect = float(mde(seed_term, shared, seeds, IMAGES, 0.95, 0.8))
    out = paired_effect(*simulate(np.random.default_rng(7), 2000, seeds, effect), confidence=0.95, power=0.8)
    detected = float(np.mean(out["ci_low"] > 0))
    print(
        f"\n{seeds} seeds: detectable effect {effect:.4f} (median printed by a run {np.median(out['mde']):.4f}), detected {detected:.3f}"
    )
    assert 0.75 <= detected <= 0.85
    assert np.median(out["mde"]) == pytest.approx(effect, rel=0.15)  # what a run prints estimates the design's


def test_seeds_agreeing_by_chance_keep_the_test_images_share():
    """Three seeds whose pooled differences agree exactly (s^2_d = 0) while each seed's per-image
    differences scatter: the interval keeps at least the fixed-seed width t_{G-1} sqrt(W / S + C)
    instead of collapsing to the shared term alone."""
    rng = np.random.default_rng(3)
    per_image = rng.normal(0.0, 0.1, (3, IMAGES))
    per_image += -0.02 - per_image.mean(axis=1, keepdims=True)  # every seed's mean difference is -0.02
    d = per_image.mean(-1)
    replicates = (per_image.sum(-1, keepdims=True) - per_image) / (IMAGES - 1)
    out = paired_effect(d, replicates, confidence=0.95, power=0.8)
    fixed_seed = stats.t.ppf(0.975, IMAGES - 1) * np.sqrt(out["var_within"] / 3 + max(out["var_shared"], 0.0))
    assert out["t_high"] - out["t_low"] == pytest.approx(0.0, abs=1e-12)  # the seed-only interval collapses
    assert (out["ci_high"] - out["ci_low"]) / 2 >= fixed_seed * (1 - 1e-9)
