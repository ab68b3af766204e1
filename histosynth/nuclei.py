"""Nuclei instance segmentation with a class per nucleus, HD-Yolo-style: a classical default
(colour deconvolution, watershed, morphology heuristics) and a pluggable TorchScript model with
the same output; per-patch uint16 instance masks, a per-nucleus table and a QuPath GeoJSON."""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from skimage.color import rgb2hed
from skimage.filters import apply_hysteresis_threshold, threshold_otsu
from skimage.measure import find_contours, regionprops_table
from skimage.morphology import h_maxima, remove_small_holes
from skimage.segmentation import relabel_sequential, watershed
from tqdm import tqdm

from histosynth.io import atomic_dir, atomic_file
from histosynth.slides import Slide

log = logging.getLogger(__name__)

# HD-Yolo's nucleus classes; a nucleus of class NUCLEUS_CLASSES[i] has class index i + 1 (0 = none).
NUCLEUS_CLASSES = ("tumor", "stromal", "immune", "blood", "macrophage", "dead", "other")
# Display colours (RGB) per class, shared by the GeoJSON (QuPath) and conditioning previews.
NUCLEUS_COLOURS = {
    "tumor": (0, 200, 0), "stromal": (150, 200, 150), "immune": (80, 80, 255), "blood": (255, 0, 0),
    "macrophage": (0, 94, 255), "dead": (51, 51, 51), "other": (255, 200, 0),
}
TABLE_COLUMNS = (
    "instance_id", "class", "score", "hematoxylin", "centroid_x", "centroid_y", "area", "perimeter",
    "eccentricity", "solidity", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
)
PNG_COMPRESSION = 3
# Input sides of a learned model are rounded up to a multiple of this (detection networks' stride).
MODEL_STRIDE = 32


class NucleiError(RuntimeError):
    """A nuclei model or input that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class NucleiParams:
    """Nuclei detection settings (config `nuclei`). Sizes are in microns so they hold at any mpp."""

    mpp: float = 0.5  # resolution the classical detector runs at (never finer than the slide)
    min_hematoxylin: float = 0.03  # floor of the Otsu threshold on hematoxylin optical density
    hysteresis: float = 0.8  # pixels above this fraction of the threshold join the nuclei they touch
    smoothing_um: float = 0.25  # Gaussian sigma applied to the hematoxylin channel
    max_hole_um2: float = 1.0  # holes up to this area are filled (larger: gaps between packed nuclei)
    marker_h_um: float = 0.5  # h-maxima height on the distance map: a saddle this deep splits nuclei
    min_area_um2: float = 8.0
    max_area_um2: float = 250.0
    min_solidity: float = 0.75  # less solid objects (clumps the watershed could not split) are dropped
    immune_max_area_um2: float = 40.0  # heuristic: small and round -> immune
    immune_max_eccentricity: float = 0.8
    stromal_min_eccentricity: float = 0.85  # heuristic: elongated (axis ratio below about 0.5) -> stromal
    blood_min_redness: float = 0.45  # (R - B) / 255 of red-cell pixels; eosin-pink stroma is about 0.35
    blood_min_area_um2: float = 12.0
    blood_max_area_um2: float = 80.0
    model: str | None = None  # TorchScript detector; None uses the classical detector
    model_mpp: float = 0.25
    model_classes: dict[str, str] = field(default_factory=dict)  # model class name -> NUCLEUS_CLASSES name
    tile: int = 512
    pad: int = 64

    def __post_init__(self):
        wrong = {k: v for k, v in self.model_classes.items() if v not in NUCLEUS_CLASSES}
        if wrong:
            raise NucleiError(f"nuclei.model_classes maps to {wrong}, which are not nucleus classes {list(NUCLEUS_CLASSES)}")
        if self.tile < MODEL_STRIDE or self.pad < 0:
            raise NucleiError(f"nuclei.tile must be >= {MODEL_STRIDE} and nuclei.pad >= 0, got tile={self.tile}, pad={self.pad}")

    @classmethod
    def from_config(cls, section: dict) -> NucleiParams:
        """Build from the validated `nuclei` config section (keys not named like a field are ignored)."""
        return cls(**{f.name: section[f.name] for f in fields(cls) if f.name in section})


@dataclass(frozen=True)
class NucleiModel:
    """A loaded TorchScript nuclei detector and the device it runs on."""

    path: Path
    module: object  # a torch.jit.ScriptModule; torch is imported only when a model is used
    device: str


def class_index(name: str) -> int:
    """Mask value of a nucleus class name (1-based position in NUCLEUS_CLASSES)."""
    return NUCLEUS_CLASSES.index(name) + 1


def instance_class_indices(table: pd.DataFrame) -> dict[int, int]:
    """{instance_id: class index} for the rows of a nuclei table."""
    return {int(i): class_index(c) for i, c in zip(table["instance_id"], table["class"])}


def empty_table() -> pd.DataFrame:
    """A nuclei table with no rows and the standard columns."""
    dtypes = {c: "int64" if c == "instance_id" or c.startswith("bbox_") else "float64" for c in TABLE_COLUMNS}
    return pd.DataFrame({c: pd.Series(dtype="str" if c == "class" else dtypes[c]) for c in TABLE_COLUMNS})


def detection_mpp(params: NucleiParams, source_mpp: float, model: NucleiModel | None = None) -> float:
    """Resolution detection runs at: the model's, or params.mpp but never finer than the source."""
    return params.model_mpp if model is not None else max(params.mpp, source_mpp)


