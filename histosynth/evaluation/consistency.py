"""Mask consistency: re-segment synthetic images and compare with the masks they were made from.

Regions: a segmentation model (normally the ratio-0 one, trained on real data only) labels each
image; nuclei: the nuclei detector re-detects them against the conditioning map's nucleus channel.
Per image and class the pixel counts are kept (so sets pool by summing), with IoU and Dice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.data.io import read_mask, read_rgb
from histosynth.overlap import overlap_counts, overlap_scores


def _counts(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """Pixel intersection, |truth| and |pred| of two boolean masks."""
    tp, fp, fn = overlap_counts(truth, pred)
    return tp, tp + fn, tp + fp


def _iou_dice(inter, truth, pred) -> tuple:
    """IoU and Dice from the intersection and the two sizes; NaN where both are empty."""
    scores = overlap_scores(inter, np.asarray(pred) - inter, np.asarray(truth) - inter)
    return scores["iou"], scores["dice"]


SCORE_COLUMNS = ("id", "kind", "class", "intersection", "truth_pixels", "predicted_pixels", "iou", "dice")


def _scores(records: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(records, columns=SCORE_COLUMNS[:-2])
    table["iou"], table["dice"] = _iou_dice(table["intersection"], table["truth_pixels"], table["predicted_pixels"])
    return table


def _ids(rows: pd.DataFrame) -> list[str]:
    return rows["id"].astype(str).tolist() if "id" in rows else [str(i) for i in range(len(rows))]


def region_scores(
    rows: pd.DataFrame,
    classes: Sequence[str],
    segment: Callable[[np.ndarray], np.ndarray],
    images: Sequence[str | Path] | None = None,
    outside_painted: bool = False,
) -> pd.DataFrame:
    """Per image and region class (kind 'region'): pixel intersection, truth and predicted pixel
    counts, IoU and Dice between the image's `mask` and segment(image) (a label mask of the same
    values). NaN IoU/Dice where the class is neither drawn nor found. `images` segments other
    images against the same masks (e.g. the real source patches); with `outside_painted`, rows with
    a donor (inpainted) count only the pixels outside their painted target-class region and leave
    that class out."""
    records = []
    images = rows["image"] if images is None else images
    for image_id, (_, row), image_path in zip(_ids(rows), rows.iterrows(), images, strict=True):
        truth, pred = read_mask(row["mask"]), segment(read_rgb(image_path))
        painted = row.get("target_class") if outside_painted and pd.notna(row.get("donor_patch_id")) else None
        target = list(classes).index(painted) + 1 if painted in classes else None
        outside = truth != target if target else np.ones(truth.shape, bool)
        for k, name in enumerate(classes, 1):
            if k != target:
                inter, a, b = _counts((truth == k) & outside, (pred == k) & outside)
                records.append(
                    {
                        "id": image_id,
                        "kind": "region",
                        "class": name,
                        "intersection": inter,
                        "truth_pixels": a,
                        "predicted_pixels": b,
                    }
                )
    return _scores(records)


def nuclei_scores(rows: pd.DataFrame, mpp: float, params, model=None) -> pd.DataFrame:
    """Per image (kind 'nuclei'): the same counts for the re-detected nuclei (histosynth.nuclei.stage
    with the `nuclei` settings `params`, a learned model when params["model"] is set) against the conditioning map's
    nucleus channel: the foreground (class 'nuclei') and each nucleus class drawn or found."""
    from histosynth.nuclei.conditioning import read_conditioning
    from histosynth.nuclei.instances import NUCLEUS_CLASSES, instance_class_indices
    from histosynth.nuclei.stage import segment_patch

    records = []
    for image_id, image_path, cond_path in zip(_ids(rows), rows["image"], rows["conditioning"], strict=True):
        rgb = read_rgb(image_path)
        truth = read_conditioning(cond_path)[..., 1]
        instances, table = segment_patch(rgb, mpp, rgb.shape[:2], params, model)
        lut = np.zeros(int(instances.max(initial=0)) + 1, np.uint8)
        for instance_id, index in instance_class_indices(table).items():
            lut[instance_id] = index
        pred = lut[instances]
        for k, name in enumerate(["nuclei", *NUCLEUS_CLASSES]):
            inter, a, b = _counts(truth > 0, pred > 0) if k == 0 else _counts(truth == k, pred == k)
            if k == 0 or a or b:
                records.append(
                    {
                        "id": image_id,
                        "kind": "nuclei",
                        "class": name,
                        "intersection": inter,
                        "truth_pixels": a,
                        "predicted_pixels": b,
                    }
                )
    return _scores(records)


def pooled_consistency(scores: pd.DataFrame) -> list[dict]:
    """Quality rows from per-image scores: IoU and Dice per kind and class from the pixel counts
    summed over images (mask_iou/mask_dice for regions, nuclei_iou/nuclei_dice for nuclei)."""
    out = []
    for (kind, name), part in scores.groupby(["kind", "class"], sort=False):
        inter, a, b = (int(part[c].sum()) for c in ("intersection", "truth_pixels", "predicted_pixels"))
        iou, dice = _iou_dice(inter, a, b)
        prefix = "mask" if kind == "region" else "nuclei"
        note = "class absent from the conditioning masks" if kind == "region" and not a else ""
        out += [
            {"metric": f"{prefix}_iou", "class": name, "value": iou, "note": note},
            {"metric": f"{prefix}_dice", "class": name, "value": dice, "note": note},
        ]
    return out


def real_reference(table: pd.DataFrame, real: pd.DataFrame, classes, segment) -> list[dict]:
    """mask_iou_real/mask_dice_real rows: the region scores of the real patch each synthetic image
    was made from against the synthetic image's mask (inpainted images: outside the painted
    region), pooled; the segmenter's ceiling on the same masks. None when the set's real source
    patches are not among `real`."""
    if "source_patch_id" not in table or "patch_id" not in real:
        return []
    sources = real.drop_duplicates("patch_id").set_index("patch_id").reindex(table["source_patch_id"].astype(str))
    if sources["image"].isna().any():
        return []
    note = "the real source patches of the same masks (inpainting: outside the painted region)"
    return [
        {"metric": f"{r['metric']}_real", "name": r["class"], "value": r["value"], "note": note}
        for r in pooled_consistency(region_scores(table, classes, segment, sources["image"], outside_painted=True))
    ]
