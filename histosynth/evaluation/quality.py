"""The image-quality table of the synthetic sets: distribution scores (rule image_quality;
histosynth.evaluation.fidelity: FID/KID/IS with Inception weights, FD/KD and feature diversity in
an offline feature space, LPIPS diversity) and mask consistency (rule mask_consistency;
histosynth.evaluation.consistency), overall and per class, as tidy rows (COLUMNS), plus the
per-image consistency scores that curation reads. Two rules, so that a setting only the report
reads reruns no curation, mixing or task model.

Weights come from histosynth.weights and are never downloaded here: when a file is missing, the
metrics needing it get rows with status "skipped" and a note naming the file, the config key and
the rule; the weight-free metrics still run. Real images are the training split's patches.

Classes: the distribution scores are per label (histosynth.data.labels; a synthetic image's
manifest `class`, a real patch's label), so sets with and without masks (a GAN's) compare per
class alike; mask consistency is per region class. Class "all" is every image of the set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.config import section_defaults
from histosynth.data.io import read_file_table, read_patch_index, write_table
from histosynth.data.labels import patch_labels
from histosynth.device import pick_device
from histosynth.distances import fid, inception_score, kid
from histosynth.evaluation.consistency import (
    SCORE_COLUMNS,
    nuclei_scores,
    pooled_consistency,
    real_reference,
    region_scores,
)
from histosynth.evaluation.features import (
    SEGMENTATION,
    FeatureExtractor,
    configured_extractor,
    image_features,
    pairwise_diversity,
)
from histosynth.evaluation.fidelity import inception_features, lpips_diversity
from histosynth.nets import load_inception, load_lpips
from histosynth.seeds import derive_seed
from histosynth.weights import WEIGHTS, weights_file

log = logging.getLogger(__name__)

COLUMNS = ("set", "metric", "class", "value", "n_real", "n_synthetic", "status", "note", "extractor")


def image_classes(table: pd.DataFrame, labels: Mapping) -> np.ndarray:
    """Label per row (histosynth.data.labels): a synthetic manifest's `class`, else the patch's
    label (the sheet's, or its dominant region class)."""
    return table["class"].astype(str).to_numpy() if "class" in table else patch_labels(table, labels)


def _sample(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if len(table) <= n:
        return table.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(seed).choice(len(table), n, replace=False))
    return table.iloc[keep].reset_index(drop=True)


def image_quality(
    real: pd.DataFrame,
    synthetic: Mapping[str, pd.DataFrame],
    classes: Sequence[str],
    *,
    labels: Mapping,
    weights_dir: str | Path,
    settings: Mapping | None = None,
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    nuclei_settings=None,
    nuclei_model=None,
    mpp: float | None = None,
    extractor: FeatureExtractor | None = None,
    extractor_note: str = "",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy quality rows for each synthetic set ({mode: manifest rows, absolute paths}) against
    the real training rows (weights from weights_dir, histosynth.weights), and the per-image consistency scores (set, id, kind, class, counts,
    IoU, Dice). Fréchet distances, KID, IS and diversity come per label (resolved `labels`) and
    pooled ('all'); mask consistency per region class of `classes`. `segment` (rgb -> label mask, e.g. SegmentationModel.predict) enables region mask
    consistency; nuclei_settings (the `nuclei` config section, with nuclei_model when a learned
    detector is configured) and mpp enable nuclei consistency for sets with a conditioning
    column; `extractor` (histosynth.evaluation.features) gives the offline Fréchet distance, KID and
    feature diversity (extractor_note says why it is missing when it is None)."""
    s = section_defaults("quality", settings)
    device = pick_device(s["device"])
    all_real = real
    real = _sample(
        real[real["split"] == "train"] if "split" in real else real, s["max_images"], derive_seed(s["seed"], "real")
    )
    real_classes = image_classes(real, labels)
    rows: list[dict] = []
    scores: list[pd.DataFrame] = []

    inception_path, inception_note = weights_file(WEIGHTS["inception"], s["inception_weights"], weights_dir)
    lpips_path, lpips_note = weights_file(WEIGHTS["lpips"], s["lpips_weights"], weights_dir)
    inception_name, lpips_name = f"inception-v3 pool {s['feature']} (torch-fidelity)", "lpips alexnet (torchmetrics)"
    real_features = None
    if inception_path is not None:
        net = load_inception(inception_path, s["feature"])
        log.info("Inception features of %d real images (%s)", len(real), inception_note)
        real_features, _ = inception_features(real["image"].tolist(), net, s["batch_size"], device)
    lpips_net = load_lpips(lpips_path) if lpips_path is not None else None
    real_embedded = None
    if extractor is not None:
        log.info("%s features of %d real images", extractor.name, len(real))
        real_embedded = image_features(real["image"].tolist(), extractor, s["batch_size"])

    for mode, table in synthetic.items():
        table = _sample(table, s["max_images"], derive_seed(s["seed"], "synthetic", mode))
        syn_classes = image_classes(table, labels)
        groups = ["all", *[c for c in labels["classes"] if (syn_classes == c).any() or (real_classes == c).any()]]

        def add(metric, name, value, n_real, n_syn, status="ok", note="", used="", mode=mode):
            rows.append(
                {
                    "set": mode,
                    "metric": metric,
                    "class": name,
                    "value": value,
                    "n_real": n_real,
                    "n_synthetic": n_syn,
                    "status": status,
                    "note": note,
                    "extractor": used,
                }
            )

        if table.empty:
            add("images", "all", 0.0, len(real), 0, "skipped", f"synthetic set {mode} is empty")
            continue
        features = logits = embedded = None
        if inception_path is not None:
            log.info("Inception features of %d %s images", len(table), mode)
            features, logits = inception_features(table["image"].tolist(), net, s["batch_size"], device)
        if extractor is not None:
            embedded = image_features(table["image"].tolist(), extractor, s["batch_size"])
        for group in groups:
            r = np.ones(len(real), bool) if group == "all" else real_classes == group
            g = np.ones(len(table), bool) if group == "all" else syn_classes == group
            n_r, n_g = int(r.sum()), int(g.sum())
            few = n_r < s["min_images"] or n_g < s["min_images"]
            few_note = (
                f"{mode}, class {group}: {n_r} real and {n_g} synthetic images, fewer than "
                f"quality.min_images={s['min_images']}"
            )
            if features is None or few:
                for metric in ("fid", "kid", "kid_std", "is", "is_std"):
                    add(
                        metric,
                        group,
                        math.nan,
                        n_r,
                        n_g,
                        "skipped",
                        few_note if features is not None else inception_note,
                        inception_name,
                    )
            else:
                add("fid", group, fid(real_features[r], features[g]), n_r, n_g, used=inception_name)
                kid_mean, kid_std = kid(
                    real_features[r], features[g], s["kid_subsets"], s["kid_subset_size"], s["seed"]
                )
                add("kid", group, kid_mean, n_r, n_g, used=inception_name)
                add("kid_std", group, kid_std, n_r, n_g, used=inception_name)
                is_mean, is_std = inception_score(logits[g], s["is_splits"], s["seed"])
                add("is", group, is_mean, n_r, n_g, used=inception_name)
                add("is_std", group, is_std, n_r, n_g, used=inception_name)
            if embedded is None or few:
                for metric in ("fd", "kd", "kd_std", "feature_diversity"):
                    add(
                        metric,
                        group,
                        math.nan,
                        n_r,
                        n_g,
                        "skipped",
                        few_note if embedded is not None else extractor_note,
                        extractor.name if extractor is not None else "",
                    )
            else:
                add("fd", group, fid(real_embedded[r], embedded[g]), n_r, n_g, used=extractor.name)
                kd_mean, kd_std = kid(real_embedded[r], embedded[g], s["kid_subsets"], s["kid_subset_size"], s["seed"])
                add("kd", group, kd_mean, n_r, n_g, used=extractor.name)
                add("kd_std", group, kd_std, n_r, n_g, used=extractor.name)
                real_diversity = pairwise_diversity(real_embedded[r], s["lpips_pairs"], s["seed"])
                add(
                    "feature_diversity",
                    group,
                    pairwise_diversity(embedded[g], s["lpips_pairs"], s["seed"]),
                    n_r,
                    n_g,
                    note=f"real images: {real_diversity:.4f}",
                    used=extractor.name,
                )
            if lpips_net is None or n_g < max(2, s["min_images"]):
                add(
                    "lpips_diversity",
                    group,
                    math.nan,
                    n_r,
                    n_g,
                    "skipped",
                    lpips_note if lpips_net is None else few_note,
                    lpips_name,
                )
            else:
                paths = table.loc[g, "image"].tolist()
                add(
                    "lpips_diversity",
                    group,
                    lpips_diversity(paths, lpips_net, s["lpips_pairs"], s["seed"], s["batch_size"], device),
                    n_r,
                    n_g,
                    used=lpips_name,
                )
        if s["consistency"]:
            found, per_image = set_consistency(
                table,
                mode,
                all_real,
                classes,
                segment=segment,
                nuclei_settings=nuclei_settings,
                nuclei_model=nuclei_model,
                mpp=mpp,
            )
            rows.extend(found)
            scores.append(per_image)
    return pd.DataFrame(rows, columns=COLUMNS), _per_image(scores)


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
    per-image scores (set, SCORE_COLUMNS) that curation reads. Arguments as image_quality's."""
    rows: list[dict] = []

    def add(metric, name, value, n_real=0, status="ok", note="", used=""):
        rows.append(
            {
                "set": mode,
                "metric": metric,
                "class": name,
                "value": value,
                "n_real": n_real,
                "n_synthetic": len(table),
                "status": status,
                "note": note,
                "extractor": used,
            }
        )

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


def image_quality_stage(
    real_indexes: Sequence[str | Path],
    manifests: Mapping[str, str | Path],
    out: str | Path,
    *,
    config: Mapping,
    segmentation_model: str | Path | None = None,
) -> pd.DataFrame:
    """Entry of rule image_quality: the report's distribution scores of each synthetic manifest
    ({mode: path}) against the real training patches; the segmentation run folder (ratio 0) is the
    offline feature space when quality.extractor is 'segmentation'. Writes `out` (the quality table).
    Mask consistency, which curation reads, is rule mask_consistency's (consistency_stage)."""
    real = pd.concat([read_patch_index(p) for p in real_indexes], ignore_index=True)
    synthetic = {mode: read_file_table(path) for mode, path in manifests.items()}
    s = section_defaults("quality", config["quality"]) | {"consistency": False}
    segmenter = None
    if segmentation_model is not None and s["extractor"] == SEGMENTATION:
        from histosynth.evaluation.segmentation import load_model

        segmenter = load_model(segmentation_model, s["device"])
    extractor, why = configured_extractor(s, segmenter)
    extractor_note = f"offline FD/KD skipped: {why}" if extractor is None else ""
    if extractor is None:
        log.warning("%s", extractor_note)
    table, _ = image_quality(
        real,
        synthetic,
        config["classes"],
        labels=config["labels"],
        weights_dir=config["weights_dir"],
        settings=s,
        extractor=extractor,
        extractor_note=extractor_note,
    )
    write_table(table, out)
    return table


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
            table = _sample(read_file_table(path), s["max_images"], derive_seed(s["seed"], "synthetic", mode))
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
