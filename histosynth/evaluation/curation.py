"""Curation of a synthetic set: keep the images that agree with their own mask and copy no
training patch; score the rest with the reason they were rejected.

Consistency: an image's region Dice (its mask against what the real-only segmentation model
finds, pooled over the region classes; histosynth.evaluation.consistency) and its nuclei Dice,
both from the image-quality stage's per-image scores. An image whose mask and prediction are both
empty has nothing to disagree with and keeps Dice NaN (kept).

Copies: histosynth.evaluation.copies judges each image against the real training patches on the
image itself (aligned pixel correlation and Carlini's relative distance, or a configured
copy-detection descriptor), with thresholds calibrated per class on held-out real patches (the
validation slides). The offline feature space of the quality stage (quality.extractor) only
proposes candidates, and gives `feature_distance` and `closer_to_train` for the audit. A synthetic
image is drawn from a training patch's conditioning map, so it follows that source patch's layout
(regions and nuclei) by design: its own source is left out of its search (its similarity with it
is kept as `source_similarity`, not judged). An inpainted image is real outside its painted region
by design, so only the painted region is compared.

Realism: each image's out-of-fold probability of being synthetic from rule realism's two-sample
test (histosynth.evaluation.realism), `p_synthetic`; curation.max_synthetic_probability rejects the
images a classifier finds most obviously synthetic (HistoGAN's selective augmentation).

Columns added to the manifest (COLUMNS): consistency, nuclei_consistency, p_synthetic; nearest_patch (the
training patch most similar to the image), nearest_view (the flip/rotation of the image that
matched it), similarity, second_patch and second_similarity (the next most similar);
similarity_threshold, relative_distance, relative_threshold and calibration (the class whose
held-out patches set the thresholds, or 'pooled'): the copy decision with both measures;
source_similarity (with its own source patch, not judged); feature_distance (to the nearest
training patch in the feature space), closer_to_train and closer_to_train_real (the audit's
reference); copy, copy_of, keep and reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.data.io import read_mask, read_rgb
from histosynth.evaluation.copies import Space, eight_views, find_copies, unit
from histosynth.evaluation.features import FeatureExtractor, pixel_features

log = logging.getLogger(__name__)

COLUMNS = (
    "consistency",
    "nuclei_consistency",
    "p_synthetic",
    "nearest_patch",
    "nearest_view",
    "similarity",
    "second_patch",
    "second_similarity",
    "similarity_threshold",
    "relative_distance",
    "relative_threshold",
    "calibration",
    "source_similarity",
    "feature_distance",
    "closer_to_train",
    "closer_to_train_real",
    "copy",
    "copy_of",
    "keep",
    "reason",
)
REASON_KINDS = ("nuclei consistency", "consistency", "realism", "copy")  # each reject message starts with its kind


def _embed(images: np.ndarray, extractor: FeatureExtractor, batch_size: int) -> np.ndarray:
    """Unit-normalised features of (N, H, W, 3) uint8 images."""
    chunks = [pixel_features(images[s : s + batch_size], extractor) for s in range(0, len(images), batch_size)]
    return unit(np.concatenate(chunks) if chunks else np.empty((0, 1)))


def view_features(images: np.ndarray, extractor: FeatureExtractor, batch_size: int) -> np.ndarray:
    """(8, N, D) unit-normalised features of the 8 flips/rotations of (N, H, W, 3) images; view 0
    is the image itself."""
    return np.stack([_embed(view, extractor, batch_size) for view in eight_views(images)])


def image_consistency(scores: pd.DataFrame) -> pd.DataFrame:
    """Per image id: `consistency`, the region Dice pooled over the region classes, and
    `nuclei_consistency`, the nuclei-foreground Dice, from per-image consistency scores
    (histosynth.evaluation.consistency.SCORE_COLUMNS); NaN where mask and prediction are empty."""

    def pooled(part: pd.DataFrame) -> float:
        inter, truth, pred = (part[c].sum() for c in ("intersection", "truth_pixels", "predicted_pixels"))
        return 2 * inter / (truth + pred) if truth + pred else np.nan

    regions = scores[scores["kind"] == "region"].groupby("id").apply(pooled, include_groups=False).rename("consistency")
    nuclei = (
        scores[(scores["kind"] == "nuclei") & (scores["class"] == "nuclei")]
        .set_index("id")["dice"]
        .rename("nuclei_consistency")
    )
    return pd.concat([regions, nuclei], axis=1)


@dataclass(frozen=True)
class Reference:
    """The real patches a set is checked against: training rows and held-out (validation) rows
    (with their `class`), their pixels, and the training and held-out features in the candidate
    feature space and in a copy-detection descriptor where those are configured (Space.images empty)."""

    train: pd.DataFrame
    train_pixels: np.ndarray
    heldout: pd.DataFrame
    heldout_pixels: np.ndarray
    features: Space | None = None
    descriptor: Space | None = None


def load_reference(
    train: pd.DataFrame,
    heldout: pd.DataFrame,
    extractor: FeatureExtractor | None,
    batch_size: int,
    descriptor: FeatureExtractor | None = None,
) -> Reference:
    """Read the real patches (absolute image paths; held-out rows' `class` names their calibration,
    one class when absent) and embed them in each given space."""
    if train.empty or heldout.empty:
        raise ValueError(
            f"curation needs real training and held-out (val) patches; got {len(train)} and {len(heldout)}"
        )
    train_pixels = np.stack([read_rgb(p) for p in train["image"]])
    heldout_pixels = np.stack([read_rgb(p) for p in heldout["image"]])
    heldout = heldout.reset_index(drop=True)
    heldout = heldout.assign(**{"class": heldout["class"].astype(str) if "class" in heldout else ""})

    def space(model: FeatureExtractor | None) -> Space | None:
        if model is None:
            return None
        views = view_features(heldout_pixels, model, batch_size)
        return Space(_embed(train_pixels, model, batch_size), views[:, :0], views)

    return Reference(
        train.reset_index(drop=True), train_pixels, heldout, heldout_pixels, space(extractor), space(descriptor)
    )


def curate(
    manifest: pd.DataFrame,
    scores: pd.DataFrame,
    reference: Reference,
    classes: Sequence[str],
    *,
    settings: Mapping,
    extractor: FeatureExtractor | None,
    batch_size: int,
    descriptor: FeatureExtractor | None = None,
    realism: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The manifest (absolute paths) with COLUMNS added: consistency scores, the nearest and
    second-nearest training patches with their similarity and the view that matched, the copy test's
    two judged measures with the thresholds of the image's calibration (its `class`, else pooled),
    `copy`, `keep` and the reason of each reject. `settings` is the `curation` config section; with
    enabled false every image is kept (still scored). `extractor` and `descriptor` are the spaces
    `reference` was embedded in; `realism` the set's per-image realism rows (id, p_synthetic), when
    rule realism ran."""
    s = settings
    out = manifest.reset_index(drop=True).copy()
    if out.empty:
        return out.assign(**{c: pd.Series(dtype=object) for c in COLUMNS})
    out = (
        out.join(image_consistency(scores), on="id")
        if len(scores)
        else out.assign(consistency=np.nan, nuclei_consistency=np.nan)
    )
    probability = realism.set_index("id")["p_synthetic"] if realism is not None else pd.Series(dtype=float)
    out["p_synthetic"] = out["id"].astype(str).map(probability).astype(float)
    pixels = np.stack([read_rgb(p) for p in out["image"]])
    ids = reference.train["patch_id"].astype(str).to_numpy()
    painted = _painted_regions(out, classes)
    position = {pid: i for i, pid in enumerate(ids)}
    sources = np.array([position.get(str(pid), -1) for pid in out.get("source_patch_id", pd.Series(index=out.index))])
    features = descriptor_space = None
    if reference.features is not None and painted is None:
        features = dataclasses.replace(reference.features, images=view_features(pixels, extractor, batch_size))
    if reference.descriptor is not None and painted is None:
        descriptor_space = dataclasses.replace(
            reference.descriptor, images=view_features(pixels, descriptor, batch_size)
        )
    image_classes = out["class"].astype(str).to_numpy() if "class" in out else np.full(len(out), "")
    found = find_copies(
        pixels,
        reference.train_pixels,
        reference.heldout_pixels,
        classes=image_classes,
        heldout_classes=reference.heldout["class"].to_numpy(),
        settings=s,
        features=features,
        descriptor=descriptor_space,
        sources=None if painted is not None else sources,
        regions=painted,
    )
    matches = found.pop("matches")
    named = lambda k: np.where(matches.index[:, k] >= 0, ids[np.maximum(matches.index[:, k], 0)], None)  # noqa: E731
    out = out.assign(
        nearest_patch=named(0),
        nearest_view=matches.view,
        second_patch=named(1),
        second_similarity=matches.similarity[:, 1],
        **found,
    )
    if features is not None:
        distances = (1 - features.images @ features.train.T).min(axis=0)
        distances[sources[:, None] == np.arange(len(ids))[None]] = np.inf
        heldout = (1 - reference.features.heldout @ features.train.T).min(axis=0).min(axis=1)
        out["feature_distance"] = distances.min(axis=1)
        out["closer_to_train"], out["closer_to_train_real"] = _closer_to_train(
            out["feature_distance"].to_numpy(), features.images[0], heldout, reference.features.heldout[0]
        )
    out = out.reindex(columns=[*manifest.columns, *[c for c in COLUMNS if c not in manifest.columns]])
    out["copy_of"] = np.where(out["copy"].astype(bool), out["nearest_patch"], None)
    out["reason"] = [_reason(row, s) for row in out.to_dict("records")]
    out["keep"] = out["reason"].eq("") | (not s["enabled"])
    log.info(
        "%d of %d images kept (%s)",
        int(out["keep"].sum()),
        len(out),
        ", ".join(f"{n} {r}" for r, n in reason_kinds(out).items()) or "no rejects",
    )
    return out


