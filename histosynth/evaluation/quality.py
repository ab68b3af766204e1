"""Distribution scores of the synthetic sets for the image-quality table, per class, and rule image_quality's entry.

Distribution scores (histosynth.evaluation.fidelity: FID/KID/IS with Inception weights, FD/KD and
feature diversity in an offline feature space, LPIPS diversity) as tidy rows (COLUMNS); mask
consistency (rule mask_consistency) is histosynth.evaluation.mask_consistency's. Two rules, so
that a setting only the report reads reruns no curation, mixing or task model.

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.config import section_defaults
from histosynth.data.io import read_file_table, read_patch_index, write_table
from histosynth.device import pick_device
from histosynth.distances import fid, inception_score, kid
from histosynth.evaluation.features import (
    SEGMENTATION,
    FeatureExtractor,
    configured_extractor,
    image_features,
    pairwise_diversity,
)
from histosynth.evaluation.fidelity import inception_features, lpips_diversity
from histosynth.evaluation.quality_table import COLUMNS, image_classes, quality_row, sample_rows
from histosynth.nets import load_inception, load_lpips
from histosynth.seeds import derive_seed
from histosynth.weights import WEIGHTS, weights_file

log = logging.getLogger(__name__)


def image_quality(
    real: pd.DataFrame,
    synthetic: Mapping[str, pd.DataFrame],
    *,
    labels: Mapping,
    weights_dir: str | Path,
    settings: Mapping | None = None,
    extractor: FeatureExtractor | None = None,
    extractor_note: str = "",
) -> pd.DataFrame:
    """Tidy quality rows for each synthetic set ({mode: manifest rows, absolute paths}) against
    the real training rows (weights from weights_dir, histosynth.weights): the report's distribution
    scores. Fréchet distances, KID, IS and diversity come per label (resolved `labels`) and pooled
    ('all'); mask consistency is rule mask_consistency's (histosynth.evaluation.mask_consistency).
    `extractor` (histosynth.evaluation.features) gives the offline Fréchet distance, KID and
    feature diversity (extractor_note says why it is missing when it is None)."""
    s = section_defaults("quality", settings)
    device = pick_device(s["device"])
    real = sample_rows(
        real[real["split"] == "train"] if "split" in real else real, s["max_images"], derive_seed(s["seed"], "real")
    )
    real_classes = image_classes(real, labels)
    rows: list[dict] = []

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
        table = sample_rows(table, s["max_images"], derive_seed(s["seed"], "synthetic", mode))
        syn_classes = image_classes(table, labels)
        groups = ["all", *[c for c in labels["classes"] if (syn_classes == c).any() or (real_classes == c).any()]]

        def add(metric, name, value, n_real, n_syn, status="ok", note="", used="", mode=mode):
            rows.append(quality_row(mode, metric, name, value, n_real, n_syn, status, note, used))

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
    return pd.DataFrame(rows, columns=COLUMNS)


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
    s = section_defaults("quality", config["quality"])
    segmenter = None
    if segmentation_model is not None and s["extractor"] == SEGMENTATION:
        from histosynth.evaluation.segmentation import load_model

        segmenter = load_model(segmentation_model, s["device"])
    extractor, why = configured_extractor(s, segmenter)
    extractor_note = f"offline FD/KD skipped: {why}" if extractor is None else ""
    if extractor is None:
        log.warning("%s", extractor_note)
    table = image_quality(
        real,
        synthetic,
        labels=config["labels"],
        weights_dir=config["weights_dir"],
        settings=s,
        extractor=extractor,
        extractor_note=extractor_note,
    )
    write_table(table, out)
    return table
