"""Scores for instance segmentation: one-to-one matching at an IoU threshold, detection
precision/recall/F1, the Aggregated Jaccard Index, panoptic quality and pixel Dice, per image and
pooled, and the benchmark scoring of a folder of predictions against a folder of ground truth."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.nuclei.annotations import annotation_files, image_shape, is_mask, read_annotation
from histosynth.nuclei.geojson import NucleusRasterizer
from histosynth.nuclei.instances import NucleiError, read_instances
from histosynth.overlap import overlap_counts, overlap_scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Overlaps:
    """Areas of the instances of a truth/prediction pair and their non-zero intersections."""

    truth_ids: np.ndarray  # instance ids present in truth (ascending)
    pred_ids: np.ndarray
    truth_area: np.ndarray
    pred_area: np.ndarray
    pair_truth: np.ndarray  # positions into truth_ids / pred_ids of each overlapping pair
    pair_pred: np.ndarray
    intersection: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        union = self.truth_area[self.pair_truth] + self.pred_area[self.pair_pred] - self.intersection
        return self.intersection / union


def _overlaps(truth: np.ndarray, pred: np.ndarray) -> _Overlaps:
    """Instance areas and pairwise intersections from a joint histogram of the label pairs:
    O(pixels log pixels), never a loop over instance pairs."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction differ in shape: {truth.shape} vs {pred.shape}")
    truth_ids, truth_index = np.unique(truth.ravel(), return_inverse=True)
    pred_ids, pred_index = np.unique(pred.ravel(), return_inverse=True)
    truth_area = np.bincount(truth_index, minlength=len(truth_ids))
    pred_area = np.bincount(pred_index, minlength=len(pred_ids))
    both = (truth.ravel() > 0) & (pred.ravel() > 0)
    keys, intersection = np.unique(truth_index[both] * len(pred_ids) + pred_index[both], return_counts=True)
    pair_truth, pair_pred = np.divmod(keys, len(pred_ids))
    # Drop the background (id 0) from the instance lists and renumber the pairs accordingly.
    t0, p0 = int(truth_ids.size > 0 and truth_ids[0] == 0), int(pred_ids.size > 0 and pred_ids[0] == 0)
    return _Overlaps(
        truth_ids[t0:], pred_ids[p0:], truth_area[t0:], pred_area[p0:], pair_truth - t0, pair_pred - p0, intersection
    )


def match_instances(
    truth: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5
) -> tuple[int, int, int, list[tuple[int, int, float]]]:
    """One-to-one matching of truth and predicted instances (integer label images, 0 = none).

    Pairs with IoU > iou_threshold are matched greedily from the highest IoU down. For a
    threshold of 0.5 or more this is the unique optimal matching, since an instance can have
    IoU > 0.5 with at most one other. Returns (tp, fp, fn, [(truth_id, pred_id, iou), ...]).
    """
    overlaps = _overlaps(truth, pred)
    iou = overlaps.iou
    candidates = np.flatnonzero(iou > iou_threshold)
    candidates = candidates[np.argsort(-iou[candidates], kind="stable")]
    used_truth, used_pred, pairs = set(), set(), []
    for k in candidates:
        t, p = int(overlaps.pair_truth[k]), int(overlaps.pair_pred[k])
        if t in used_truth or p in used_pred:
            continue
        used_truth.add(t)
        used_pred.add(p)
        pairs.append((int(overlaps.truth_ids[t]), int(overlaps.pred_ids[p]), float(iou[k])))
    tp = len(pairs)
    return tp, len(overlaps.pred_ids) - tp, len(overlaps.truth_ids) - tp, pairs