def _closer_to_train(
    train_distance: np.ndarray, features: np.ndarray, heldout_train_distance: np.ndarray, heldout_features: np.ndarray
) -> tuple[np.ndarray, float]:
    """Per image (its nearest-training distance and unit features), whether it is nearer a training
    patch than any patch of one half of the held-out real patches (the odd ones), and the same share
    for the other half (the even ones): what a real image that was never trained on scores, the
    reference the synthetic share reads against."""
    half = heldout_features[1::2]
    synthetic = train_distance < (1 - features @ half.T).min(axis=1)
    real = heldout_train_distance[0::2] < (1 - heldout_features[0::2] @ half.T).min(axis=1)
    return synthetic, float(real.mean()) if len(real) else np.nan


def _painted_regions(manifest: pd.DataFrame, classes: Sequence[str]) -> np.ndarray | None:
    """Bool (N, H, W) painted regions of an inpainted set (its target class in each mask), None for
    a set that was not inpainted."""
    if "donor_patch_id" not in manifest or manifest["donor_patch_id"].isna().all():
        return None
    values = [list(classes).index(name) + 1 if name in classes else 0 for name in manifest["target_class"]]
    return np.stack([read_mask(path) == value for path, value in zip(manifest["mask"], values, strict=True)])


def _reason(row: Mapping, s: Mapping) -> str:
    """Why an image is rejected ('' when it is kept): one message per failed check, each starting
    with its REASON_KINDS kind and naming the threshold that removed it."""
    reasons = []
    if row["consistency"] < s["min_consistency"]:
        reasons.append(f"consistency {row['consistency']:.2f} < curation.min_consistency {s['min_consistency']}")
    if row["nuclei_consistency"] < s["min_nuclei_consistency"]:
        reasons.append(
            f"nuclei consistency {row['nuclei_consistency']:.2f} < curation.min_nuclei_consistency "
            f"{s['min_nuclei_consistency']}"
        )
    if s["max_synthetic_probability"] is not None and row["p_synthetic"] > s["max_synthetic_probability"]:
        reasons.append(
            f"realism: p(synthetic) {row['p_synthetic']:.2f} > curation.max_synthetic_probability "
            f"{s['max_synthetic_probability']} (out of fold, rule realism)"
        )
    if row["copy"]:
        reasons.append(
            f"copy of {row['nearest_patch']}: similarity {row['similarity']:.3f} (copy above "
            f"{row['similarity_threshold']:.3f}), relative distance {row['relative_distance']:.3f} (copy below "
            f"{row['relative_threshold']:.3f}) by the {row['calibration']} thresholds at curation.copy_quantile "
            f"{s['copy_quantile']} of held-out real"
        )
    return "; ".join(reasons)


