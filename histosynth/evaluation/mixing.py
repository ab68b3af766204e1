"""Mixing: the training set of one ratio, real training patches plus k synthetic ones, written as
a manifest of rows (no copies), and the class-pixel share of every mixed set (thesis Table 6.1).

A ratio is `{name, synthetic, real}`: `synthetic` an int (a count of synthetic images) or a float
(a fraction of the real training set's size, 0.25 = a quarter as many synthetic as real images);
`real: false` leaves the real rows out (synthetic-only).

Sampling: the synthetic pool (the kept images of the configured sources' curated sets, in source
order; histosynth.evaluation.curation) is shuffled once with a permutation fixed by the seed
alone, and a ratio takes the first k images of it, so for one seed the ratios are nested (real +
2.5k is a subset of real + 5k) and differ only in how much synthetic data they add. Asking for more
images than curation kept is an error saying how many were kept and why the rest were rejected
(`mixing.on_shortfall: use_available` takes every kept image instead, with a warning); an empty
set for a ratio that asks for synthetic images is an error naming the stage that produced none.

The manifest's image and mask paths are stored relative to the manifest's folder, like the patch
indexes; `read_mix` (histosynth.data.io.read_patch_index) makes them absolute again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.data.annotations import class_fractions
from histosynth.data.io import read_file_table, read_mask, read_patch_index, write_relative, write_table
from histosynth.data.labels import patch_labels
from histosynth.data.patches import class_indices, fraction_column
from histosynth.evaluation.curation import reject_summary
from histosynth.generators.table import FAMILIES, set_rule
from histosynth.seeds import derive_seed

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("source", "mode", "image", "mask", "split", "origin_id", "slide", "source_slide", "class")


class MixingError(ValueError):
    """A ratio that cannot be built from the data at hand."""


def synthetic_count(ratio: Mapping, n_real: int) -> int:
    """Synthetic images a ratio asks for: an int is a count, a float a fraction of n_real (rounded)."""
    amount = ratio["synthetic"]
    if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
        raise MixingError(
            f"ratio {ratio.get('name')!r}: synthetic must be a count (int) or a fraction (float) >= 0, got {amount!r}"
        )
    return int(amount) if isinstance(amount, int) else int(math.floor(amount * n_real + 0.5))


def read_synthetic(curated: Mapping[str, str | Path]) -> tuple[pd.DataFrame, str]:
    """The synthetic pool: the kept images of the configured sources' curated sets ({mode: path},
    e.g. synth, inpaint), paths made absolute, in the given order, with a `mode` column; and a line
    saying how many each set kept and why the rest were rejected (for shortfall messages)."""
    tables, lines = [], []
    for mode, path in curated.items():
        table = read_file_table(path)
        lines.append(f"{mode}: {reject_summary(table)}")
        tables.append(table[table["keep"].astype(bool)].assign(mode=mode))
    pool = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["id", "image", "mask", "mode"])
    return pool, "; ".join(lines)


def mix(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    ratio: Mapping,
    seed: int,
    *,
    on_shortfall: str,
    labels: Mapping,
    classes: Sequence[str] = (),
    sources: Sequence[str] | None = None,
    kept: str = "",
) -> pd.DataFrame:
    """The training manifest of one ratio: columns source (real|synthetic), mode (real|synth|
    inpaint), image, mask, split ("train"), origin_id (patch_id or synthetic id), slide (None for
    synthetic rows), source_slide (the slide the image or its conditioning map comes from), class (the image's label under resolved `labels`, histosynth.data.labels:
    the patch's, or the one a synthetic image was made for), plus frac_<class> for `classes`.
    `real` holds patch-index rows (only split == "train" is used); `synthetic` the pool
    (read_synthetic, with `kept` its curation line);
    `on_shortfall` (error | use_available) what a ratio asking for more than the pool does;
    `sources` the configured modes, named in the error when the pool is empty. Deterministic
    given the seed."""
    name = ratio["name"]
    train = real[real["split"] == "train"] if "split" in real else real
    use_real = bool(ratio.get("real", True))
    wanted = synthetic_count(ratio, len(train))
    if use_real and train.empty:
        raise MixingError(f"ratio {name!r}: no real patches with split 'train'; check the slide sheet's split column")
    _check_leakage(real, synthetic)

    picked = _pick_synthetic(synthetic, wanted, seed, name, sources, on_shortfall, kept)
    frames = []
    if use_real:
        frames.append(
            _rows(
                train,
                "real",
                train["patch_id"],
                train["slide"],
                train["slide"],
                ["real"] * len(train),
                patch_labels(train, labels),
                classes,
            )
        )
    if len(picked):
        modes = picked["mode"] if "mode" in picked else ["synthetic"] * len(picked)
        frames.append(
            _rows(
                picked,
                "synthetic",
                picked["id"],
                [None] * len(picked),
                picked["source_slide"],
                modes,
                picked["class"],
                classes,
            )
        )
    if not frames:
        raise MixingError(f"ratio {name!r}: real is false and synthetic is 0, so the training set would be empty")
    manifest = pd.concat(frames, ignore_index=True)
    log.info("ratio %s: %d real + %d synthetic images", name, int(use_real) * len(train), len(picked))
    return manifest


def _pick_synthetic(
    pool: pd.DataFrame, wanted: int, seed: int, name: str, sources: Sequence[str] | None, on_shortfall: str, kept: str
) -> pd.DataFrame:
    if wanted == 0:
        return pool.iloc[:0]
    if pool.empty:
        modes = list(sources) if sources else [kind.name for kind in FAMILIES]
        stages = ", ".join(f"{m} (rule {set_rule(m)})" for m in modes)
        raise MixingError(
            f"ratio {name!r} asks for {wanted} synthetic images but the synthetic sources [{stages}] have none to give"
            f"{f' ({kept})' if kept else ''}; check that stage's log and its manifest, or set this ratio's synthetic to 0"
        )
    if wanted > len(pool):
        message = (
            f"ratio {name!r} asks for {wanted} synthetic images but only {len(pool)} are available ({kept or 'all'})"
        )
        if on_shortfall != "use_available":
            raise MixingError(
                f"{message}; lower the ratio, generate more (synthesis.*.n), loosen curation "
                "(curation.min_consistency, curation.copy_quantile) or set mixing.on_shortfall: use_available"
            )
        log.warning("%s: using all %d (mixing.on_shortfall: use_available)", message, len(pool))
    order = np.random.default_rng(derive_seed(seed, "mixing")).permutation(len(pool))
    return pool.iloc[order[:wanted]].reset_index(drop=True)


def _rows(
    table: pd.DataFrame, source: str, origin, slide, source_slide, mode, label, classes: Sequence[str]
) -> pd.DataFrame:
    rows = pd.DataFrame(
        {
            "source": source,
            "mode": list(mode),
            "image": table["image"].to_numpy(),
            "mask": table["mask"].to_numpy() if "mask" in table else None,  # a GAN set has none
            "split": "train",
            "origin_id": list(origin),
            "slide": list(slide),
            "source_slide": list(source_slide),
            "class": list(label),
        }
    )
    for name in classes:
        column = fraction_column(name)
        rows[column] = table[column].to_numpy(float) if column in table else np.nan
    return rows


def _check_leakage(real: pd.DataFrame, synthetic: pd.DataFrame) -> None:
    """Synthetic images made from test-slide patches would leak the test set into training."""
    if "source_patch_id" not in synthetic or "split" not in real or synthetic.empty:
        return
    test_ids = set(real.loc[real["split"] == "test", "patch_id"])
    leaked = synthetic["source_patch_id"].isin(test_ids)
    if leaked.any():
        raise MixingError(
            f"{int(leaked.sum())} synthetic images were made from test-slide patches "
            f"(e.g. {synthetic.loc[leaked, 'source_patch_id'].iloc[0]}); test slides must feed no training"
        )


def class_share(manifest: pd.DataFrame, classes: Sequence[str], ratio: str) -> pd.DataFrame:
    """Tidy class-pixel share of a mixed training set (thesis Table 6.1): one row per class and
    background with columns ratio, class, share (fraction of all training pixels), n_real,
    n_synthetic. Patches are weighted equally (every patch has the configured size); synthetic
    rows without a frac_<class> column are read from their masks, and rows without a mask (GAN
    images) hold no segmentation pixels and are left out."""
    fractions = _fractions(manifest[manifest["mask"].notna()], classes)
    shares = fractions.mean(axis=0) if len(fractions) else np.full(len(classes), np.nan)
    n_real = int((manifest["source"] == "real").sum())
    rows = [{"ratio": ratio, "class": "background", "share": float(1 - np.sum(shares))}]
    rows += [{"ratio": ratio, "class": c, "share": float(s)} for c, s in zip(classes, shares, strict=True)]
    table = pd.DataFrame(rows)
    table["n_real"], table["n_synthetic"] = n_real, len(manifest) - n_real
    return table


def _fractions(manifest: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    columns = [fraction_column(c) for c in classes]
    values = manifest.reindex(columns=columns).to_numpy(float)
    missing = np.isnan(values).any(axis=1)
    for i in np.flatnonzero(missing):
        values[i] = list(class_fractions(read_mask(manifest["mask"].iloc[i]), class_indices(classes)).values())
    return values


def without_masks(manifest: pd.DataFrame) -> int:
    """Rows of a manifest that have no label mask (GAN images), which segmentation cannot train on."""
    return int(manifest["mask"].isna().sum())


def write_mix(manifest: pd.DataFrame, path: str | Path) -> None:
    """Write a manifest with image and mask paths relative to its folder (atomically)."""
    write_relative(manifest, path, ("image", "mask"))


def read_mix(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by write_mix, paths made absolute (None for rows without a mask)."""
    return read_patch_index(path, columns=("image", "mask"))


def mix_dataset(
    real_indexes: Sequence[str | Path],
    curated_sets: Mapping[str, str | Path],
    ratio: Mapping,
    seed: int,
    classes: Sequence[str],
    labels: Mapping,
    manifest_out: str | Path,
    share_out: str | Path,
    *,
    on_shortfall: str,
) -> pd.DataFrame:
    """Entry of rule mix_dataset: read the patch indexes and the configured curated synthetic sets
    ({mode: path}), mix one ratio and write its manifest and class-share table; return the manifest."""
    real = pd.concat([read_patch_index(p) for p in real_indexes], ignore_index=True)
    pool, kept = read_synthetic(curated_sets)
    manifest = mix(
        real,
        pool,
        ratio,
        seed,
        on_shortfall=on_shortfall,
        labels=labels,
        classes=classes,
        sources=list(curated_sets),
        kept=kept,
    )
    write_mix(manifest, manifest_out)
    write_table(class_share(manifest, classes, ratio["name"]), share_out)
    return manifest
