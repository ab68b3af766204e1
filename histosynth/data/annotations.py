"""Region annotations: reading QuPath GeoJSON exports and painting label masks for slide windows."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import geojson
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

log = logging.getLogger(__name__)

# Geometry types QuPath writes for points and lines (detections, rulers): not regions, skipped.
_NON_AREA_TYPES = {"Point", "MultiPoint", "LineString", "MultiLineString"}
# QuPath object types that are not region annotations (an "export all objects" includes them): skipped.
_NON_REGION_OBJECTS = {"detection", "cell", "tile"}
_AREA_TYPES = {"Polygon", "MultiPolygon"}
_EXPORT_HINT = "export region annotations from QuPath with File > Export objects as GeoJSON"


class AnnotationError(ValueError):
    """Bad annotation input; message names the file, the feature and the fix."""


@dataclass(frozen=True)
class Region:
    """One annotated region: its class name and a valid (Multi)Polygon in level-0 pixel coordinates."""

    class_name: str
    geometry: BaseGeometry


def load_regions(path: str | Path, class_key: str = "classification.name") -> list[Region]:
    """Read a QuPath GeoJSON export: a FeatureCollection, a bare list of Features, or a single Feature.

    class_key is a dotted path inside each feature's `properties` (QuPath: classification.name).
    Older QuPath's `classification` given as a plain string is accepted for classification.name;
    a top-level `properties.name` is used only with class_key="name". Point and line features,
    and QuPath detections/cells/tiles, are skipped with a warning; invalid polygons are repaired. An empty file or collection gives [].
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read the annotation file ({err})") from err
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}: not JSON ({err.msg} at line {err.lineno}, column {err.colno}); {_EXPORT_HINT}"
        ) from err

    regions: list[Region] = []
    skipped: dict[str, int] = {}
    repaired: list[int] = []
    for index, feature in enumerate(_features(data, path)):
        where = _describe(path, index, feature)
        object_type = (feature.get("properties") or {}).get("objectType")
        if object_type in _NON_REGION_OBJECTS:
            skipped[f"{object_type} object"] = skipped.get(f"{object_type} object", 0) + 1
            continue
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict):
            raise AnnotationError(f"{where} has no geometry; delete it or redraw it as an area annotation")
        gtype = geometry.get("type")
        if gtype in _NON_AREA_TYPES:
            skipped[gtype] = skipped.get(gtype, 0) + 1
            continue
        if gtype not in _AREA_TYPES:
            raise AnnotationError(
                f"{where} has unsupported geometry type {gtype!r}; only Polygon and MultiPolygon "
                "features are regions (points and lines are skipped)"
            )
        class_name = _class_of(feature, class_key, where)
        problem = _geometry_errors(geometry)
        if problem:
            raise AnnotationError(f"{where} has malformed {gtype} coordinates ({problem}); redraw or delete it")
        try:
            geom = shape(geometry)
        except (ValueError, TypeError, KeyError, IndexError, shapely.errors.ShapelyError) as err:
            raise AnnotationError(f"{where} has malformed {gtype} coordinates ({err}); redraw or delete it") from err
        if not geom.is_valid:
            geom = _polygonal(shapely.make_valid(geom))
            if geom.is_empty:
                raise AnnotationError(
                    f"{where} (class {class_name!r}) has an invalid {gtype} with no area left after repair; "
                    "redraw or delete it"
                )
            repaired.append(index)
        elif geom.is_empty:
            raise AnnotationError(f"{where} (class {class_name!r}) has an empty {gtype}; redraw or delete it")
        regions.append(Region(class_name, geom))

    if skipped:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(skipped.items()))
        log.warning("%s: skipped %d features (%s); only polygon annotations are regions", path, sum(skipped.values()), counts)
    if repaired:
        shown = ", ".join(map(str, repaired[:10])) + (", ..." if len(repaired) > 10 else "")
        log.warning("%s: repaired %d invalid polygon(s) (features %s) with shapely.make_valid", path, len(repaired), shown)
    return regions


def _geometry_errors(geometry: dict) -> str | None:
    """What the geojson package finds wrong with a geometry (rings not closed, too few positions), or None."""
    try:
        errors = geojson.GeoJSON.to_instance(geometry, strict=True).errors()
    except (ValueError, TypeError, AttributeError) as err:
        return str(err)
    if isinstance(errors, list):  # MultiPolygon: one entry per polygon
        errors = "; ".join(str(e) for e in errors if e)
    return str(errors) if errors else None