def reason_kinds(curated: pd.DataFrame) -> dict[str, int]:
    """Images rejected for each REASON_KINDS kind; an image may count under several."""
    kinds = dict.fromkeys(REASON_KINDS, 0)
    for reason in curated["reason"]:
        for kind in {
            next(k for k in REASON_KINDS if part.startswith(k)) for part in (reason.split("; ") if reason else [])
        }:
            kinds[kind] += 1
    return {k: v for k, v in kinds.items() if v}


def reject_summary(curated: pd.DataFrame) -> str:
    """'40 of 48 kept; rejected: 5 consistency, 3 copy' for log lines and shortfall errors."""
    kinds = reason_kinds(curated[~curated["keep"].astype(bool)])
    rejected = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return f"{int(curated['keep'].sum())} of {len(curated)} kept" + (f"; rejected: {rejected}" if rejected else "")


def _descriptor(settings: Mapping, device: str) -> FeatureExtractor | None:
    """The configured copy-detection descriptor (curation.descriptor), None when not configured."""
    from histosynth.nets import FeatureError, timm_encoder

    if not settings["descriptor"]:
        return None
    try:
        return timm_encoder(settings["descriptor"], settings["descriptor_weights"], device)
    except FeatureError as err:
        raise FeatureError(f"curation.descriptor / curation.descriptor_weights: {err}") from err


