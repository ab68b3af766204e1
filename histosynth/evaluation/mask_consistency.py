"""Mask consistency of a synthetic set (pooled quality rows, per-image scores) and rule mask_consistency's entry.

The per-image scores (histosynth.evaluation.consistency) are what curation reads; the pooled rows
(COLUMNS, per region class and nuclei) go to the report. A rule of its own, so that a setting only
the report reads reruns no curation, mixing or task model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.config import section_defaults
from histosynth.data.io import read_file_table, read_patch_index, write_table
from histosynth.device import pick_device
from histosynth.evaluation.consistency import (
    SCORE_COLUMNS,
    nuclei_scores,
    pooled_consistency,
    real_reference,
    region_scores,
)
from histosynth.evaluation.quality_table import COLUMNS, quality_row, sample_rows
from histosynth.seeds import derive_seed


def _per_image(scores: list[pd.DataFrame]) -> pd.DataFrame:
    per_image = pd.concat(scores, ignore_index=True) if scores else pd.DataFrame(columns=SCORE_COLUMNS)
    return per_image.reindex(columns=["set", *SCORE_COLUMNS])


def set_consistency(
    table: pd.DataFrame,
    mode: str,
    real: pd.DataFrame,
    classes: Sequence[str],
    *,
    segment: Callable[[np.ndarray], np.ndarray] | None,
    nuclei_settings=None,
    nuclei_model=None,
    mpp: float | None = None,
) -> tuple[list[dict], pd.DataFrame]:
    """Mask consistency of one synthetic set (manifest rows, absolute paths): quality rows (COLUMNS;
    pooled per class, skip rows saying why, the real source patches' own agreement) and the
    per-image scores (set, SCORE_COLUMNS) that curation reads. `real`: the patch rows the sources come
    from; `segment` (rgb -> label mask, e.g. SegmentationModel.predict) enables region consistency;
    nuclei_settings (the `nuclei` section, with nuclei_model for a learned detector) and mpp enable
    nuclei consistency for sets with a conditioning column."""
    rows: list[dict] = []

    def add(metric, name, value, n_real=0, status="ok", note="", used=""):
        rows.append(quality_row(mode, metric, name, value, n_real, len(table), status, note, used))

    if "mask" not in table:
        add("mask_iou", "all", math.nan, status="skipped", note=f"synthetic set {mode} has no masks (a GAN set)")
        return rows, _per_image([])
    found = []
    if segment is None:
        add(
            "mask_iou",
            "all",
            math.nan,
            status="skipped",
            note="no segmentation model given (the ratio-0 model of rule train_segmentation)",
        )
    else:
        found.append(region_scores(table, classes, segment))
    if nuclei_settings is None or mpp is None or "conditioning" not in table:
        why = "no conditioning maps in the manifest" if "conditioning" not in table else "nuclei settings not given"
        add("nuclei_iou", "nuclei", math.nan, status="skipped", note=why)
    else:
        found.append(nuclei_scores(table, mpp, nuclei_settings, nuclei_model))
    scores = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=SCORE_COLUMNS)
    detector = "nuclei detector " + (str(nuclei_model.path) if nuclei_model is not None else "(classical)")
    for row in pooled_consistency(scores):
        add(
            row["metric"],
            row["class"],
            row["value"],
            note=row["note"],
            used="segmentation model" if row["metric"].startswith("mask") else detector,
        )
    if segment is not None:
        for row in real_reference(table, real, classes, segment):
            add(
                row["metric"],
                row["name"],
                row["value"],
                n_real=int(table["source_patch_id"].nunique()),
                note=row["note"],
                used="segmentation model",
            )
    return rows, _per_image([scores.assign(set=mode)])


def consistency_stage(
    real_indexes: Sequence[str | Path],
    manifests: Mapping[str, str | Path],
    table_out: str | Path,
    scores_out: str | Path,
    *,
    config: Mapping,
    segmentation_model: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Entry of rule mask_consistency: each synthetic manifest's ({mode: path}) images, sampled as
    image_quality samples them, against their masks (the segmentation run folder of ratio 0) and
    nuclei (config `nuclei`). Writes the pooled quality rows for the report (`table_out`) and the
    per-image scores curation reads (`scores_out`); both empty while quality.consistency is off."""
    s = section_defaults("quality", config["quality"])
    rows, scores = [], []
    if s["consistency"]:
        from histosynth.nuclei.model import load_detector

        real = pd.concat([read_patch_index(p) for p in real_indexes], ignore_index=True)
        segment = None
        if segmentation_model is not None:
            from histosynth.evaluation.segmentation import load_model

            segment = load_model(segmentation_model, s["device"]).predict
        nuclei = config["nuclei"]
        nuclei_model = load_detector(nuclei["model"], str(pick_device(s["device"]))) if nuclei["model"] else None
        for mode, path in manifests.items():
            table = sample_rows(read_file_table(path), s["max_images"], derive_seed(s["seed"], "synthetic", mode))
            if table.empty:
                continue
            found, per_image = set_consistency(
                table,
                mode,
                real,
                config["classes"],
                segment=segment,
                nuclei_settings=nuclei,
                nuclei_model=nuclei_model,
                mpp=config["patches"]["mpp"],
            )
            rows += found
            scores.append(per_image)
    quality, per_image = pd.DataFrame(rows, columns=COLUMNS), _per_image(scores)
    write_table(quality, table_out)
    write_table(per_image, scores_out)
    return quality, per_image
