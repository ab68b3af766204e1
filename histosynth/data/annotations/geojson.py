"""QuPath GeoJSON region annotations (a FeatureCollection, a bare list of Features or one Feature)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import geojson
import shapely
from shapely.geometry import shape

from histosynth.data.annotations.regions import AnnotationError, Region, checked_polygon

log = logging.getLogger(__name__)

# Geometry types QuPath writes for points and lines (detections, rulers): not regions, skipped.
_NON_AREA_TYPES = {"Point", "MultiPoint", "LineString", "MultiLineString"}
# QuPath object types that are not region annotations (an "export all objects" includes them): skipped.
_NON_REGION_OBJECTS = {"detection", "cell", "tile"}
_AREA_TYPES = {"Polygon", "MultiPolygon"}
_EXPORT_HINT = "export the annotations from QuPath with File > Export objects as GeoJSON"


def read_geojson(path: str | Path, class_key: str) -> list[Region]:
    """Read a QuPath GeoJSON export: a FeatureCollection, a bare list of Features, or a single Feature.

    class_key is a dotted path inside each feature's `properties` (QuPath: classification.name).
    Older QuPath's `classification` given as a plain string is accepted for classification.name;
    a top-level `properties.name` is used only with class_key="name". Point and line features,
    and QuPath detections/cells/tiles, are skipped with a warning; invalid polygons are repaired. An empty file or collection gives [].
    """
    path = Path(path)
    regions: list[Region] = []
    skipped: dict[str, int] = {}
    repaired: list[int] = []
    for index, feature in enumerate(read_features(path)):
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
        geom, was_repaired = checked_polygon(geom, f"{where} (class {class_name!r})", gtype)
        if was_repaired:
            repaired.append(index)
        regions.append(Region(class_name, geom))

    if skipped:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(skipped.items()))
        log.warning(
            "%s: skipped %d features (%s); only polygon annotations are regions", path, sum(skipped.values()), counts
        )
    if repaired:
        shown = ", ".join(map(str, repaired[:10])) + (", ..." if len(repaired) > 10 else "")
        log.warning(
            "%s: repaired %d invalid polygon(s) (features %s) with shapely.make_valid", path, len(repaired), shown
        )
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


def read_features(path: str | Path) -> list[dict]:
    """The Feature objects of a GeoJSON file (a FeatureCollection, a bare list of Features or one
    Feature; [] for an empty file), for region annotations and nuclei alike; a file that is not
    JSON, or JSON that is not Features, is an AnnotationError naming the file."""
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
    return _features(data, path)


def _features(data, path: Path) -> list[dict]:
    """The list of Feature objects in a parsed GeoJSON document."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        found = (
            f"a JSON object with type {data.get('type')!r}"
            if isinstance(data, dict)
            else f"a JSON {type(data).__name__}"
        )
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
