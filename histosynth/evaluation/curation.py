"""Curation of a synthetic set: keep the images that agree with their own mask and copy no
training patch; score the rest with the reason they were rejected.

Consistency: an image's region Dice (its mask against what the real-only segmentation model
finds, pooled over the region classes; histosynth.evaluation.consistency) and its nuclei Dice,
both from the image-quality stage's per-image scores. An image whose mask and prediction are both
empty has nothing to disagree with and keeps Dice NaN (kept).

Copies: each image's nearest real training patch in two measures, each calibrated on held-out real
patches (the validation slides), which are by definition not copies:
- feature distance: cosine distance in the offline feature space of the quality stage (the
  real-only segmentation encoder, or a local timm model), the minimum over the 8 flips/rotations
  of the image; a copy is closer than the copy_quantile / 2 quantile of the held-out patches'
  nearest-training distances;
- pixel correlation: the Pearson correlation of grey values (at most PIXEL_SIDE px a side), the
  maximum over the 8 flips/rotations; a copy correlates more than the 1 - copy_quantile / 2
  quantile of the held-out patches' maxima (so the two measures together flag about copy_quantile
  of real held-out patches; a measure used alone takes the whole copy_quantile).
A synthetic image is drawn from a training patch's conditioning map, so it follows that source
patch's layout (regions and nuclei) by design: its own source is left out of its nearest-neighbour
search (the pixel correlation with it is kept as `source_correlation`, not judged). An inpainted
image is real outside its painted region by design, so only the painted region is
compared (pixel correlation of the region's pixels with the same pixels of every training patch;
held-out patches are measured in the regions of the set's images, in turn); its feature distance
is not used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.data.io import read_mask, read_rgb
from histosynth.evaluation.features import FeatureExtractor, pixel_features

log = logging.getLogger(__name__)

PIXEL_SIDE = 32  # grey images are box-downsampled to at most this side for the whole-image correlation
COLUMNS = ("consistency", "nuclei_consistency", "nearest_patch", "feature_distance", "feature_threshold",
           "nearest_patch_pixels", "pixel_correlation", "pixel_threshold", "source_correlation", "closer_to_train",
           "closer_to_train_real", "copy", "copy_of", "keep", "reason")
MONTAGE_PAIRS = 8  # closest synthetic-training pairs drawn per set


def dihedral(images: np.ndarray) -> np.ndarray:
    """(8, N, ...) the 8 flips/rotations of (N, H, W, ...) square images."""
    views = []
    for k in range(4):
        rotated = np.rot90(images, k, axes=(1, 2))
        views += [rotated, rotated[:, :, ::-1]]
    return np.stack(views)


def grey(images: np.ndarray) -> np.ndarray:
    """(N, h, w) float grey values of (N, H, W, 3) uint8 images, box-downsampled to at most PIXEL_SIDE a side."""
    values = images.astype(np.float32).mean(axis=-1)
    factor = max(1, values.shape[1] // PIXEL_SIDE)
    n, h, w = values.shape
    return values[:, :h - h % factor, :w - w % factor].reshape(n, h // factor, factor, w // factor, factor).mean((2, 4))


def _standardised(values: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm, so a dot product is the Pearson correlation (0 for flat rows)."""
    flat = values.reshape(len(values), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def pixel_correlations(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(N, T) the highest pixel correlation of each query image (N, H, W, 3) with each training
    image over the query's 8 flips/rotations."""
    reference = _standardised(grey(train))
    return np.stack([_standardised(grey(view)) @ reference.T for view in dihedral(queries)]).max(axis=0)


def region_correlation(queries: np.ndarray, regions: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the highest correlation of its grey pixels inside its region (bool (N, H, W)) with
    the same pixels of any training image, and that image's position (NaN, -1 for an empty region)."""
    train_grey = train.astype(np.float32).mean(axis=-1)
    best, where = np.full(len(queries), np.nan), np.full(len(queries), -1)
    for i, (query, region) in enumerate(zip(queries, regions, strict=True)):
        if region.sum() < 2:
            continue
        q = _standardised(query.astype(np.float32).mean(axis=-1)[region][None])
        scores = (_standardised(train_grey[:, region]) @ q.T)[:, 0]
        best[i], where[i] = scores.max(), scores.argmax()
    return best, where


def _embed(images: np.ndarray, extractor: FeatureExtractor, batch_size: int) -> np.ndarray:
    """Unit-normalised features of (N, H, W, 3) uint8 images."""
    chunks = [pixel_features(images[s:s + batch_size], extractor) for s in range(0, len(images), batch_size)]
    features = np.concatenate(chunks) if chunks else np.empty((0, 1))
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def view_features(images: np.ndarray, extractor: FeatureExtractor, batch_size: int) -> np.ndarray:
    """(8, N, D) unit-normalised features of the 8 flips/rotations of (N, H, W, 3) images; view 0
    is the image itself."""
    return np.stack([_embed(view, extractor, batch_size) for view in dihedral(images)])


def feature_distances(views: np.ndarray, train_features: np.ndarray) -> np.ndarray:
    """(N, T) the smallest cosine distance of each image's views (view_features) to each training
    feature (unit-normalised rows)."""
    return (1 - views @ train_features.T).min(axis=0)


def _own_source(manifest: pd.DataFrame, ids: np.ndarray) -> np.ndarray:
    """Bool (N, T): each synthetic image's own source patch, which it follows by design (same
    map): left out of its nearest-neighbour search, measured on its own as source_correlation."""
    sources = manifest["source_patch_id"].astype(str).to_numpy() if "source_patch_id" in manifest else np.full(len(manifest), None)
    return sources[:, None] == ids[None, :]


def image_consistency(scores: pd.DataFrame) -> pd.DataFrame:
    """Per image id: `consistency`, the region Dice pooled over the region classes, and
    `nuclei_consistency`, the nuclei-foreground Dice, from per-image consistency scores
    (histosynth.evaluation.consistency.SCORE_COLUMNS); NaN where mask and prediction are empty."""
    def pooled(part: pd.DataFrame) -> float:
        inter, truth, pred = (part[c].sum() for c in ("intersection", "truth_pixels", "predicted_pixels"))
        return 2 * inter / (truth + pred) if truth + pred else np.nan

    regions = scores[scores["kind"] == "region"].groupby("id").apply(pooled, include_groups=False).rename("consistency")
    nuclei = scores[(scores["kind"] == "nuclei") & (scores["class"] == "nuclei")].set_index("id")["dice"].rename("nuclei_consistency")
    return pd.concat([regions, nuclei], axis=1)


@dataclass(frozen=True)
class Reference:
    """The real patches a set is checked against: training rows and held-out (validation) rows,
    their pixels, and the training features when a feature space is available."""

    train: pd.DataFrame
    train_pixels: np.ndarray
    heldout_pixels: np.ndarray
    train_features: np.ndarray | None


def load_reference(train: pd.DataFrame, heldout: pd.DataFrame, extractor: FeatureExtractor | None,
                   batch_size: int) -> Reference:
    """Read the real patches (absolute image paths) and embed the training ones."""
    if train.empty or heldout.empty:
        raise ValueError(f"curation needs real training and held-out (val) patches; got {len(train)} and {len(heldout)}")
    train_pixels = np.stack([read_rgb(p) for p in train["image"]])
    heldout_pixels = np.stack([read_rgb(p) for p in heldout["image"]])
    features = _embed(train_pixels, extractor, batch_size) if extractor is not None else None
    return Reference(train.reset_index(drop=True), train_pixels, heldout_pixels, features)


def curate(manifest: pd.DataFrame, scores: pd.DataFrame, reference: Reference, classes: Sequence[str], *,
           settings: Mapping, extractor: FeatureExtractor | None, batch_size: int) -> pd.DataFrame:
    """The manifest (absolute paths) with COLUMNS added: consistency scores, the nearest training
    patch in each measure with its distance and the held-out threshold, `copy`, `keep` and the
    reason of each reject. `settings` is the `curation` config section; with enabled false every
    image is kept (still scored)."""
    s = settings
    out = manifest.reset_index(drop=True).copy()
    if out.empty:
        return out.assign(**{c: pd.Series(dtype=object) for c in COLUMNS})
    out = out.join(image_consistency(scores), on="id") if len(scores) else out.assign(consistency=np.nan, nuclei_consistency=np.nan)
    pixels = np.stack([read_rgb(p) for p in out["image"]])
    ids = reference.train["patch_id"].astype(str).to_numpy()
    painted = _painted_regions(out, classes)
    measures = 2 if painted is None and extractor is not None else 1
    q = float(s["copy_quantile"]) / measures  # each measure's share, so together they flag about copy_quantile
    if painted is None:
        own = _own_source(out, ids)
        if extractor is not None:
            views = view_features(pixels, extractor, batch_size)
            heldout_views = view_features(reference.heldout_pixels, extractor, batch_size)
            distances = feature_distances(views, reference.train_features)
            heldout = feature_distances(heldout_views, reference.train_features).min(axis=1)
            distances[own] = np.inf
            out["feature_threshold"] = float(np.quantile(heldout, q))
            out["feature_distance"], out["nearest_patch"] = distances.min(axis=1), ids[distances.argmin(axis=1)]
            closer, real_share = _closer_to_train(out["feature_distance"].to_numpy(), views[0], heldout, heldout_views[0])
            out["closer_to_train"], out["closer_to_train_real"] = closer, real_share
        similarity = pixel_correlations(pixels, reference.train_pixels)
        out["source_correlation"] = np.where(own.any(axis=1), np.where(own, similarity, -np.inf).max(axis=1), np.nan)
        similarity[own] = -np.inf
        correlation, nearest_pix = similarity.max(axis=1), similarity.argmax(axis=1)
        heldout_corr = pixel_correlations(reference.heldout_pixels, reference.train_pixels).max(axis=1)
    else:
        correlation, nearest_pix = region_correlation(pixels, painted, reference.train_pixels)
        turns = painted[np.arange(len(reference.heldout_pixels)) % len(painted)]
        heldout_corr, _ = region_correlation(reference.heldout_pixels, turns, reference.train_pixels)
    out["pixel_correlation"] = correlation
    out["nearest_patch_pixels"] = np.where(nearest_pix >= 0, ids[np.maximum(nearest_pix, 0)], None)
    out["pixel_threshold"] = float(np.nanquantile(heldout_corr, 1 - q))
    out = out.reindex(columns=[*manifest.columns, *[c for c in COLUMNS if c not in manifest.columns]])
    by_feature = out["feature_distance"].astype(float) < out["feature_threshold"].astype(float)
    by_pixels = out["pixel_correlation"].astype(float) > out["pixel_threshold"].astype(float)
    out["copy"] = by_feature | by_pixels
    out["copy_of"] = np.where(by_feature, out["nearest_patch"], np.where(by_pixels, out["nearest_patch_pixels"], None))
    out["reason"] = [_reason(row, s) for row in out.to_dict("records")]
    out["keep"] = out["reason"].eq("") | (not s["enabled"])
    log.info("%d of %d images kept (%s)", int(out["keep"].sum()), len(out),
             ", ".join(f"{n} {r}" for r, n in _reason_kinds(out).items()) or "no rejects")
    return out


def _closer_to_train(train_distance: np.ndarray, features: np.ndarray, heldout_train_distance: np.ndarray,
                     heldout_features: np.ndarray) -> tuple[np.ndarray, float]:
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
    """Why an image is rejected ('' when it is kept), naming the threshold that removed it."""
    reasons = []
    if row["consistency"] < s["min_consistency"]:
        reasons.append(f"consistency {row['consistency']:.2f} < curation.min_consistency {s['min_consistency']}")
    if row["nuclei_consistency"] < s["min_nuclei_consistency"]:
        reasons.append(f"nuclei consistency {row['nuclei_consistency']:.2f} < curation.min_nuclei_consistency "
                       f"{s['min_nuclei_consistency']}")
    if row["feature_distance"] < row["feature_threshold"]:
        reasons.append(f"copy of {row['nearest_patch']}: feature distance {row['feature_distance']:.4f} < "
                       f"{row['feature_threshold']:.4f} (curation.copy_quantile of held-out real)")
    if row["pixel_correlation"] > row["pixel_threshold"]:
        reasons.append(f"copy of {row['nearest_patch_pixels']}: pixel correlation {row['pixel_correlation']:.3f} > "
                       f"{row['pixel_threshold']:.3f} (1 - curation.copy_quantile of held-out real)")
    return "; ".join(reasons)


def _reason_kinds(curated: pd.DataFrame) -> dict[str, int]:
    """Images rejected for each kind of reason (consistency, nuclei consistency, copy); an image may count under several."""
    kinds = {"consistency": 0, "nuclei consistency": 0, "copy": 0}
    for reason in curated["reason"]:
        parts = reason.split("; ") if reason else []
        for kind in {"copy" if p.startswith("copy") else "nuclei consistency" if p.startswith("nuclei") else "consistency"
                     for p in parts}:
            kinds[kind] += 1
    return {k: v for k, v in kinds.items() if v}


def audit(curated: pd.DataFrame, n_train: int) -> dict:
    """The memorisation audit of one curated set: copy rate, share of training patches copied at
    least once, share of images closer to a training patch than to any held-out real patch with the
    same share for held-out real patches beside it (NaN without a feature space), and the reject
    counts per reason."""
    closer = curated["closer_to_train"].dropna().astype(bool)
    real = curated["closer_to_train_real"].dropna()
    return {"images": len(curated), "kept": int(curated["keep"].sum()),
            "copy_rate": float(curated["copy"].astype(bool).mean()) if len(curated) else np.nan,
            "train_copied_share": curated["copy_of"].dropna().nunique() / n_train if n_train else np.nan,
            "closer_to_train_share": float(closer.mean()) if len(closer) else np.nan,
            "closer_to_train_share_real": float(real.iloc[0]) if len(real) else np.nan,
            **{f"rejected_{k.replace(' ', '_')}": v for k, v in _reason_kinds(curated).items()}}


def closest_pairs(curated: pd.DataFrame, reference: Reference, n: int = MONTAGE_PAIRS) -> np.ndarray:
    """A montage (uint8 RGB) of the n synthetic images most like a training patch (highest pixel
    correlation) beside that patch: one pair per row, synthetic left, in the flip/rotation that
    matched (inpainted images as they are: compared in place); copies framed red."""
    rows = curated.dropna(subset=["pixel_correlation"]).sort_values("pixel_correlation", ascending=False).head(n)
    index = {pid: i for i, pid in enumerate(reference.train["patch_id"].astype(str))}
    strips = []
    for row in rows.to_dict("records"):
        image, match = read_rgb(row["image"]), reference.train_pixels[index[row["nearest_patch_pixels"]]]
        if pd.isna(row.get("donor_patch_id")):
            views = dihedral(image[None])[:, 0]
            image = views[int(np.argmax(_standardised(grey(views)) @ _standardised(grey(match[None]))[0]))]
        pair = np.concatenate([image, match], 1)
        strip = np.empty((pair.shape[0] + 6, pair.shape[1] + 6, 3), np.uint8)
        strip[:] = (220, 30, 30) if row["copy"] else (255, 255, 255)
        strip[3:-3, 3:-3] = pair
        strips.append(strip)
    return np.concatenate(strips, 0) if strips else np.full((8, 16, 3), 255, np.uint8)


def reject_summary(curated: pd.DataFrame) -> str:
    """'40 of 48 kept; rejected: 5 consistency, 3 copy' for log lines and shortfall errors."""
    kinds = _reason_kinds(curated[~curated["keep"].astype(bool)])
    rejected = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return f"{int(curated['keep'].sum())} of {len(curated)} kept" + (f"; rejected: {rejected}" if rejected else "")


def curate_stage(manifest: str | Path, scores: str | Path, indexes: Sequence[str | Path], *, mode: str,
                 curated_out: str | Path, audit_out: str | Path, pairs_out: str | Path, config: Mapping,
                 segmentation_model: str | Path | None = None) -> pd.DataFrame:
    """Entry of rule curate_synthetic: one synthetic set's manifest against the real training
    (split train) and held-out (split val) patches of `indexes`, with the set's per-image
    consistency `scores` (rule image_quality) and the quality stage's feature space. Writes the
    curated table (paths relative to its folder), the audit row and the closest-pairs montage."""
    from PIL import Image

    from histosynth.data.io import FILE_COLUMNS, atomic_file, read_file_table, read_patch_index, write_relative, write_table
    from histosynth.evaluation.features import SEGMENTATION, configured_extractor

    s, q = config["curation"], config["quality"]
    table = read_file_table(manifest)
    per_image = pd.read_parquet(scores)
    per_image = per_image[per_image["set"] == mode]
    real = pd.concat([read_patch_index(p) for p in indexes], ignore_index=True)
    segmenter = None
    if segmentation_model is not None and q["extractor"] == SEGMENTATION:
        from histosynth.evaluation.segmentation import load_model

        segmenter = load_model(segmentation_model, q["device"])
    extractor, why = configured_extractor(q, segmenter)
    if extractor is None:
        log.warning("copies are looked for in pixel correlation only: %s", why)
    reference = load_reference(real[real["split"] == "train"], real[real["split"] == "val"], extractor, q["batch_size"])
    curated = curate(table, per_image, reference, config["classes"], settings=s, extractor=extractor, batch_size=q["batch_size"])
    log.info("%s: %s", mode, reject_summary(curated) if len(curated) else "empty set")
    write_relative(curated, curated_out, [c for c in FILE_COLUMNS if c in curated])
    write_table(pd.DataFrame([{"set": mode, **audit(curated, len(reference.train))}]), audit_out)
    with atomic_file(pairs_out) as tmp:
        Image.fromarray(closest_pairs(curated, reference)).save(tmp, format="PNG")
    return curated
