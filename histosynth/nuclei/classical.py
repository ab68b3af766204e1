"""The classical nuclei detector: colour deconvolution, an Otsu threshold of hematoxylin, a
watershed split seeded at nucleus centres, and morphology heuristics for the class of each
nucleus."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image, h_maxima, remove_small_holes
from skimage.segmentation import relabel_sequential, watershed

from histosynth.nuclei.instances import empty_table, mean_per_instance, renumber, shape_table

log = logging.getLogger(__name__)


def detect_nuclei(rgb: np.ndarray, mpp: float, params: Mapping) -> tuple[np.ndarray, pd.DataFrame]:
    """Classical nuclei detection on an RGB uint8 image at `mpp`: uint16 instances (0 = none,
    1..N) and a table (TABLE_COLUMNS, pixel units of the image).

    Hematoxylin optical density (skimage rgb2hed) smoothed by smoothing_um is thresholded at its
    Otsu level (floored at min_hematoxylin) and holes up to max_hole_um2 are filled. A connected
    object larger than max_area_um2 that covers less than cluster_max_solidity of its convex hull
    (its unfilled gaps counted as uncovered) is a packed cluster the image's threshold merged: it
    is thresholded again at its own Otsu level (darker nuclei against the paler gaps between
    them), up to refine_rounds times; a convex, gapless one is a single dark object and is
    dropped. Touching
    nuclei are split by a watershed of the distance map seeded at nucleus centres: local maxima,
    at least marker_spacing_um apart, of the scale-normalised Laplacian-of-Gaussian blob response
    (the strongest over the blob_sigma_um scales: dark round spots of a nucleus' size) plus
    marker_distance_weight times the distance to background in microns, so a clump of nuclei
    with no background between them still gets one seed per nucleus; neighbouring pieces whose
    shared border is no neck (at least merge_neck_ratio as wide as the narrower piece: the two
    ends of one spindle-shaped nucleus) are merged again. Objects outside
    [min_area_um2, max_area_um2] or less solid than min_solidity are dropped. Red blood cells,
    which carry no hematoxylin, are found on red pixels (smoothed (R - B) / 255 of at least
    blood_min_redness), split by h-maxima (marker_h_um) of their distance map, with their own
    area limits.

    Classes come from a morphology heuristic, not a trained classifier: red cells are `blood`;
    nuclei no larger than immune_max_area_um2 and no more eccentric than immune_max_eccentricity
    are `immune` (lymphocytes are small and round); nuclei at least stromal_min_eccentricity
    eccentric are `stromal` (spindle-shaped); the rest `other`. `score` is 1.0 (the
    heuristic has no confidence); `hematoxylin` is the mean hematoxylin optical density.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], np.uint16), empty_table()
    hematoxylin = rgb2hed(rgb)[..., 0].astype(np.float32)
    smooth = ndi.gaussian_filter(hematoxylin, params["smoothing_um"] / mpp)
    # Otsu ignores the darkest 0.5%: black debris or ink (optical density above 1) would squeeze
    # every nucleus into the histogram's first bins.
    clipped = np.minimum(smooth, np.quantile(smooth, 0.995))
    threshold = params["min_hematoxylin"]
    if np.ptp(clipped) > 0:
        threshold = max(threshold, float(threshold_otsu(clipped)))
    dark = smooth > threshold
    nuclear = _fill_holes(dark, mpp, params)
    redness = (rgb[..., 0].astype(np.float32) - rgb[..., 2]) / 255
    red = (ndi.gaussian_filter(redness, params["smoothing_um"] / mpp) >= params["blood_min_redness"]) & ~nuclear
    red = _fill_holes(red, mpp, params)

    nuclei = _split_nuclei(nuclear, dark, smooth, hematoxylin, mpp, params)
    blood = _split(
        red,
        _distance_markers(red, mpp, params["marker_h_um"]),
        mpp,
        params["blood_min_area_um2"],
        params["blood_max_area_um2"],
    )
    n_nuclei = int(nuclei.max())
    # Nuclei keep ids 1..n_nuclei (they win pixels both claim); red cells follow.
    instances = np.where(nuclei > 0, nuclei, np.where(blood > 0, blood + n_nuclei, 0))
    table = shape_table(instances)
    table = table[table["solidity"] >= params["min_solidity"]]
    if table.empty:
        return np.zeros(instances.shape, np.uint16), empty_table()
    table = table.assign(score=1.0, hematoxylin=mean_per_instance(instances, hematoxylin, table["instance_id"]))
    table = table.assign(
        **{"class": _heuristic_classes(table, table["instance_id"].to_numpy() > n_nuclei, mpp, params)}
    )
    return renumber(instances, table)


def _split_nuclei(
    nuclear: np.ndarray, dark: np.ndarray, smooth: np.ndarray, hematoxylin: np.ndarray, mpp: float, params: Mapping
) -> np.ndarray:
    """Nuclei instances of the nuclear mask: clusters re-thresholded, then split (detect_nuclei)."""
    for _ in range(params["refine_rounds"]):
        objects, _ = ndi.label(nuclear)
        area_um2 = np.bincount(objects.ravel()) * mpp * mpp
        refined = nuclear.copy()
        for obj, sl in enumerate(ndi.find_objects(objects), start=1):
            if sl is None or area_um2[obj] <= params["max_area_um2"]:
                continue
            inside = objects[sl] == obj
            if (inside & dark[sl]).sum() >= params["cluster_max_solidity"] * convex_hull_image(inside).sum():
                continue  # convex and without gaps: one large dark object, not nuclei packed together
            values = smooth[sl][inside]
            if np.ptp(values) > 0:
                refined[sl] &= ~inside | (smooth[sl] > threshold_otsu(values))
        if np.array_equal(refined, nuclear):
            break
        dark = dark & refined
        nuclear = _fill_holes(refined, mpp, params)
    distance = ndi.distance_transform_edt(nuclear)
    labels = watershed(-distance, _centre_markers(hematoxylin, nuclear, mpp, params), mask=nuclear)
    labels = _merge_without_neck(labels, distance, params["merge_neck_ratio"])
    return _sized(labels, mpp, params["min_area_um2"], params["max_area_um2"])


