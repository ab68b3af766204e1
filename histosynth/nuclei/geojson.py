"""QuPath GeoJSON for nuclei: detection features out, and instance masks painted back from them."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import geojson
import numpy as np
import pandas as pd
import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from skimage.measure import find_contours

from histosynth.files import atomic_file
from histosynth.nuclei.instances import NUCLEUS_COLOURS

log = logging.getLogger(__name__)


def nucleus_features(
    instances: np.ndarray,
    table: pd.DataFrame,
    x: float = 0.0,
    y: float = 0.0,
    scale: float = 1.0,
    mpp: float | None = None,
) -> list[dict]:
    """QuPath detection features (level-0 polygons) for the instances listed in `table`.
    The mask's pixel (r, c) covers level-0 [x + c*scale, x + (c+1)*scale) x [y + r*scale, ...);
    outlines run halfway between inside and outside pixel centres, so NucleusRasterizer with the
    pixel-centre rule gives the mask back. With `mpp` (microns per mask pixel), area and perimeter
    measurements are in microns."""
    unit, factor = ("µm", mpp) if mpp else ("px", 1.0)
    features = []
    for row in table.to_dict("records"):
        x0, y0, x1, y1 = (int(row[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
        crop = np.pad(instances[y0:y1, x0:x1] == row["instance_id"], 1)  # padded: outlines close
        geometry = instance_outline(crop, x + (x0 - 1) * scale, y + (y0 - 1) * scale, scale)
        if geometry is None:
            continue
        name = row["class"]
        features.append(
            geojson.Feature(
                geometry=geometry,
                properties={
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
            )
        )
    return features


def instance_outline(mask: np.ndarray, x: float, y: float, scale: float) -> dict | None:
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
    return geojson.FeatureCollection(list(features))


def write_geojson(collection: dict, path: str | Path) -> None:
    """Write a GeoJSON document atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(geojson.dumps(collection))


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

    def rasterize(
        self, x: float, y: float, width: float, height: float, out_shape: tuple[int, int]
    ) -> tuple[np.ndarray, list[str]]:
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