def _detection_scores(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 from counts. With neither truth nor predictions all three are 1.0
    (nothing to find, nothing wrongly found); an undefined ratio otherwise (e.g. recall with no
    truth) is 0.0."""
    if tp + fp + fn == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0}
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _aji_sums(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    """The AJI's accumulated intersection and union for one image."""
    o = _overlaps(truth, pred)
    iou = o.iou
    # Best prediction per truth instance: sort pairs by truth, then IoU descending; keep each truth's first.
    order = np.lexsort((-iou, o.pair_truth))
    first = order[np.r_[True, o.pair_truth[order][1:] != o.pair_truth[order][:-1]]] if len(order) else order
    best_pred = o.pair_pred[first]
    intersection = int(o.intersection[first].sum())
    union = int((o.truth_area[o.pair_truth[first]] + o.pred_area[best_pred] - o.intersection[first]).sum())
    unmatched_truth = np.ones(len(o.truth_ids), bool)
    unmatched_truth[o.pair_truth[first]] = False
    unused_pred = np.ones(len(o.pred_ids), bool)
    unused_pred[best_pred] = False
    union += int(o.truth_area[unmatched_truth].sum()) + int(o.pred_area[unused_pred].sum())
    return intersection, union


def _image_counts(truth: np.ndarray, pred: np.ndarray, iou_threshold: float) -> np.ndarray:
    """The additive counts every score is made of, for one image: tp, fp, fn, the matched pairs'
    summed IoU, the AJI's intersection and union, foreground pixel tp, fp, fn."""
    tp, fp, fn, pairs = match_instances(truth, pred, iou_threshold)
    c, u = _aji_sums(truth, pred)
    pixels = overlap_counts(np.asarray(truth) > 0, np.asarray(pred) > 0)
    return np.array([tp, fp, fn, sum(p[2] for p in pairs), c, u, *pixels], float)


def _scores(counts: np.ndarray, images: int) -> dict:
    """Scores from (summed) _image_counts. PQ = DQ x SQ (Kirillov et al. 2019, as HoVer-Net's
    get_fast_pq): DQ = tp / (tp + fp/2 + fn/2), which is F1, and SQ the mean IoU of the matched
    pairs; with nothing to find and nothing found all three are 1.0."""
    tp, fp, fn, iou_sum, aji_c, aji_u = counts[:6]
    detection = _detection_scores(int(tp), int(fp), int(fn))
    sq = iou_sum / tp if tp else float(tp + fp + fn == 0)
    return {
        **detection,
        "aji": aji_c / aji_u if aji_u else 1.0,
        "pq": detection["f1"] * sq,
        "dq": detection["f1"],
        "sq": sq,
        "dice": overlap_scores(*counts[6:].astype(np.int64), empty=1.0)["dice"],
        "images": images,
    }


def score_instances(pairs: Iterable[tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5) -> dict:
    """Scores pooled over many (truth, pred) images: tp/fp/fn summed before precision, recall
    and F1 (detection); AJI (Kumar et al. 2017, as HoVer-Net's get_fast_aji: each truth instance takes
    its highest-IoU prediction, unmatched truths and unused predictions add their area to the union)
    from summed intersections and unions; PQ/DQ/SQ (see _scores) from summed matches; foreground
    pixel Dice from summed pixel counts. One image is scored by passing one pair; an empty truth
    and prediction score 1.0."""
    counts, images = np.zeros(9), 0
    for truth, pred in pairs:
        counts += _image_counts(truth, pred, iou_threshold)
        images += 1
    return _scores(counts, images)


def score_folders(
    pred_dir: str | Path, truth_dir: str | Path, images_dir: str | Path | None = None, iou_threshold: float = 0.5
) -> pd.DataFrame:
    """Benchmark scores of a folder of predicted nuclei against a folder of ground truth, paired
    by file stem (annotations in any format histosynth.nuclei.annotations reads; a polygon file is
    rasterised on its counterpart mask's grid, or on its image's in images_dir when neither is a mask). One
    row per truth image, then `mean` (the mean over images, as MoNuSeg reports AJI) and `pooled`
    (counts summed over images). A truth image without a prediction scores as predicting
    nothing (logged); predictions without truth are ignored (logged)."""
    truth_files, pred_files = annotation_files(truth_dir), annotation_files(pred_dir)
    if not truth_files:
        raise NucleiError(
            f"{truth_dir}: no ground truth (<stem>.png/.tif instance masks, <stem>.xml or <stem>.geojson)"
        )
    missing = sorted(set(truth_files) - set(pred_files))
    if missing:
        log.warning(
            "%d truth image(s) without a prediction in %s score as empty: %s",
            len(missing),
            pred_dir,
            ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
        )
    extra = sorted(set(pred_files) - set(truth_files))
    if extra:
        log.warning("%d prediction(s) without truth in %s ignored: %s", len(extra), truth_dir, ", ".join(extra[:10]))
    rows, total = [], np.zeros(9)
    for stem, truth_path in truth_files.items():
        pred_path = pred_files.get(stem)
        truth, pred = _read_pair(truth_path, pred_path, images_dir, stem)
        counts = _image_counts(truth, pred, iou_threshold)
        total += counts
        rows.append(
            {
                "image": stem,
                "truth": int(counts[0] + counts[2]),
                "pred": int(counts[0] + counts[1]),
                **_scores(counts, 1),
            }
        )
    table = pd.DataFrame(rows).drop(columns="images")
    metrics = [c for c in table.columns if c not in ("image", "truth", "pred", "tp", "fp", "fn")]
    mean = {"image": "mean", **table[metrics].mean().to_dict()}
    pooled = {
        "image": "pooled",
        **{k: v for k, v in _scores(total, len(rows)).items() if k != "images"},
        "truth": int(total[0] + total[2]),
        "pred": int(total[0] + total[1]),
    }
    table = pd.concat([table, pd.DataFrame([mean, pooled])], ignore_index=True)
    return table.astype({c: "Int64" for c in ("truth", "pred", "tp", "fp", "fn")})


def _read_pair(truth_path: Path, pred_path: Path | None, images_dir, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """Truth and prediction instances of one image on one grid."""
    masks = [p for p in (truth_path, pred_path) if p is not None and is_mask(p)]
    if masks:
        shape = read_annotation(masks[0]).shape
    elif images_dir is not None:
        shape = image_shape(images_dir, stem)
    else:
        raise NucleiError(
            f"{truth_path}: polygons (XML or GeoJSON) on both sides (or no prediction): give the images "
            "folder (--images) for its size"
        )
    truth = read_annotation(truth_path, shape)
    pred = read_annotation(pred_path, shape) if pred_path is not None else np.zeros(shape, np.int64)
    if truth.shape != pred.shape:
        raise NucleiError(
            f"{pred_path}: {pred.shape[1]}x{pred.shape[0]} px but its truth {truth_path} is "
            f"{truth.shape[1]}x{truth.shape[0]}; predict at the truth's resolution"
        )
    return truth, pred


def score_nuclei_stage(index: pd.DataFrame, pred_dir: str | Path, truth: dict, iou_threshold: float = 0.5) -> dict:
    """Score the nuclei stage's instance masks (pred_dir/<patch_id>.png) of one slide's patches
    (histosynth.data.io.read_patch_index) against ground-truth nucleus polygons in level-0
    coordinates (a GeoJSON FeatureCollection, e.g. a demo slide's or a QuPath export), each
    rasterised on the patch grid with the same pixel-centre rule; pooled as score_instances."""
    rasterizer = NucleusRasterizer(truth)
    pred_dir = Path(pred_dir)

    def pairs():
        for row in index.itertuples(index=False):
            extent = row.size * row.mpp / row.slide_mpp
            expected, _ = rasterizer.rasterize(row.x, row.y, extent, extent, (row.size, row.size))
            yield expected, read_instances(pred_dir / f"{row.patch_id}.png")

    return score_instances(pairs(), iou_threshold)