def _features(data, path: Path) -> list[dict]:
    """The list of Feature objects in a parsed GeoJSON document."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        found = f"a JSON object with type {data.get('type')!r}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise AnnotationError(
            f"{path}: expected a GeoJSON FeatureCollection, a list of Features or a Feature, found {found}; {_EXPORT_HINT}"
        )
    if not isinstance(features, list):
        raise AnnotationError(f"{path}: the FeatureCollection's 'features' is not a list; {_EXPORT_HINT}")
    for index, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise AnnotationError(f"{path}: feature[{index}] is not a GeoJSON Feature object; {_EXPORT_HINT}")
    return features


def _describe(path: Path, index: int, feature: dict) -> str:
    """'<file>: feature[i] (id ...)' for error messages."""
    fid = feature.get("id")
    return f"{path}: feature[{index}]" + (f" (id {fid})" if fid is not None else "")


def _class_of(feature: dict, class_key: str, where: str) -> str:
    """The class name at the dotted class_key inside the feature's properties."""
    value = feature.get("properties")
    parent = None
    for key in class_key.split("."):
        parent = value
        value = value.get(key) if isinstance(value, dict) else None
    if value is None and isinstance(parent, str):  # older QuPath: "classification": "Tumor"
        value = parent
    if not isinstance(value, str) or not value:
        raise AnnotationError(
            f"{where} has no class at properties.{class_key}; classify the annotation in QuPath, "
            "or set annotations.class_key to the property that holds the class name"
        )
    return value


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a geometry (a Polygon, a MultiPolygon, or an empty Polygon)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    polygons = [p for p in shapely.get_parts(geom) if isinstance(p, (Polygon, MultiPolygon)) and not p.is_empty]
    return shapely.union_all(polygons) if polygons else Polygon()


def class_fractions(mask: np.ndarray, classes: dict[str, int]) -> dict[str, float]:
    """Fraction of the mask's pixels carrying each class's label."""
    counts = np.bincount(np.asarray(mask, np.uint8).ravel(), minlength=256)
    total = max(int(mask.size), 1)
    return {name: float(counts[index] / total) for name, index in classes.items()}


class RegionRasterizer:
    """Paints label masks for windows of one slide from its regions."""

    def __init__(
        self,
        regions: Iterable[Region],
        classes: dict[str, int],
        *,
        slide_size: tuple[int, int],
        ignore: Iterable[str] = (),
        priority: Sequence[str] = (),
        source: str = "<annotations>",
    ):
        bad = {n: i for n, i in classes.items() if not isinstance(i, (int, np.integer)) or not 1 <= i <= 255}
        if bad:
            raise ValueError(f"class indices must be integers 1..255, got {bad}")
        unlisted = [n for n in priority if n not in classes]
        if unlisted:
            raise ValueError(f"`priority` lists {unlisted}, which are not label classes {sorted(classes)}")
        ignore = set(ignore)
        regions = [r for r in regions if r.class_name not in ignore]
        unknown = sorted({r.class_name for r in regions} - set(classes))
        if unknown:
            raise AnnotationError(
                f"{source}: annotation classes {unknown} are neither label classes {sorted(classes)} "
                f"nor ignored classes {sorted(ignore)}; add them to `classes` to label them "
                "or to `annotations.ignore_classes` to drop them"
            )
        regions = _clip_to_slide(regions, slide_size, source)

        # Paint order, lowest priority first: unlisted classes by ascending index, then `priority` reversed.
        rest = sorted((n for n in classes if n not in priority), key=lambda n: classes[n])
        order = rest + list(reversed(priority))
        parts, ranks = [], []
        for rank, name in enumerate(order):
            geoms = [r.geometry for r in regions if r.class_name == name]
            pieces = [p for p in shapely.get_parts(shapely.union_all(geoms)) if isinstance(p, Polygon) and not p.is_empty]
            parts.extend(pieces)
            ranks.extend([rank] * len(pieces))
        self._labels = np.array([classes[n] for n in order], np.uint8)
        self._ranks = np.array(ranks, np.intp)
        self._edges = [_edges(p) for p in parts]
        self._tree = shapely.STRtree(parts)

    def rasterize(self, x: float, y: float, width: float, height: float, out_shape: tuple[int, int]) -> np.ndarray:
        """uint8 label mask of shape out_shape = (rows, cols) for the level-0 window
        [x, x+width) x [y, y+height); pixel (r, c) takes the label of the region containing its
        centre (x + (c+0.5)*width/cols, y + (r+0.5)*height/rows), 0 where none does."""
        rows, cols = (int(n) for n in out_shape)
        if rows <= 0 or cols <= 0 or not width > 0 or not height > 0:
            raise ValueError(f"empty window: width={width}, height={height}, out_shape={out_shape}")
        mask = np.zeros((rows, cols), np.uint8)
        hits = self._tree.query(shapely.box(x, y, x + width, y + height))
        if hits.size == 0:
            return mask
        hits = hits[np.argsort(self._ranks[hits], kind="stable")]
        ranks = self._ranks[hits]
        starts = np.flatnonzero(np.r_[True, ranks[1:] != ranks[:-1]])
        for group in np.split(hits, starts[1:]):
            edges = np.concatenate([self._edges[i] for i in group])
            inside = _scanline_fill(edges, x, y, cols / width, rows / height, rows, cols)
            if inside is not None:
                np.copyto(mask, self._labels[self._ranks[group[0]]], where=inside)
        return mask


