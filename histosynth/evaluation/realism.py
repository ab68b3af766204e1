"""Realism of a synthetic set against real training patches, per class, and rule realism's entry.

Can a classifier tell its images from real training patches (the two-sample test,
histosynth.evaluation.two_sample), and are they as sharp (Laplacian variance and high-frequency
share, histosynth.evaluation.texture)? Per class the C2ST statistic is the AUC among that class's
images. The real images are drawn to match the synthetic set's class composition, so a set drawn
class-balanced is not told apart by how often each class occurs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from histosynth.evaluation.texture import HIGH_FREQUENCY, image_measures, texture_statistics
from histosynth.evaluation.two_sample import two_sample_test
from histosynth.seeds import derive_seed

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

ROW_METRICS = ("c2st_auc", "c2st_low", "c2st_high", "laplacian_ratio", "high_frequency_ratio")
IMAGE_COLUMNS = (
    "set",
    "kind",
    "id",
    "class",
    "laplacian_variance",
    "high_frequency_share",
    "p_synthetic",
    "p_linear",
    "p_cnn",
    "spectrum",
)


def matched_real(real_classes: np.ndarray, synthetic_classes: np.ndarray, per_synthetic: int, seed: int) -> np.ndarray:
    """Positions of real images drawn to follow the synthetic set's class composition: for each
    class, up to per_synthetic real images per synthetic one (all of them where fewer exist)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for name, count in zip(*np.unique(synthetic_classes, return_counts=True), strict=True):
        pool = np.flatnonzero(real_classes == name)
        chosen.append(rng.choice(pool, min(len(pool), per_synthetic * count), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, int)


def realism(
    real: np.ndarray,
    real_classes: np.ndarray,
    synthetic: np.ndarray,
    synthetic_classes: np.ndarray,
    settings: Mapping,
    *,
    groups: Sequence[str],
    min_images: int,
    device="cpu",
) -> tuple[list[dict], dict]:
    """Quality rows (metric, class, value, n_real, n_synthetic, status, note) of one synthetic set
    against real images drawn for it (matched_real already applied), for 'all' and each of
    `groups`, and the per-image measures {laplacian_variance, high_frequency_share, spectrum,
    p_synthetic, p_linear, p_cnn} over real then synthetic images."""
    s = settings
    images = np.concatenate([real, synthetic])
    classes = np.concatenate([real_classes, synthetic_classes])
    measures = image_measures(images)
    test = two_sample_test(
        real, synthetic, s, seed=s["seed"], device=device, features=texture_statistics(images, measures)
    )
    sharpness, share = measures["laplacian_variance"], measures["high_frequency_share"]
    frequencies, spectrum = measures["frequencies"], measures["spectrum"]
    rows = []
    for group in ["all", *groups]:
        members = np.ones(len(images), bool) if group == "all" else classes == group
        is_real, is_syn = members & ~test.synthetic, members & test.synthetic
        n_r, n_s = int(is_real.sum()), int(is_syn.sum())
        row = {
            "class": group,
            "n_real": n_r,
            "n_synthetic": n_s,
            "status": "ok",
            "note": "",
            "extractor": "C2ST: texture statistics + pixel CNN, out of fold",
        }
        if min(n_r, n_s) < min_images:
            note = f"class {group}: {n_r} real and {n_s} synthetic images, fewer than realism.min_images={min_images}"
            rows += [row | {"metric": m, "value": math.nan, "status": "skipped", "note": note} for m in ROW_METRICS]
            continue
        value = test.auc(members)
        low, high = test.interval(s["confidence"], members)
        note = (
            f"{s['confidence']:.0%} interval [{low:.3f}, {high:.3f}] over {len(test.fold_aucs(members))} folds; "
            f"texture-statistics learner alone {test.auc(members, test.linear):.3f}, pixel CNN alone "
            f"{test.auc(members, test.cnn):.3f}"
        )
        rows += [
            row | {"metric": "c2st_auc", "value": value, "note": note},
            row | {"metric": "c2st_low", "value": low},
            row | {"metric": "c2st_high", "value": high},
            row
            | {
                "metric": "laplacian_ratio",
                "value": float(np.median(sharpness[is_syn]) / max(np.median(sharpness[is_real]), 1e-12)),
                "note": f"median Laplacian variance synthetic {np.median(sharpness[is_syn]):.0f}, real {np.median(sharpness[is_real]):.0f}",
                "extractor": "grey 3x3 Laplacian",
            },
            row
            | {
                "metric": "high_frequency_ratio",
                "value": float(np.median(share[is_syn]) / max(np.median(share[is_real]), 1e-12)),
                "note": f"median share of power above {HIGH_FREQUENCY} cycles/px: synthetic {np.median(share[is_syn]):.4f}, "
                f"real {np.median(share[is_real]):.4f}",
                "extractor": "radially averaged power spectrum",
            },
        ]
    per_image = {
        "laplacian_variance": sharpness,
        "high_frequency_share": share,
        "spectrum": list(spectrum),
        "p_synthetic": test.probability,
        "p_linear": test.linear,
        "p_cnn": test.cnn,
        "frequencies": frequencies,
    }
    return rows, per_image


def realism_stage(
    real_indexes: Sequence, manifest, *, mode: str, table_out, images_out, figure_out, config: Mapping
) -> pd.DataFrame:
    """Entry of rule realism: one synthetic set (manifest path) against the real training patches
    (patch indexes). Writes the quality rows (histosynth.evaluation.quality_table.COLUMNS) to
    `table_out`, the per-image measures (IMAGE_COLUMNS, real and synthetic) to `images_out` and the
    realism figure (histosynth.evaluation.realism_figure) to `figure_out`."""
    import pandas as pd

    from histosynth.data.io import read_file_table, read_patch_index, read_rgb, write_table
    from histosynth.device import pick_device
    from histosynth.evaluation.quality_table import COLUMNS, image_classes
    from histosynth.evaluation.realism_figure import plot_realism

    s = config["realism"]
    real = pd.concat([read_patch_index(p) for p in real_indexes], ignore_index=True)
    real = real[real["split"] == "train"].reset_index(drop=True) if "split" in real else real
    synthetic = read_file_table(manifest)
    if len(synthetic) > s["max_images"]:
        synthetic = synthetic.sample(s["max_images"], random_state=derive_seed(s["seed"], "synthetic", mode) % 2**32)
    synthetic = synthetic.reset_index(drop=True)
    real_classes, syn_classes = image_classes(real, config["labels"]), image_classes(synthetic, config["labels"])
    real = real.iloc[
        matched_real(real_classes, syn_classes, s["real_per_synthetic"], derive_seed(s["seed"], "real", mode))
    ]
    real_classes = image_classes(real, config["labels"])
    log.info(
        "%s: %d synthetic images against %d real training patches of the same classes", mode, len(synthetic), len(real)
    )
    real_images = np.stack([read_rgb(p) for p in real["image"]]) if len(real) else np.empty((0, 1, 1, 3), np.uint8)
    syn_images = (
        np.stack([read_rgb(p) for p in synthetic["image"]]) if len(synthetic) else np.empty((0, 1, 1, 3), np.uint8)
    )
    base = {"set": mode, "status": "ok", "note": ""}
    if min(len(real), len(synthetic)) < max(2, s["folds"]) or real_images.shape[1:] != syn_images.shape[1:]:
        why = (
            f"synthetic images are {syn_images.shape[1:3]} px, real patches {real_images.shape[1:3]}: no comparison "
            "of images of different sizes"
            if min(len(real), len(synthetic)) >= 2
            else f"{len(real)} real and {len(synthetic)} synthetic images, fewer than realism.folds={s['folds']}"
        )
        log.warning("%s: realism skipped: %s", mode, why)
        rows = [
            base
            | {
                "metric": m,
                "class": "all",
                "value": math.nan,
                "n_real": len(real),
                "n_synthetic": len(synthetic),
                "status": "skipped",
                "note": why,
                "extractor": "",
            }
            for m in ROW_METRICS
        ]
        table = pd.DataFrame(rows, columns=COLUMNS)
        write_table(table, table_out)
        write_table(pd.DataFrame(columns=IMAGE_COLUMNS), images_out)
        plot_realism(pd.DataFrame(columns=IMAGE_COLUMNS), table, [], figure_out, images={})
        return table
    groups = [c for c in config["labels"]["classes"] if (syn_classes == c).any()]
    rows, measures = realism(
        real_images,
        real_classes,
        syn_images,
        syn_classes,
        s,
        groups=groups,
        min_images=s["min_images"],
        device=pick_device(s["device"]),
    )
    table = pd.DataFrame([base | row for row in rows], columns=COLUMNS)
    write_table(table, table_out)
    frequencies = measures.pop("frequencies")
    per_image = pd.DataFrame(
        {
            "set": mode,
            "kind": ["real"] * len(real) + ["synthetic"] * len(synthetic),
            "id": [*real["patch_id"].astype(str), *synthetic["id"].astype(str)],
            "class": [*real_classes, *syn_classes],
            **measures,
        }
    ).reindex(columns=IMAGE_COLUMNS)
    write_table(per_image, images_out)
    shown = per_image[per_image["kind"] == "synthetic"].sort_values("p_synthetic")
    picks = pd.concat([shown.head(FIGURE_IMAGES), shown.tail(FIGURE_IMAGES)]).drop_duplicates("id")
    position = {name: k for k, name in enumerate(synthetic["id"].astype(str))}
    plot_realism(per_image, table, frequencies, figure_out, images={i: syn_images[position[i]] for i in picks["id"]})
    return table


FIGURE_IMAGES = 6  # most and least realistic synthetic images drawn in the figure
