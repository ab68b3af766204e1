"""Nuclei instance masks and their tables: HD-Yolo's nucleus classes, the per-nucleus
shape table both detectors share, and reading/writing uint16 instance PNGs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage.measure import regionprops_table

from histosynth.data.io import write_png

log = logging.getLogger(__name__)


# HD-Yolo's nucleus classes; a nucleus of class NUCLEUS_CLASSES[i] has class index i + 1 (0 = none).
NUCLEUS_CLASSES = ("tumor", "stromal", "immune", "blood", "macrophage", "dead", "other")
# Display colours (RGB) per class, shared by the GeoJSON (QuPath) and conditioning previews.
NUCLEUS_COLOURS = {
    "tumor": (0, 200, 0),
    "stromal": (150, 200, 150),
    "immune": (80, 80, 255),
    "blood": (255, 0, 0),
    "macrophage": (0, 94, 255),
    "dead": (51, 51, 51),
    "other": (255, 200, 0),
}
TABLE_COLUMNS = (
    "instance_id",
    "class",
    "score",
    "hematoxylin",
    "centroid_x",
    "centroid_y",
    "area",
    "perimeter",
    "eccentricity",
    "solidity",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
)


class NucleiError(RuntimeError):
    """A nuclei model or input that cannot be used; the message names the file and the fix."""


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
    return pd.DataFrame(
        {
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
        }
    )


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
    write_png(instances.astype(np.uint16), path)


def read_instances(path: str | Path) -> np.ndarray:
    """A uint16 instance mask written by this module."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.uint16)