# --- classical detector ------------------------------------------------------------------------


def detect_nuclei(rgb: np.ndarray, mpp: float, params: NucleiParams) -> tuple[np.ndarray, pd.DataFrame]:
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
    smooth = ndi.gaussian_filter(hematoxylin, params.smoothing_um / mpp)
    # Otsu ignores the darkest 0.5%: black debris or ink (optical density above 1) would squeeze
    # every nucleus into the histogram's first bins.
    clipped = np.minimum(smooth, np.quantile(smooth, 0.995))
    threshold = params.min_hematoxylin
    if np.ptp(clipped) > 0:
        threshold = max(threshold, float(threshold_otsu(clipped)))
    cores = smooth > threshold
    low = max(params.min_hematoxylin, params.hysteresis * threshold)
    grown, _ = ndi.label(apply_hysteresis_threshold(smooth, low, threshold))
    bled = np.bincount(grown.ravel()) * mpp * mpp > params.max_area_um2  # grew into cytoplasm
    bled[0] = False
    nuclear = np.where(bled[grown], cores, grown > 0)
    redness = (rgb[..., 0].astype(np.float32) - rgb[..., 2]) / 255
    red = (ndi.gaussian_filter(redness, params.smoothing_um / mpp) >= params.blood_min_redness) & ~nuclear

    nuclei = _split_objects(nuclear, mpp, params, params.min_area_um2, params.max_area_um2)
    blood = _split_objects(red, mpp, params, params.blood_min_area_um2, params.blood_max_area_um2)
    n_nuclei = int(nuclei.max())
    # Nuclei keep ids 1..n_nuclei (they win pixels both claim); red cells follow.
    instances = np.where(nuclei > 0, nuclei, np.where(blood > 0, blood + n_nuclei, 0))
    table = _shape_table(instances)
    table = table[table["solidity"] >= params.min_solidity]
    if table.empty:
        return np.zeros(instances.shape, np.uint16), empty_table()
    table = table.assign(score=1.0, hematoxylin=_mean_per_instance(instances, hematoxylin, table["instance_id"]))
    table = table.assign(**{"class": _heuristic_classes(table, table["instance_id"].to_numpy() > n_nuclei, mpp, params)})
    return _renumber(instances, table)


