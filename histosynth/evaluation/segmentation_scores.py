"""Scores of a trained segmentation model on the test slides: per-image TP/FP/FN counts of every
class, per-slide and pooled Dice/precision/recall, and the TP/FP/FN overlays of the worst patches."""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from histosynth.data.io import write_table
from histosynth.evaluation.segmentation import (
    SegmentationDataset,
    SegmentationError,
    SegmentationModel,
    load_model,
    split_rows,
)
from histosynth.files import atomic_dir
from histosynth.overlap import overlap_scores
from histosynth.training.epochs import data_loader

OVERLAY_COLOURS = {"tp": (0, 200, 0), "fp": (230, 0, 0), "fn": (0, 90, 255)}
OVERLAY_ALPHA = 0.55
OVERLAY_MIN_SIDE = 256  # overlays of small patches are enlarged (nearest) to at least this side
SCORED = ("dice", "precision", "recall")  # the test metrics of every class


def image_counts(
    model: SegmentationModel,
    rows: pd.DataFrame,
    classes: Sequence[str] | None = None,
    *,
    batch_size: int,
    overlays_dir: str | Path | None = None,
    n_overlays: int = 0,
) -> pd.DataFrame:
    """TP, FP and FN pixels per test image and class on test rows (absolute image/mask paths, a
    slide column): columns patch_id (patch{i} where rows have none), slide, class, tp, fp, fn.
    With overlays_dir, writes TP/FP/FN overlays (TP green, FP red, FN blue over the image) of the
    n_overlays test patches with most labelled pixels."""
    names = list(classes) if classes else list(model.classes)
    unknown = [c for c in names if c not in model.classes]
    if unknown:
        raise SegmentationError(f"the model does not segment {unknown}; it was trained on {list(model.classes)}")
    channels = [list(model.classes).index(c) for c in names]
    values = [model.classes[c] for c in names]
    if rows.empty:
        raise SegmentationError("no test rows: no slide has split 'test'; set one in the slide sheet")
    ids = rows["patch_id"].astype(str).tolist() if "patch_id" in rows else [f"patch{i}" for i in range(len(rows))]
    slides = rows["slide"].astype(str).to_numpy() if "slide" in rows else np.full(len(rows), "all")
    counts = np.zeros((len(rows), len(names), 3), np.int64)  # image, class, tp/fp/fn
    candidates: list = []
    for batch in data_loader(SegmentationDataset(rows, values), batch_size, None, 0):
        probs = model.probabilities(batch["image"])[:, channels]
        target = batch["target"].int()
        pred, truth = probs >= model.threshold, target > 0
        stats = torch.stack([(pred & truth).sum((2, 3)), (pred & ~truth).sum((2, 3)), (~pred & truth).sum((2, 3))], -1)
        counts[batch["index"].numpy()] = stats.numpy()
        if overlays_dir is not None and n_overlays > 0:
            for k, i in enumerate(batch["index"].tolist()):
                item = (
                    float(target[k].sum()),
                    -i,
                    batch["image"][k].numpy(),
                    target[k].numpy(),
                    (probs[k] >= model.threshold).numpy(),
                )
                (heapq.heappush if len(candidates) < n_overlays else heapq.heappushpop)(candidates, item)
    if overlays_dir is not None:
        write_overlays(sorted(candidates, reverse=True), ids, names, Path(overlays_dir))
    return pd.DataFrame(
        {
            "patch_id": np.repeat(ids, len(names)),
            "slide": np.repeat(slides, len(names)),
            "class": np.tile(names, len(rows)),
            **{k: counts[..., j].ravel() for j, k in enumerate(("tp", "fp", "fn"))},
        }
    )