def curate_stage(
    manifest: str | Path,
    scores: str | Path,
    indexes: Sequence[str | Path],
    *,
    mode: str,
    curated_out: str | Path,
    audit_out: str | Path,
    pairs_out: str | Path,
    config: Mapping,
    segmentation_model: str | Path | None = None,
    realism: str | Path | None = None,
) -> pd.DataFrame:
    """Entry of rule curate_synthetic: one synthetic set's manifest against the real training
    (split train) and held-out (split val) patches of `indexes` (labelled as config['labels'] says),
    with the set's per-image consistency `scores` (rule mask_consistency) and the quality stage's
    feature space, and the per-image `realism` table (rule realism) when given. Writes the curated table (paths relative to its folder), the audit rows and the
    montage of flagged and closest pairs."""
    from histosynth.data.io import FILE_COLUMNS, read_file_table, read_patch_index, write_relative, write_table
    from histosynth.data.labels import patch_labels, run_labels
    from histosynth.evaluation.features import SEGMENTATION, configured_extractor
    from histosynth.evaluation.memorisation import audit, write_montage

    s, q = config["curation"], config["quality"]
    table = read_file_table(manifest)
    per_image = pd.read_parquet(scores)
    per_image = per_image[per_image["set"] == mode]
    real = pd.concat([read_patch_index(p) for p in indexes], ignore_index=True)
    real["class"] = patch_labels(real, run_labels(config))
    segmenter = None
    if segmentation_model is not None and q["extractor"] == SEGMENTATION:
        from histosynth.evaluation.segmentation import load_model

        segmenter = load_model(segmentation_model, q["device"])
    extractor, why = configured_extractor(q, segmenter)
    if extractor is None:
        log.warning("copy candidates come from grey correlation only, and closer_to_train is not measured: %s", why)
    descriptor = _descriptor(s, q["device"])
    reference = load_reference(
        real[real["split"] == "train"], real[real["split"] == "val"], extractor, q["batch_size"], descriptor
    )
    if s["max_synthetic_probability"] is not None and realism is None:
        raise ValueError(
            "curation.max_synthetic_probability needs each image's p_synthetic from rule realism "
            "(realism.enabled: true)"
        )
    realistic = None
    if realism is not None:
        realistic = pd.read_parquet(realism)
        realistic = realistic[realistic["kind"] == "synthetic"]
    curated = curate(
        table,
        per_image,
        reference,
        config["classes"],
        settings=s,
        extractor=extractor,
        batch_size=q["batch_size"],
        descriptor=descriptor,
        realism=realistic,
    )
    log.info("%s: %s", mode, reject_summary(curated) if len(curated) else "empty set")
    write_relative(curated, curated_out, [c for c in FILE_COLUMNS if c in curated])
    write_table(audit(curated, len(reference.train), mode), audit_out)
    write_montage(curated, reference, pairs_out)
    return curated
