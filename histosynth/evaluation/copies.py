"""The copy test: is an image a copy of one real training patch, judged on the image itself.

A class-level feature space (the task segmenter's encoder) maps every patch of a uniform class to
nearly one point, so a nearest-neighbour distance there flags class membership, not copying. Here
the feature space and a coarse grey correlation (whole and tile by tile, blurred against small
shifts) only pick candidates, the `candidates` nearest training patches in each; the decision
rests on two measures of the image against those candidates:

- similarity: the image is aligned with each candidate, in grey values at up to COMPARE_SIDE px a
  side (a 64 px patch at full resolution), by the best normalised cross-correlation (NCC) over its
  8 flips/rotations and every shift of up to `max_shift` px (its centre matched as a template
  inside the patch); at that alignment, the median NCC over a TILES x TILES grid of tiles, each
  standardised on its own, so a copy recompressed, recoloured or with a part repainted still
  scores high where most of it matches. The nearest patch is the most similar one.
- relative distance (Carlini et al. 2023): the distance to the nearest patch over the distance to
  the `relative_rank`-th nearest, d = sqrt(1 - similarity): a copy is much nearer its source than
  any other patch, while distinct images of a textureless or uniform class are all about equally
  far from everything.

Where a copy-detection descriptor is configured (a timm model, e.g. SSCD or a self-supervised
encoder, with a local weights file), its cosine similarity (best of the 8 views) replaces the
pixel measure, as in Somepalli et al. (2023). Inpainted images are compared inside their painted
region only, in place. Thresholds are calibrated on held-out real patches, which are not copies by
definition: per class where it has enough of them (see `calibrate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from histosynth.nets import dihedral

COMPARE_SIDE = 128  # the pixel measure compares grey images at most this many px a side
CANDIDATE_SIDE = 16  # the cheap candidate search correlates blurred grey images at most this many px a side
TILES = 4  # local similarity: the median NCC over a TILES x TILES grid of tiles
POOLED = "pooled"  # the calibration of classes with too few held-out patches
MIN_REGION = 64  # painted regions of fewer pixels are not compared: a correlation over a few pixels is chance
_CHUNK_PIXELS = 2**24  # pairs x 8 views x pixels whose spectra are held at once (memory, not results)


# The op (histosynth.nets.dihedral) of each view, in the order the curated tables' nearest_view
# records: view 2k is k quarter turns, view 2k + 1 that turn mirrored left-right.
VIEW_OPS = (0, 4, 1, 7, 2, 6, 3, 5)


def eight_views(images: np.ndarray) -> np.ndarray:
    """(8, N, ...) the 8 flips/rotations of (N, H, W, ...) square images; view 0 is the image itself."""
    return np.stack([dihedral(images, [op] * len(images), axes=(1, 2)) for op in VIEW_OPS])


def shrink(values: np.ndarray, side: int) -> np.ndarray:
    """(N, h, w) float32 values of (N, H, W) ones, box-downsampled by the smallest integer factor
    that brings them to at most `side` px a side."""
    values = values.astype(np.float32)
    n, h, w = values.shape
    factor = -(-max(h, w) // side)
    return (
        values[:, : h - h % factor, : w - w % factor].reshape(n, h // factor, factor, w // factor, factor).mean((2, 4))
    )


def grey(images: np.ndarray, side: int) -> np.ndarray:
    """(N, h, w) float32 grey values of (N, H, W, 3) uint8 images at most `side` px a side (shrink)."""
    return shrink(images.astype(np.float32).mean(axis=-1), side)


def standardised(values: np.ndarray) -> np.ndarray:
    """Rows (flattened) centred and scaled to unit norm, so a dot product is the Pearson
    correlation (0 for flat rows)."""
    flat = values.reshape(len(values), -1).astype(np.float32)
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-6)


def unit(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm."""
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def nearest(
    score: Callable[[slice], np.ndarray], n: int, count: int, exclude: np.ndarray | None = None, block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(n, count) column indices of the `count` highest scores per row, best first, and those scores
    (-inf where left out); `score(rows)` gives a block of rows' (rows, T) scores (computed block by
    block, so N x T is never held); `exclude` (bool (n, T)) marks pairs left out, NaN scores are too."""
    index, best = [], []
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        scores = np.nan_to_num(score(rows).astype(np.float64), nan=-np.inf)
        if exclude is not None:
            scores[exclude[rows]] = -np.inf
        k = min(count, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
        index.append(top)
        best.append(np.take_along_axis(scores, top, 1))
    if not index:
        return np.empty((0, count), int), np.empty((0, count))
    return np.concatenate(index), np.concatenate(best)


def coarse_scores(queries: np.ndarray, train: np.ndarray, shift: int, tiled: bool) -> Callable[[slice], np.ndarray]:
    """Row-block scorer for `nearest`: the best grey correlation over the 8 views at CANDIDATE_SIDE
    px after a blur of shift / 2 px at COMPARE_SIDE (a copy moved by up to `shift` px still scores
    high); tiled: the median of the correlations of TILES x TILES tiles (a copy with a part
    repainted still scores high)."""

    def coarse(images: np.ndarray) -> np.ndarray:
        values = grey(images, COMPARE_SIDE)
        values = shrink(ndimage.gaussian_filter(values, (0, shift / 2, shift / 2)) if shift else values, CANDIDATE_SIDE)
        if not tiled:
            return standardised(values)[None]  # (1, N, D)
        n, side = len(values), values.shape[1] // TILES
        parts = values[:, : side * TILES, : side * TILES].reshape(n, TILES, side, TILES, side).transpose(1, 3, 0, 2, 4)
        return standardised(parts.reshape(-1, side * side)).reshape(TILES * TILES, n, side * side)  # (tiles, N, D)

    views, reference = [coarse(view) for view in eight_views(queries)], coarse(train)

    def score(rows: slice) -> np.ndarray:
        return np.max(
            [np.median(np.matmul(view[:, rows], reference.transpose(0, 2, 1)), axis=0) for view in views], axis=0
        )

    return score


def feature_scores(views: np.ndarray, train: np.ndarray) -> Callable[[slice], np.ndarray]:
    """Row-block scorer for `nearest`: cosine similarity of unit features, the best of the views
    (views (V, N, D), train (T, D))."""
    return lambda rows: (views[:, rows] @ train.T).max(axis=0)


@dataclass(frozen=True)
class Matches:
    """Per query, its compared training patches best first (index -1 / similarity NaN where fewer)
    and the view in which it matched the best one (the dihedral index applied to the query; 0 where
    compared as it is)."""

    index: np.ndarray  # (N, K) training positions
    similarity: np.ndarray  # (N, K)
    view: np.ndarray  # (N,)

    def relative(self, rank: int) -> np.ndarray:
        """Carlini's ratio: distance to the nearest over distance to the rank-th nearest (d = sqrt(1 - s))."""
        d = np.sqrt(np.clip(1 - self.similarity, 0, None))
        kth = d[:, min(rank, d.shape[1]) - 1]
        return np.where(kth > 0, d[:, 0] / np.where(kth > 0, kth, 1), np.nan)


