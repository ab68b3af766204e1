"""The classical nuclei detector: colour deconvolution, hysteresis threshold, watershed split and
morphology heuristics for the class of each nucleus."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import apply_hysteresis_threshold, threshold_otsu
from skimage.morphology import h_maxima, remove_small_holes
from skimage.segmentation import relabel_sequential, watershed

from histosynth.nuclei.instances import (
    empty_table,
    mean_per_instance,
    renumber,
    shape_table,
)

log = logging.getLogger(__name__)


def detect_nuclei(rgb: np.ndarray, mpp: float, params: Mapping) -> tuple[np.ndarray, pd.DataFrame]:
    """Classical nuclei detection on an RGB uint8 image at `mpp`: uint16 instances (0 = none,
    1..N) and a table (TABLE_COLUMNS, pixel units of the image).

    Hematoxylin optical density (skimage rgb2hed) is smoothed; pixels above its Otsu threshold
    (floored at min_hematoxylin) are nucleus cores, which grow into touching pixels above
    `hysteresis` times the threshold, unless the grown object exceeds max_area_um2 (it bled into
    hematoxylin-tinted cytoplasm; its cores are kept instead). Holes up to max_hole_um2 are
    filled; touching nuclei are split by a watershed of the distance map from h-maxima markers (a
    saddle deeper than marker_h_um separates two nuclei); objects outside [min_area_um2,
    max_area_um2] or less solid than min_solidity are dropped. Red blood cells, which carry no
    hematoxylin, are found the same way on red pixels (smoothed (R - B) / 255 of at least
    blood_min_redness) with their own area limits.

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
    cores = smooth > threshold
    low = max(params["min_hematoxylin"], params["hysteresis"] * threshold)
    grown, _ = ndi.label(apply_hysteresis_threshold(smooth, low, threshold))
    bled = np.bincount(grown.ravel()) * mpp * mpp > params["max_area_um2"]  # grew into cytoplasm
    bled[0] = False
    nuclear = np.where(bled[grown], cores, grown > 0)
    redness = (rgb[..., 0].astype(np.float32) - rgb[..., 2]) / 255
    red = (ndi.gaussian_filter(redness, params["smoothing_um"] / mpp) >= params["blood_min_redness"]) & ~nuclear

    nuclei = _split_objects(nuclear, mpp, params, params["min_area_um2"], params["max_area_um2"])
    blood = _split_objects(red, mpp, params, params["blood_min_area_um2"], params["blood_max_area_um2"])
    n_nuclei = int(nuclei.max())
    # Nuclei keep ids 1..n_nuclei (they win pixels both claim); red cells follow.
    instances = np.where(nuclei > 0, nuclei, np.where(blood > 0, blood + n_nuclei, 0))
    table = shape_table(instances)
    table = table[table["solidity"] >= params["min_solidity"]]
    if table.empty:
        return np.zeros(instances.shape, np.uint16), empty_table()
    table = table.assign(score=1.0, hematoxylin=mean_per_instance(instances, hematoxylin, table["instance_id"]))
    table = table.assign(**{"class": _heuristic_classes(table, table["instance_id"].to_numpy() > n_nuclei, mpp, params)})
    return renumber(instances, table)


def _split_objects(foreground: np.ndarray, mpp: float, params: Mapping, min_um2: float, max_um2: float) -> np.ndarray:
    """Label image (1..N) of the foreground's objects, touching ones split by a marker-controlled
    watershed of the distance map, without those outside [min_um2, max_um2]."""
    px_area = mpp * mpp
    foreground = remove_small_holes(foreground, max_size=int(params["max_hole_um2"] / px_area))
    if not foreground.any():
        return np.zeros(foreground.shape, np.int32)
    # Distance to background in hundredths of a micron: integers keep h-maxima exact and fast.
    distance = np.round(ndi.distance_transform_edt(foreground) * (100 * mpp)).astype(np.int32)
    markers, _ = ndi.label(h_maxima(distance, round(100 * params["marker_h_um"])))
    labels = watershed(-distance, markers, mask=foreground)
    area_um2 = np.bincount(labels.ravel()) * px_area
    sized = (area_um2 >= min_um2) & (area_um2 <= max_um2)
    sized[0] = False
    return relabel_sequential(np.where(sized[labels], labels, 0))[0]



def _heuristic_classes(table: pd.DataFrame, is_blood: np.ndarray, mpp: float, params: Mapping) -> list[str]:
    """Class names by the morphology heuristic documented in detect_nuclei."""
    area_um2 = table["area"].to_numpy() * mpp * mpp
    eccentricity = table["eccentricity"].to_numpy()
    immune = (area_um2 <= params["immune_max_area_um2"]) & (eccentricity <= params["immune_max_eccentricity"])
    stromal = eccentricity >= params["stromal_min_eccentricity"]
    return list(np.select([is_blood, immune, stromal], ["blood", "immune", "stromal"], "other"))