def slide_scores(images: pd.DataFrame) -> pd.DataFrame:
    """Dice, precision and recall per class from per-image counts (image_counts), per slide and
    pooled over all slides (slide 'all', from summed pixel counts). Tidy columns: slide, class,
    metric, value, tp, fp, fn, n_patches. A class without test pixels gets NaN Dice and recall
    (precision too unless it was predicted) and a warning."""
    names = list(dict.fromkeys(images["class"]))
    groups = {slide: part for slide, part in images.groupby("slide", sort=False)} | {"all": images}
    rows = []
    for slide, part in groups.items():
        sums = part.groupby("class", sort=False)[["tp", "fp", "fn"]].sum()
        for name in names:
            tp, fp, fn = (float(v) for v in sums.loc[name])
            if tp + fn == 0:
                warnings.warn(
                    f"class {name!r} has no pixels in the test patches of {'all slides' if slide == 'all' else slide}: "
                    "Dice and recall are NaN",
                    stacklevel=2,
                )
            scores = overlap_scores(tp, fp, fn)
            for metric in SCORED:
                rows.append(
                    {
                        "slide": slide,
                        "class": name,
                        "metric": metric,
                        "value": scores[metric],
                        "tp": int(tp),
                        "fp": int(fp),
                        "fn": int(fn),
                        "n_patches": part["patch_id"].nunique(),
                    }
                )
    return pd.DataFrame(rows)


def evaluate(
    model: SegmentationModel,
    rows: pd.DataFrame,
    classes: Sequence[str] | None = None,
    *,
    batch_size: int,
    overlays_dir: str | Path | None = None,
    n_overlays: int = 0,
) -> pd.DataFrame:
    """Dice, precision and recall per class on test rows, per slide and pooled (slide_scores of image_counts)."""
    return slide_scores(
        image_counts(model, rows, classes, batch_size=batch_size, overlays_dir=overlays_dir, n_overlays=n_overlays)
    )


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image with TP pixels tinted green, FP red, FN blue."""
    out = image.astype(np.float32).copy()
    for mask, key in ((truth & pred, "tp"), (~truth & pred, "fp"), (truth & ~pred, "fn")):
        out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * np.array(OVERLAY_COLOURS[key], np.float32)
    return out.clip(0, 255).astype(np.uint8)


def write_overlays(items, ids: Sequence[str], names: Sequence[str], out_dir: Path) -> list[Path]:
    """One PNG per patch: the image, then one TP/FP/FN overlay per class, side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for _, neg_i, image, target, pred in items:
        rgb = image.transpose(1, 2, 0)
        panels = [rgb] + [overlay(rgb, target[j].astype(bool), pred[j].astype(bool)) for j in range(len(names))]
        strip = np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels], axis=1)
        scale = max(1, math.ceil(OVERLAY_MIN_SIDE / rgb.shape[0]))
        path = out_dir / f"{ids[-neg_i]}.png"
        Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.Resampling.NEAREST).save(
            path
        )
        paths.append(path)
    return paths


def evaluate_segmentation(
    run_dir: str | Path,
    indexes: Sequence[str | Path],
    out: str | Path,
    images_out: str | Path,
    overlays_dir: str | Path,
    *,
    config: Mapping,
    ratio: str,
    seed: int,
) -> pd.DataFrame:
    """Entry of rule evaluate_segmentation: score one run on the test slides; write the per-image
    counts (image_counts' columns plus ratio and seed) to images_out, the tidy per-slide and pooled
    scores derived from them (slide_scores' columns plus ratio and seed) to out, and the overlays folder."""
    s = config["segmentation"]
    model = load_model(run_dir, s["device"])
    with atomic_dir(overlays_dir) as tmp:
        images = image_counts(
            model, split_rows(indexes, "test"), batch_size=s["batch_size"], overlays_dir=tmp, n_overlays=s["overlays"]
        )
    table = slide_scores(images)
    for frame in (table, images):
        frame.insert(0, "seed", seed)
        frame.insert(0, "ratio", ratio)
    write_table(images, images_out)
    write_table(table, out)
    return table