def _window_norms(train: np.ndarray, h: int, w: int) -> np.ndarray:
    """(P, H - h + 1, W - w + 1) the centred norm of every h x w window of each (H, W) grey image."""

    def sums(values):
        c = np.pad(values.astype(np.float64), ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
        return c[:, h:, w:] - c[:, :-h, w:] - c[:, h:, :-w] + c[:, :-h, :-w]

    return np.sqrt(np.clip(sums(train**2) - sums(train) ** 2 / (h * w), 0, None))


def tile_ncc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P,) the median NCC over a TILES x TILES grid of tiles of image pairs a, b (P, S, S), each
    tile standardised on its own."""
    p, size = len(a), a.shape[1]
    t = size // TILES

    def tiles(x: np.ndarray) -> np.ndarray:
        x = x[:, : t * TILES, : t * TILES].reshape(p, TILES, t, TILES, t).transpose(0, 1, 3, 2, 4).reshape(-1, t * t)
        return standardised(x).reshape(p, TILES * TILES, t * t)

    return np.median((tiles(a) * tiles(b)).sum(-1), axis=1)


def aligned_ncc(queries: np.ndarray, train: np.ndarray, pairs: np.ndarray, shift: int) -> tuple[np.ndarray, ...]:
    """For (query, train) index pairs (P, 2) of grey images (same square size): the best NCC of the
    query's centre (shift px margin) over its 8 views and every position inside the training image,
    the local similarity at that alignment (tile_ncc), and the alignment: the view and the (dy, dx)
    offset (shift, shift = as they are)."""
    n_pairs, side = len(pairs), queries.shape[1]
    s = min(shift, (side - 2) // 2)
    size = side - 2 * s
    best, local = np.full(n_pairs, np.nan), np.full(n_pairs, np.nan)
    view, offset = np.zeros(n_pairs, int), np.zeros((n_pairs, 2), int)
    step = max(1, _CHUNK_PIXELS // (8 * side * side))
    for start in range(0, n_pairs, step):
        chunk, done = pairs[start : start + step], slice(start, start + min(step, n_pairs - start))
        unique, which = np.unique(chunk[:, 0], return_inverse=True)
        views = eight_views(queries[unique])[:, :, s : side - s, s : side - s]  # (8, Q, size, size)
        templates = np.conj(fft.rfft2(standardised(views.reshape(-1, size, size)).reshape(views.shape), s=(side, side)))
        target = train[chunk[:, 1]]
        spectrum = templates[:, which] * fft.rfft2(target)[None]
        ncc = (
            fft.irfft2(spectrum, s=(side, side))[..., : 2 * s + 1, : 2 * s + 1]
            / np.maximum(_window_norms(target, size, size), 1e-6)[None]
        )
        flat = ncc.transpose(1, 0, 2, 3).reshape(len(chunk), -1)
        where = flat.argmax(axis=1)
        v, rest = np.divmod(where, (2 * s + 1) ** 2)
        dy, dx = np.divmod(rest, 2 * s + 1)
        windows = np.lib.stride_tricks.sliding_window_view(target, (size, size), axis=(1, 2))[
            np.arange(len(chunk)), dy, dx
        ]
        best[done], local[done] = flat[np.arange(len(chunk)), where], tile_ncc(views[v, which], windows)
        view[done], offset[done] = v, np.stack([dy, dx], 1)
    return np.clip(best, -1, 1), local, view, offset


def pixel_matches(queries: np.ndarray, train: np.ndarray, candidates: np.ndarray, *, shift: int, keep: int) -> Matches:
    """Matches of grey images (N, H, W) among their candidate training images (N, C; -1 = none),
    ranked by the local similarity at the best alignment (aligned_ncc), the best `keep` kept."""
    rows, cols = np.nonzero(candidates >= 0)
    _, local, view, _ = aligned_ncc(queries, train, np.stack([rows, candidates[rows, cols]], 1), shift)
    n, c = candidates.shape
    table, views = np.full((n, c), -np.inf), np.zeros((n, c), int)
    table[rows, cols], views[rows, cols] = local, view
    order = np.argsort(-table, axis=1, kind="stable")[:, :keep]
    similarity = np.take_along_axis(table, order, 1)
    valid = np.isfinite(similarity)
    index = np.where(valid, np.take_along_axis(candidates, order, 1), -1)
    return Matches(index, np.where(valid, similarity, np.nan), views[np.arange(n), order[:, 0]])


def dense_matches(
    score: Callable[[slice], np.ndarray], n: int, keep: int, exclude: np.ndarray | None = None
) -> Matches:
    """Matches of n queries by a row-block scorer over every training patch (a descriptor's cosine,
    a painted region's correlation), the best `keep` kept, compared as they are (view 0)."""
    index, best = nearest(score, n, keep, exclude)
    valid = np.isfinite(best)
    return Matches(np.where(valid, index, -1), np.where(valid, best, np.nan), np.zeros(n, int))


def region_scores(queries: np.ndarray, regions: np.ndarray, train: np.ndarray) -> Callable[[slice], np.ndarray]:
    """Row-block scorer for `nearest`: the grey correlation of each query's pixels inside its region
    (bool (N, H, W)) with the same pixels of every training image, in place (NaN for regions under
    MIN_REGION px)."""
    train_grey = train.astype(np.float32).mean(axis=-1)

    def score(rows: slice) -> np.ndarray:
        out = np.full((len(queries[rows]), len(train)), np.nan)
        for i, (query, region) in enumerate(zip(queries[rows], regions[rows], strict=True)):
            if region.sum() >= MIN_REGION:
                q = standardised(query.astype(np.float32).mean(axis=-1)[region][None])
                out[i] = (standardised(train_grey[:, region]) @ q.T)[:, 0]
        return out

    return score


def thresholds(similarity: np.ndarray, relative: np.ndarray, quantile: float) -> tuple[float, float]:
    """(similarity above which, relative distance below which) an image is a copy, from held-out
    real patches' measures: both at the same tail share p, the largest at which the two together
    flag at most `quantile` of the held-out patches (p between quantile / 2 and quantile)."""

    def cut(p):
        return float(np.nanquantile(similarity, 1 - p)), float(np.nanquantile(relative, p)) if np.isfinite(
            relative
        ).any() else np.nan

    def flagged(p):
        t_sim, t_rel = cut(p)
        return np.mean((similarity > t_sim) | (relative < t_rel))

    low, high = quantile / 2, quantile
    if flagged(high) <= quantile:
        return cut(high)
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if flagged(middle) <= quantile else (low, middle)
    return cut(low)


def calibrate(
    similarity: np.ndarray, relative: np.ndarray, classes: np.ndarray, quantile: float, min_patches: int
) -> dict[str, tuple[float, float]]:
    """{class: (similarity, relative) thresholds} from held-out patches' measures and classes: one
    per named class with at least min_patches held-out patches, and POOLED for the rest."""
    out = {POOLED: thresholds(similarity, relative, quantile)}
    for name in np.unique(classes):
        own = classes == name
        if name and own.sum() >= min_patches:
            out[str(name)] = thresholds(similarity[own], relative[own], quantile)
    return out


def decide(
    similarity: np.ndarray, relative: np.ndarray, classes: np.ndarray, calibration: Mapping[str, tuple[float, float]]
) -> dict[str, np.ndarray]:
    """Per image: the calibration it is judged by (its class's, else POOLED), both thresholds, and
    `copy` (similarity above its threshold or relative distance below its threshold)."""
    used = np.array([str(c) if str(c) in calibration else POOLED for c in classes], dtype=object)
    t_sim = np.array([calibration[c][0] for c in used], float)
    t_rel = np.array([calibration[c][1] for c in used], float)
    return {
        "calibration": used,
        "similarity_threshold": t_sim,
        "relative_threshold": t_rel,
        "copy": (similarity > t_sim) | (relative < t_rel),
    }


@dataclass(frozen=True)
class Space:
    """Unit features in one space: the training patches' (T, D), and the 8 views' of the judged
    images (8, N, D) and of the held-out patches (8, H, D) (view 0: the image itself)."""

    train: np.ndarray
    images: np.ndarray
    heldout: np.ndarray


def find_copies(
    images: np.ndarray,
    train: np.ndarray,
    heldout: np.ndarray,
    *,
    classes: np.ndarray,
    heldout_classes: np.ndarray,
    settings: Mapping,
    features: Space | None = None,
    descriptor: Space | None = None,
    sources: np.ndarray | None = None,
    regions: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The copy test of (N, H, W, 3) uint8 images against training patches, calibrated on held-out
    ones (class names per image and per held-out patch; `settings`: the curation config section).
    Candidates come from `features` (when given) and a coarse grey correlation; a `descriptor`
    space replaces the pixel measure; `sources` (training position per image, -1 = none) is each
    image's own source, left out of its search and measured alone; `regions` (bool (N, H, W)):
    an inpainted set, compared inside the painted regions (held-out patches in them in turn).
    Returns per image: matches (Matches), similarity and relative_distance (the two judged
    measures), source_similarity, and decide's calibration, thresholds and copy."""
    keep, rank = max(2, settings["relative_rank"]), settings["relative_rank"]
    exclude = None if sources is None else sources[:, None] == np.arange(len(train))[None]
    source_similarity = np.full(len(images), np.nan)
    if regions is not None:
        turns = regions[np.arange(len(heldout)) % len(regions)]
        found = dense_matches(region_scores(images, regions, train), len(images), keep)
        reference = dense_matches(region_scores(heldout, turns, train), len(heldout), keep)
    elif descriptor is not None:
        found = dense_matches(feature_scores(descriptor.images, descriptor.train), len(images), keep, exclude)
        reference = dense_matches(feature_scores(descriptor.heldout, descriptor.train), len(heldout), keep)
        if sources is not None:
            own = sources >= 0
            source_similarity[own] = (descriptor.images[:, own] * descriptor.train[sources[own]][None]).sum(-1).max(0)
    else:

        def matches(queries: np.ndarray, space: np.ndarray | None, leave_out: np.ndarray | None) -> Matches:
            count, block = settings["candidates"], max(1, 2**20 // len(train))
            scorers = [coarse_scores(queries, train, shift, tiled) for tiled in (False, True)]
            if space is not None:
                scorers.append(feature_scores(space, features.train))
            found = [nearest(score, len(queries), count, leave_out, block) for score in scorers]
            both = np.sort(np.concatenate([np.where(np.isfinite(score), index, -1) for index, score in found], 1), 1)
            both[:, 1:][both[:, 1:] == both[:, :-1]] = -1  # each candidate once
            return pixel_matches(grey(queries, COMPARE_SIDE), train_grey, both, shift=shift, keep=keep)

        shift, train_grey = settings["max_shift"], grey(train, COMPARE_SIDE)
        found = matches(images, None if features is None else features.images, exclude)
        reference = matches(heldout, None if features is None else features.heldout, None)
        if sources is not None and (sources >= 0).any():
            own = np.nonzero(sources >= 0)[0]
            source_similarity[own] = aligned_ncc(
                grey(images, COMPARE_SIDE), train_grey, np.stack([own, sources[own]], 1), shift
            )[1]
    judged, relative = found.similarity[:, 0], found.relative(rank)
    calibration = calibrate(
        reference.similarity[:, 0],
        reference.relative(rank),
        heldout_classes,
        settings["copy_quantile"],
        settings["min_class_patches"],
    )
    return {
        "matches": found,
        "similarity": judged,
        "relative_distance": relative,
        "source_similarity": source_similarity,
        **decide(judged, relative, classes, calibration),
    }
