"""Nuclei instance masks and their tables: HD-Yolo's nucleus classes, the detection settings,
the per-nucleus shape table both detectors share, and reading/writing uint16 instance PNGs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage.measure import regionprops_table

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



def renumber(instances: np.ndarray, table: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Keep only the instances listed in `table`, numbered 1..N in table order (uint16), with the table to match."""
    lut = np.zeros(int(instances.max()) + 1, np.uint16)
    lut[table["instance_id"].to_numpy()] = np.arange(1, len(table) + 1)
    table = table.assign(instance_id=np.arange(1, len(table) + 1))
    return lut[instances], table[list(TABLE_COLUMNS)]



def shape_table(instances: np.ndarray) -> pd.DataFrame:
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


def mean_per_instance(instances: np.ndarray, values: np.ndarray, ids) -> np.ndarray:
    """Mean of `values` over each instance in `ids`."""
    ids = np.asarray(ids)
    size = int(instances.max()) + 1
    sums = np.bincount(instances.ravel(), weights=values.ravel(), minlength=size)
    counts = np.bincount(instances.ravel(), minlength=size)
    return sums[ids] / np.maximum(counts[ids], 1)



def write_instances(instances: np.ndarray, path: Path) -> None:
    Image.fromarray(instances.astype(np.uint16)).save(path, compress_level=PNG_COMPRESSION)


def read_instances(path: str | Path) -> np.ndarray:
    """A uint16 instance mask written by this module."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.uint16)