def _split_objects(foreground: np.ndarray, mpp: float, params: NucleiParams, min_um2: float, max_um2: float) -> np.ndarray:
    """Label image (1..N) of the foreground's objects, touching ones split by a marker-controlled
    watershed of the distance map, without those outside [min_um2, max_um2]."""
    px_area = mpp * mpp
    foreground = remove_small_holes(foreground, max_size=int(params.max_hole_um2 / px_area))
    if not foreground.any():
        return np.zeros(foreground.shape, np.int32)
    # Distance to background in hundredths of a micron: integers keep h-maxima exact and fast.
    distance = np.round(ndi.distance_transform_edt(foreground) * (100 * mpp)).astype(np.int32)
    markers, _ = ndi.label(h_maxima(distance, round(100 * params.marker_h_um)))
    labels = watershed(-distance, markers, mask=foreground)
    area_um2 = np.bincount(labels.ravel()) * px_area
    sized = (area_um2 >= min_um2) & (area_um2 <= max_um2)
    sized[0] = False
    return relabel_sequential(np.where(sized[labels], labels, 0))[0]


def _renumber(instances: np.ndarray, table: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Keep only the instances listed in `table`, numbered 1..N in table order (uint16), with the table to match."""
    lut = np.zeros(int(instances.max()) + 1, np.uint16)
    lut[table["instance_id"].to_numpy()] = np.arange(1, len(table) + 1)
    table = table.assign(instance_id=np.arange(1, len(table) + 1))
    return lut[instances], table[list(TABLE_COLUMNS)]


def _heuristic_classes(table: pd.DataFrame, is_blood: np.ndarray, mpp: float, params: NucleiParams) -> list[str]:
    """Class names by the morphology heuristic documented in detect_nuclei."""
    area_um2 = table["area"].to_numpy() * mpp * mpp
    eccentricity = table["eccentricity"].to_numpy()
    immune = (area_um2 <= params.immune_max_area_um2) & (eccentricity <= params.immune_max_eccentricity)
    stromal = eccentricity >= params.stromal_min_eccentricity
    return list(np.select([is_blood, immune, stromal], ["blood", "immune", "stromal"], "other"))


def _shape_table(instances: np.ndarray) -> pd.DataFrame:
    """TABLE_COLUMNS for each instance: geometry in pixel units; class, score and hematoxylin are
    placeholders for the caller to fill."""
    if not instances.any():
        return empty_table()
    props = regionprops_table(instances.astype(np.int32), properties=("label", "area", "perimeter", "solidity", "bbox"))
    centroid_y, centroid_x, eccentricity = _moment_shape(instances, props["label"])
    return pd.DataFrame({
        "instance_id": props["label"].astype(np.int64),
        "class": "other",
        "score": 1.0,
        "hematoxylin": 0.0,
        "centroid_x": centroid_x,
        "centroid_y": centroid_y,
        "area": props["area"].astype(np.float64),
        "perimeter": props["perimeter"],
        "eccentricity": eccentricity,
        "solidity": props["solidity"],
        "bbox_x0": props["bbox-1"],
        "bbox_y0": props["bbox-0"],
        "bbox_x1": props["bbox-3"],
        "bbox_y1": props["bbox-2"],
    })


def _moment_shape(instances: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid row, column and eccentricity of each instance in `ids`, from image moments summed
    for all instances at once (regionprops computes them one region at a time, much slower)."""
    rows, cols = np.indices(instances.shape, dtype=np.float64)
    flat, size = instances.ravel(), int(instances.max()) + 1
    m00 = np.bincount(flat, minlength=size)[ids]

    def mean(values):
        return np.bincount(flat, values.ravel(), size)[ids] / m00
    cy, cx = mean(rows), mean(cols)
    mu20, mu02, mu11 = mean(rows * rows) - cy * cy, mean(cols * cols) - cx * cx, mean(rows * cols) - cy * cx
    spread = np.sqrt(4 * mu11**2 + (mu20 - mu02) ** 2)
    major, minor = (mu20 + mu02 + spread) / 2, np.maximum((mu20 + mu02 - spread) / 2, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        eccentricity = np.where(major > 0, np.sqrt(1 - minor / major), 0.0)
    return cy, cx, eccentricity


def _mean_per_instance(instances: np.ndarray, values: np.ndarray, ids) -> np.ndarray:
    """Mean of `values` over each instance in `ids`."""
    ids = np.asarray(ids)
    size = int(instances.max()) + 1
    sums = np.bincount(instances.ravel(), weights=values.ravel(), minlength=size)
    counts = np.bincount(instances.ravel(), minlength=size)
    return sums[ids] / np.maximum(counts[ids], 1)


# --- learned detector --------------------------------------------------------------------------


def load_detector(path: str | Path, device: str = "cpu") -> NucleiModel:
    """Load a TorchScript nuclei detector onto `device`.

    Contract: the module takes a float tensor (1, 3, H, W), RGB in [0, 1] at nuclei.model_mpp, H
    and W multiples of 32, and returns a tuple (instances, classes, scores): `instances` an
    (H, W) integer tensor with ids 1..N (0 = none), `classes` a list of N class-name strings (the
    class of instance i at position i - 1) and `scores` N floats. Class names that are not
    NUCLEUS_CLASSES must be mapped by nuclei.model_classes.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise NucleiError(
            f"{path}: no such nuclei model file; set nuclei.model to a TorchScript file, or to null for the classical detector"
        )
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but still the format that carries class names
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise NucleiError(
            f"{path}: not a TorchScript module ({str(err).splitlines()[0]}); export the detector with "
            "torch.jit.script(model).save(path) or torch.jit.trace(model, example).save(path)"
        ) from err
    module.eval()
    return NucleiModel(path, module, device)


def detect_with_model(rgb: np.ndarray, model: NucleiModel, params: NucleiParams) -> tuple[np.ndarray, pd.DataFrame]:
    """Run a learned detector on an RGB uint8 image at params.model_mpp, in tiles of
    params.tile pixels with params.pad pixels of context on each side (both rounded up to
    multiples of 32; white beyond the image). A tile keeps the instances whose centroid lies in
    its core; where kept instances of neighbouring tiles overlap, the earlier tile's pixels stay."""
    h, w = rgb.shape[:2]
    tile = _round_up(params.tile, MODEL_STRIDE)
    core_h, core_w = min(tile, _round_up(h, MODEL_STRIDE)), min(tile, _round_up(w, MODEL_STRIDE))
    pad = _round_up(params.pad, MODEL_STRIDE)
    n_rows, n_cols = math.ceil(h / core_h), math.ceil(w / core_w)
    canvas = np.full((n_rows * core_h + 2 * pad, n_cols * core_w + 2 * pad, 3), 255, np.uint8)
    canvas[pad : pad + h, pad : pad + w] = rgb
    instances = np.zeros((h, w), np.int32)
    classes: list[str] = []
    scores: list[float] = []
    for top in range(0, n_rows * core_h, core_h):
        for left in range(0, n_cols * core_w, core_w):
            window = canvas[top : top + core_h + 2 * pad, left : left + core_w + 2 * pad]
            tile_instances, tile_classes, tile_scores = _run_model(model, window)
            cy, cx = _centroids(tile_instances, len(tile_classes))
            kept = np.flatnonzero((cy >= pad) & (cy < pad + core_h) & (cx >= pad) & (cx < pad + core_w))
            lut = np.zeros(len(tile_classes) + 1, np.int32)
            lut[kept + 1] = len(classes) + np.arange(1, len(kept) + 1)
            classes += _map_classes([tile_classes[i] for i in kept], params, model.path)
            scores += [tile_scores[i] for i in kept]
            # The window covers image rows top - pad .. top + core_h + pad: paste its in-image part.
            r0, c0 = max(top - pad, 0), max(left - pad, 0)
            r1, c1 = min(top + core_h + pad, h), min(left + core_w + pad, w)
            mapped = lut[tile_instances[r0 - top + pad : r1 - top + pad, c0 - left + pad : c1 - left + pad]]
            target = instances[r0:r1, c0:c1]
            np.copyto(target, mapped, where=(mapped > 0) & (target == 0))
    table = _shape_table(instances)
    if table.empty:
        return instances.astype(np.uint16), table
    positions = table["instance_id"].to_numpy() - 1
    table["class"] = [classes[i] for i in positions]
    table["score"] = np.asarray(scores, np.float64)[positions]
    table["hematoxylin"] = _mean_per_instance(instances, rgb2hed(rgb)[..., 0], table["instance_id"])
    return _renumber(instances, table)  # stitching drops the ids whose pixels a neighbour took


def _centroids(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column centroids of labels 1..n (NaN for labels with no pixels)."""
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, rows.ravel(), n + 1)[1:] / counts
        cx = np.bincount(flat, cols.ravel(), n + 1)[1:] / counts
    return cy, cx


def _run_model(model: NucleiModel, window: np.ndarray) -> tuple[np.ndarray, list[str], list[float]]:
    """One forward pass on an RGB window; checks the output against the contract of load_detector."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1)[None].float().div(255).to(model.device)
    try:
        with torch.inference_mode():
            instances, classes, scores = model.module(x)
        instances = instances.cpu().numpy().squeeze().astype(np.int64)
        scores = [float(s) for s in scores]
        classes = [str(c) for c in classes]
    except (RuntimeError, TypeError, ValueError, AttributeError) as err:
        raise NucleiError(
            f"{model.path}: failed on a (1, 3, {window.shape[0]}, {window.shape[1]}) input or returned something other "
            f"than (instances, classes, scores) ({str(err).splitlines()[0]}); the contract is in histosynth.nuclei.load_detector"
        ) from err
    if instances.shape != window.shape[:2] or len(scores) != len(classes) or instances.max(initial=0) > len(classes):
        raise NucleiError(
            f"{model.path}: output instances of shape {instances.shape} with ids up to {instances.max(initial=0)}, "
            f"{len(classes)} classes and {len(scores)} scores for an input of {window.shape[0]}x{window.shape[1]}; "
            "the model must return one class and one score per instance id 1..N and a mask the size of its input"
        )
    return instances, classes, scores


def _map_classes(names: Sequence[str], params: NucleiParams, source: Path) -> list[str]:
    """Model class names as NUCLEUS_CLASSES names, via nuclei.model_classes (identity for names already in it)."""
    mapping = {name: name for name in NUCLEUS_CLASSES} | dict(params.model_classes)
    unmapped = sorted(set(names) - set(mapping))
    if unmapped:
        raise NucleiError(
            f"{source}: the model's classes {unmapped} are not mapped; add them to nuclei.model_classes "
            f"(model class name -> one of {list(NUCLEUS_CLASSES)})"
        )
    return [mapping[name] for name in names]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- dispatch and resolution -------------------------------------------------------------------


@functools.cache
def _note_classical_detector() -> None:
    log.info("nuclei.model is not set: using the classical detector (colour deconvolution + watershed, heuristic classes)")


def detect(rgb: np.ndarray, mpp: float, params: NucleiParams,
           model: NucleiModel | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Instances and table for an RGB image at `mpp`: the learned model when given (the image
    should then be at params.model_mpp), else the classical detector."""
    if model is None:
        _note_classical_detector()
        return detect_nuclei(rgb, mpp, params)
    if not math.isclose(mpp, params.model_mpp, rel_tol=0.05):
        log.warning("%s expects %.3f mpp but got an image at %.3f mpp; use segment_patch to resample",
                    model.path, params.model_mpp, mpp)
    return detect_with_model(rgb, model, params)


def resize_instances(instances: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize keeping instance ids: each output pixel takes the input pixel under its centre."""
    rows, cols = out_shape
    h, w = instances.shape
    r = ((np.arange(rows) + 0.5) * h / rows).astype(np.intp)
    c = ((np.arange(cols) + 0.5) * w / cols).astype(np.intp)
    return instances[np.ix_(r, c)]


def segment_patch(rgb: np.ndarray, mpp: float, out_shape: tuple[int, int], params: NucleiParams,
                  model: NucleiModel | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Detect nuclei in an RGB image at `mpp` (resampled to the detection mpp when it differs) and
    return uint16 instances on the out_shape = (rows, cols) grid with their table measured on that
    grid; ids are kept, and nuclei too small to survive the resize are dropped."""
    det_mpp = detection_mpp(params, mpp, model)
    if not math.isclose(det_mpp, mpp, rel_tol=0.01):
        size = (max(1, round(rgb.shape[1] * mpp / det_mpp)), max(1, round(rgb.shape[0] * mpp / det_mpp)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
    instances, table = detect(rgb, det_mpp, params, model)
    if instances.shape == tuple(out_shape):
        return instances, table
    instances = resize_instances(instances, out_shape)
    resized = _shape_table(instances)
    if resized.empty:
        return instances, resized
    carried = table.set_index("instance_id").loc[resized["instance_id"]]
    for column in ("class", "score", "hematoxylin"):
        resized[column] = carried[column].to_numpy()
    return instances, resized


# --- GeoJSON -----------------------------------------------------------------------------------


def nucleus_features(instances: np.ndarray, table: pd.DataFrame, x: float = 0.0, y: float = 0.0,
                     scale: float = 1.0, mpp: float | None = None) -> list[dict]:
    """QuPath detection features (level-0 polygons) for the instances listed in `table`.
    The mask's pixel (r, c) covers level-0 [x + c*scale, x + (c+1)*scale) x [y + r*scale, ...);
    outlines run halfway between inside and outside pixel centres, so rasterize_nuclei with the
    pixel-centre rule gives the mask back. With `mpp` (microns per mask pixel), area and perimeter
    measurements are in microns."""
    unit, factor = ("µm", mpp) if mpp else ("px", 1.0)
    features = []
    for row in table.to_dict("records"):
        x0, y0, x1, y1 = (int(row[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
        crop = np.pad(instances[y0:y1, x0:x1] == row["instance_id"], 1)  # padded: outlines close
        geometry = _outline(crop, x + (x0 - 1) * scale, y + (y0 - 1) * scale, scale)
        if geometry is None:
            continue
        name = row["class"]
        features.append({
            "type": "Feature",
            "geometry": geometry,
            "properties": {
                "objectType": "detection",
                "classification": {"name": name, "color": list(NUCLEUS_COLOURS.get(name, (128, 128, 128)))},
                "measurements": {
                    "Score": float(row["score"]),
                    "Hematoxylin OD mean": float(row["hematoxylin"]),
                    f"Area {unit}^2": float(row["area"]) * factor**2,
                    f"Perimeter {unit}": float(row["perimeter"]) * factor,
                    "Eccentricity": float(row["eccentricity"]),
                    "Solidity": float(row["solidity"]),
                },
            },
        })
    return features


def _outline(mask: np.ndarray, x: float, y: float, scale: float) -> dict | None:
    """GeoJSON (Multi)Polygon of a boolean mask with a background border, whose pixel (r, c) has
    its centre at level-0 (x + (c + 0.5)*scale, y + (r + 0.5)*scale); None if it has no area.
    Several rings (holes, separate parts) combine by the even-odd rule."""
    rings = [_ring(contour, x, y, scale) for contour in find_contours(mask.astype(np.uint8), 0.5)]
    rings = [ring for ring in rings if len(ring) >= 4]
    if len(rings) <= 1:
        return {"type": "Polygon", "coordinates": [rings[0].tolist()]} if rings else None
    parts = [shapely.make_valid(Polygon(ring)) for ring in rings]
    geometry = functools.reduce(lambda a, b: a.symmetric_difference(b), parts)
    return None if geometry.is_empty else mapping(geometry)


def _ring(contour: np.ndarray, x: float, y: float, scale: float) -> np.ndarray:
    """A closed find_contours ring in level-0 (x, y) without its collinear vertices (lossless)."""
    points = contour[:-1, ::-1]  # (col, row); the last point repeats the first
    before, after = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
    corners = points[np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9]
    return np.round((np.vstack([corners, corners[:1]]) + 0.5) * scale + (x, y), 3)


def nuclei_geojson(features: Iterable[dict]) -> dict:
    """A FeatureCollection (QuPath: File > Import objects) of nucleus features."""
    return {"type": "FeatureCollection", "features": list(features)}


def write_geojson(collection: dict, path: str | Path) -> None:
    """Write a GeoJSON document atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(collection))


class NucleusRasterizer:
    """Paints instance masks for windows of a slide from nucleus polygons (GeoJSON features)."""

    def __init__(self, features: Iterable[dict] | dict):
        if isinstance(features, dict):
            features = features.get("features", [])
        self._shapes, self.classes = [], []
        skipped = 0
        for feature in features:
            geometry = shape(feature["geometry"]) if feature.get("geometry") else None
            if not isinstance(geometry, (Polygon, MultiPolygon)) or geometry.is_empty:
                skipped += 1
                continue
            self._shapes.append(geometry)
            classification = (feature.get("properties") or {}).get("classification") or {}
            name = classification.get("name", "other") if isinstance(classification, dict) else str(classification)
            self.classes.append(name)
        if skipped:
            log.warning("skipped %d nucleus feature(s) without polygon geometry", skipped)
        shapely.prepare(self._shapes)
        self._tree = shapely.STRtree(self._shapes)

    def rasterize(self, x: float, y: float, width: float, height: float,
                  out_shape: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
        """uint16 instances of shape out_shape = (rows, cols) for the level-0 window
        [x, x+width) x [y, y+height), and the class name of each instance id (position id - 1).
        Pixel (r, c) belongs to the polygon containing its centre (as in RegionRasterizer); the
        window's polygons are numbered 1.. in feature order, later ones painted over earlier ones.
        Unclassified features are `other`."""
        rows, cols = (int(n) for n in out_shape)
        sx, sy = width / cols, height / rows
        instances = np.zeros((rows, cols), np.uint16)
        hits = np.sort(self._tree.query(shapely.box(x, y, x + width, y + height)))
        for instance_id, hit in enumerate(hits, start=1):
            minx, miny, maxx, maxy = self._shapes[hit].bounds
            c0, c1 = max(math.floor((minx - x) / sx - 0.5), 0), min(math.ceil((maxx - x) / sx - 0.5) + 1, cols)
            r0, r1 = max(math.floor((miny - y) / sy - 0.5), 0), min(math.ceil((maxy - y) / sy - 0.5) + 1, rows)
            if c0 >= c1 or r0 >= r1:
                continue
            cc, rr = np.meshgrid(np.arange(c0, c1), np.arange(r0, r1))
            inside = shapely.contains_xy(self._shapes[hit], x + (cc + 0.5) * sx, y + (rr + 0.5) * sy)
            instances[r0:r1, c0:c1][inside] = instance_id
        return instances, [self.classes[i] for i in hits]


def rasterize_nuclei(features: Iterable[dict] | dict, x: float, y: float, width: float, height: float,
                     out_shape: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """One-off NucleusRasterizer(features).rasterize(...): instances and their class names."""
    return NucleusRasterizer(features).rasterize(x, y, width, height, out_shape)


# --- slides and folders ------------------------------------------------------------------------


def segment_slide_patches(index: pd.DataFrame, slide_path: str | Path, out_dir: str | Path, params: NucleiParams,
                          model: NucleiModel | None = None, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Segment nuclei in every patch of one slide's index (histosynth.io.read_patch_index).

    Each patch's window is read from the slide at the detection mpp, segmented, and its instances
    resized to the patch grid and written to out_dir/<patch_id>.png (uint16). Returns the
    per-nucleus table (patch grid pixel units, plus patch_id, slide_x/slide_y: the centroid in
    level-0 pixels, and `primary`: whether this patch's centre is the nearest to the nucleus,
    which holds when windows overlap) and a GeoJSON FeatureCollection of the primary nuclei in
    level-0 coordinates.
    """
    if index.empty:
        raise NucleiError(f"{slide_path}: the patch index is empty; nothing to segment")
    slide_mpp = float(index["slide_mpp"].iloc[0])
    extent = (index["size"] * index["mpp"] / slide_mpp).to_numpy()  # level-0 window sides
    centres = np.column_stack([index["x"] + extent / 2, index["y"] + extent / 2])
    nearest = cKDTree(centres)
    tables, features = [], []
    started = time.perf_counter()
    with Slide(slide_path, mpp=slide_mpp) as slide, atomic_dir(out_dir) as tmp_dir:
        det_mpp = detection_mpp(params, slide.mpp, model)
        rows = tqdm(index.itertuples(index=False), total=len(index), desc=f"{Path(slide_path).stem}: nuclei",
                    unit="patch", disable=not progress, mininterval=2)
        for position, row in enumerate(rows):
            read_size = max(1, round(row.size * row.mpp / det_mpp))
            rgb = slide.read(row.x, row.y, extent[position], extent[position], (read_size, read_size))
            instances, table = segment_patch(rgb, det_mpp, (row.size, row.size), params, model)
            _write_instances(instances, tmp_dir / f"{row.patch_id}.png")
            scale = extent[position] / row.size
            table.insert(0, "patch_id", row.patch_id)
            table["slide_x"] = row.x + (table["centroid_x"] + 0.5) * scale
            table["slide_y"] = row.y + (table["centroid_y"] + 0.5) * scale
            table["primary"] = nearest.query(table[["slide_x", "slide_y"]].to_numpy(), p=np.inf)[1] == position
            features += nucleus_features(instances, table[table["primary"]], row.x, row.y, scale, row.mpp)
            tables.append(table)
    seconds = time.perf_counter() - started
    table = pd.concat(tables, ignore_index=True)
    log.info("%s: %d nuclei in %d patches at %.3f mpp, %.1f s (%.1f patches/s)",
             slide_path, len(table), len(index), det_mpp, seconds, len(index) / seconds)
    return table, nuclei_geojson(features)


def segment_images(paths: Iterable[str | Path], mpp: float, out_dir: str | Path, params: NucleiParams,
                   model: NucleiModel | None = None, progress: bool = True) -> pd.DataFrame:
    """Segment nuclei in plain RGB images (PNG, TIFF) at `mpp`; writes out_dir/<stem>.png
    (uint16 instances on each image's grid) and returns the per-nucleus table with an `image`
    column holding the stem."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise NucleiError(f"no images to segment for {out_dir}; give PNG or TIFF files")
    stems = [p.stem for p in paths]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise NucleiError(f"image names must be unique without their extension (outputs are <stem>.png); repeated: {repeated}")
    tables = []
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp_dir:
        for path in tqdm(paths, desc="nuclei", unit="image", disable=not progress, mininterval=2):
            try:
                with Image.open(path) as image:
                    rgb = np.asarray(image.convert("RGB"))
            except OSError as err:
                raise NucleiError(f"{path}: cannot read the image ({err}); give RGB PNG or TIFF files") from err
            instances, table = segment_patch(rgb, mpp, rgb.shape[:2], params, model)
            _write_instances(instances, tmp_dir / f"{path.stem}.png")
            table.insert(0, "image", path.stem)
            tables.append(table)
    seconds = time.perf_counter() - started
    log.info("%d images segmented in %.1f s (%.1f images/s)", len(paths), seconds, len(paths) / seconds)
    return pd.concat(tables, ignore_index=True)


def _write_instances(instances: np.ndarray, path: Path) -> None:
    Image.fromarray(instances.astype(np.uint16)).save(path, compress_level=PNG_COMPRESSION)


def read_instances(path: str | Path) -> np.ndarray:
    """A uint16 instance mask written by this module."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.uint16)