def _clip_to_slide(regions: list[Region], slide_size: tuple[int, int], source: str) -> list[Region]:
    """Regions clipped to the slide rectangle; those entirely outside are dropped, with warnings."""
    width, height = slide_size
    slide = shapely.box(0, 0, width, height)
    kept, clipped, dropped = [], 0, 0
    for region in regions:
        if slide.contains(region.geometry):
            kept.append(region)
            continue
        inside = _polygonal(region.geometry.intersection(slide))
        if inside.is_empty:
            dropped += 1
        else:
            clipped += 1
            kept.append(Region(region.class_name, inside))
    if clipped:
        log.warning("%s: clipped %d region(s) extending beyond the %dx%d slide", source, clipped, width, height)
    if dropped:
        log.warning("%s: dropped %d region(s) lying entirely outside the %dx%d slide", source, dropped, width, height)
    return kept


def _edges(polygon: Polygon) -> np.ndarray:
    """(n, 4) array of the polygon's ring edges (x0, y0, x1, y1), holes included."""
    rings = [polygon.exterior, *polygon.interiors]
    coords, ring = shapely.get_coordinates(rings, return_index=True)
    same = ring[1:] == ring[:-1]
    return np.hstack([coords[:-1][same], coords[1:][same]])


def _scanline_fill(edges, x, y, sx, sy, rows, cols) -> np.ndarray | None:
    """Boolean (rows, cols) mask of the pixel centres inside the rings `edges` (even-odd rule),
    after mapping level-0 (X, Y) to pixel (u, v) = ((X - x)*sx, (Y - y)*sy); None if empty.

    Each edge crosses the rows whose centre v = r + 0.5 lies in [min(v0, v1), max(v0, v1)); the
    crossings of a row, sorted by u, pair up into spans that cover the columns with centre in [u_a, u_b).
    """
    u0, v0 = (edges[:, 0] - x) * sx, (edges[:, 1] - y) * sy
    u1, v1 = (edges[:, 2] - x) * sx, (edges[:, 3] - y) * sy
    first = np.clip(np.ceil(np.minimum(v0, v1) - 0.5), 0, rows).astype(np.intp)
    stop = np.clip(np.ceil(np.maximum(v0, v1) - 0.5), 0, rows).astype(np.intp)
    count = stop - first
    total = int(count.sum())
    if total == 0:
        return None
    edge = np.repeat(np.arange(len(count)), count)
    row = first[edge] + np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    t = (row + 0.5 - v0[edge]) / (v1[edge] - v0[edge])
    u = u0[edge] + t * (u1[edge] - u0[edge])
    order = np.lexsort((u, row))
    # Span ends as flat pixel indices; non-decreasing because a row's spans are sorted and disjoint.
    bounds = row[order] * cols + np.clip(np.ceil(u[order] - 0.5), 0, cols).astype(np.intp)
    runs = np.diff(bounds, prepend=0, append=rows * cols)
    inside = np.zeros(len(runs), bool)
    inside[1::2] = True  # runs alternate outside, inside, outside, ...
    return np.repeat(inside, runs).reshape(rows, cols)
