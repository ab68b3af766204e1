"""Source patches of a synthetic set: the training patches whose maps its images are drawn from, and their labels."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from histosynth.data.labels import patch_labels
from histosynth.data.patches import class_indices, fraction_column, fraction_columns
from histosynth.generators.set_files import SynthesisError

log = logging.getLogger(__name__)


def classes_present(sources: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    """The classes with pixels in at least one source mask."""
    return [name for name in classes if fraction_column(name) in sources and (sources[fraction_column(name)] > 0).any()]


def class_index(sources: pd.DataFrame, classes: Sequence[str], target_class: str) -> int:
    """1 + the position of target_class; an error when it is not configured or in no source mask."""
    if target_class not in classes:
        raise SynthesisError(f"target class {target_class!r} is not one of the configured classes {list(classes)}")
    if not classes_present(sources, [target_class]):
        raise SynthesisError(
            f"target class {target_class!r} is absent from all {len(sources)} training masks; "
            f"classes present: {classes_present(sources, classes) or 'none'}"
        )
    return list(classes).index(target_class) + 1


def choose(
    rng: np.random.Generator, n: int, available: int, what: str, weights: np.ndarray | None = None
) -> np.ndarray:
    """n row positions, in proportion to `weights` when given: without replacement when there are
    enough, else with (and a warning)."""
    if n < 1:
        raise SynthesisError(f"the number of images n must be at least 1, got {n}")
    if available == 0:
        raise SynthesisError(f"no {what} to synthesize from")
    p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    if n <= available:
        return rng.permutation(available)[:n] if p is None else rng.choice(available, n, replace=False, p=p)
    log.warning("%d images requested but only %d %s: sampling them with replacement", n, available, what)
    return rng.integers(available, size=n) if p is None else rng.choice(available, n, replace=True, p=p)


def check_sources(sources: pd.DataFrame, classes: Sequence[str]) -> None:
    needed = ["patch_id", "image", "mask", "conditioning", *map(fraction_column, classes)]
    missing = [c for c in needed if c not in sources]
    if missing:
        raise SynthesisError(
            f"the source table lacks columns {missing}; pass conditioning index rows "
            "(histosynth.generators.datasets.read_indexes)"
        )


def image_classes(masks: Sequence[np.ndarray], sources: pd.DataFrame, labels: Mapping) -> np.ndarray:
    """The label of each output image: its source patch's sheet label, or (region labels) the
    dominant region class of its mask, which inpainting edits."""
    if labels["source"] == "sheet":
        return patch_labels(sources, labels)
    fractions = pd.DataFrame([fraction_columns(m, class_indices(labels["regions"])) for m in masks])
    return patch_labels(fractions, labels)


def per_class_picks(
    rng: np.random.Generator, pool_classes: np.ndarray, per_class: Mapping[str, int], labels: Mapping
) -> np.ndarray:
    """Row positions of the source maps for class-conditioned synthesis: per_class[name] of the
    rows labelled name, classes in the labels' order (with replacement, logged, when a class has fewer)."""
    unknown = [name for name in per_class if name not in labels["classes"]]
    if unknown:
        raise SynthesisError(
            f"synthesize.per_class names {unknown}, which are not among the labels {labels['classes']}"
        )
    picks = []
    for name in [name for name in labels["classes"] if name in per_class]:
        count, rows = per_class[name], np.flatnonzero(pool_classes == name)
        if not len(rows):
            present = pd.Series(pool_classes).value_counts().to_dict()
            raise SynthesisError(
                f"synthesize.per_class asks for {count} images of class {name!r} but no training patch "
                f"has that label (training patches per label: {present})"
            )
        picks.append(rows[choose(rng, count, len(rows), f"training patches of class {name!r}")])
    return np.concatenate(picks)