def _merge_without_neck(labels: np.ndarray, distance: np.ndarray, ratio: float) -> np.ndarray:
    """Merge neighbouring watershed regions whose shared border is not a neck: as wide (its
    largest distance to background) as `ratio` times the smaller region's largest distance."""
    n = int(labels.max())
    if n < 2:
        return labels
    radius = ndi.maximum(distance, labels, np.arange(n + 1))
    pairs = []
    for a, b, da, db in (
        (labels[:, :-1], labels[:, 1:], distance[:, :-1], distance[:, 1:]),
        (labels[:-1], labels[1:], distance[:-1], distance[1:]),
    ):
        border = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.stack([a[border], b[border], np.minimum(da[border], db[border])], 1))
    pairs = np.concatenate(pairs)
    if not len(pairs):
        return labels
    lo = np.minimum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
    hi = np.maximum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
    key = lo * (n + 1) + hi
    order = np.argsort(key)
    key, width = key[order], pairs[order, 2]
    starts = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    neck = np.maximum.reduceat(width, starts)
    lo, hi = key[starts] // (n + 1), key[starts] % (n + 1)
    merge = neck >= ratio * np.minimum(radius[lo], radius[hi])
    graph = coo_matrix((np.ones(merge.sum()), (lo[merge], hi[merge])), shape=(n + 1, n + 1))
    _, component = connected_components(graph, directed=False)
    return np.where(labels > 0, component[labels] + 1, 0)


def _sized(labels: np.ndarray, mpp: float, min_um2: float, max_um2: float) -> np.ndarray:
    """Labels renumbered 1..N without objects outside [min_um2, max_um2]."""
    area_um2 = np.bincount(labels.ravel()) * mpp * mpp
    sized = (area_um2 >= min_um2) & (area_um2 <= max_um2)
    sized[0] = False
    return relabel_sequential(np.where(sized[labels], labels, 0))[0]


def _fill_holes(mask: np.ndarray, mpp: float, params: Mapping) -> np.ndarray:
    """The mask with its holes up to max_hole_um2 filled."""
    return remove_small_holes(mask, max_size=int(params["max_hole_um2"] / mpp**2))


def _centre_markers(hematoxylin: np.ndarray, foreground: np.ndarray, mpp: float, params: Mapping) -> np.ndarray:
    """Watershed seeds at nucleus centres (see detect_nuclei): a label image, 0 = no seed."""
    if not foreground.any():
        return np.zeros(foreground.shape, np.int32)
    sigmas = np.asarray(params["blob_sigma_um"], float) / mpp
    # scale-normalised Laplacian of Gaussian, the strongest over the scales: dark spots > 0
    blob = np.max([-ndi.gaussian_laplace(hematoxylin, s) * s**2 for s in sigmas], axis=0)
    blob /= max(float(np.quantile(blob[foreground], 0.95)), 1e-6)
    score = blob + params["marker_distance_weight"] * ndi.distance_transform_edt(foreground) * mpp
    peaks = peak_local_max(
        score,
        min_distance=max(1, round(params["marker_spacing_um"] / mpp)),
        labels=foreground.astype(np.int32),
        exclude_border=False,
    )
    markers = np.zeros(foreground.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return markers


def _distance_markers(foreground: np.ndarray, mpp: float, h_um: float) -> np.ndarray:
    """Watershed seeds at the h-maxima of the distance map: a saddle deeper than h_um splits."""
    # Distance in hundredths of a micron: integers keep h-maxima exact and fast.
    distance = np.round(ndi.distance_transform_edt(foreground) * (100 * mpp)).astype(np.int32)
    return ndi.label(h_maxima(distance, round(100 * h_um)))[0] if foreground.any() else distance


def _split(foreground: np.ndarray, markers: np.ndarray, mpp: float, min_um2: float, max_um2: float) -> np.ndarray:
    """Label image (1..N) of the foreground split by a watershed of its distance map from
    `markers`, without objects outside [min_um2, max_um2]."""
    labels = watershed(-ndi.distance_transform_edt(foreground), markers, mask=foreground)
    return _sized(labels, mpp, min_um2, max_um2)


def _heuristic_classes(table: pd.DataFrame, is_blood: np.ndarray, mpp: float, params: Mapping) -> list[str]:
    """Class names by the morphology heuristic documented in detect_nuclei."""
    area_um2 = table["area"].to_numpy() * mpp * mpp
    eccentricity = table["eccentricity"].to_numpy()
    immune = (area_um2 <= params["immune_max_area_um2"]) & (eccentricity <= params["immune_max_eccentricity"])
    stromal = eccentricity >= params["stromal_min_eccentricity"]
    return list(np.select([is_blood, immune, stromal], ["blood", "immune", "stromal"], "other"))
