"""ASAP XML (CAMELYON16/17, PAIP): <ASAP_Annotations><Annotations><Annotation Type=...
PartOfGroup=...><Coordinates><Coordinate Order X Y/>. The group is the class; polygons,
rectangles and splines (their control points as a polygon) are regions; dots and point sets
are not areas and are skipped with a count in the log."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from shapely.geometry import Polygon

from histosynth.data.annotations.regions import AnnotationError, Region, checked_polygon
from histosynth.data.annotations.xml import parse_xml, vertices

log = logging.getLogger(__name__)

AREA_TYPES = ("Polygon", "Rectangle", "Spline")
POINT_TYPES = ("Dot", "PointSet")
_FIX = "export the annotations from ASAP (File > Save annotations)"


def asap_polygons(path: str | Path, need_group: bool = True) -> Iterator[tuple[str, np.ndarray, str]]:
    """(group, (n, 2) vertices, element description) of every area annotation of an ASAP file, in
    file order. An annotation whose group the file does not define is an error listing the file's
    groups, and so is one without a group (ASAP's "None") unless `need_group` is false (nuclei,
    whose class is optional: its group is then ''); unknown annotation types are an error."""
    root = parse_xml(path, "ASAP_Annotations", _FIX)
    groups = [g.get("Name") for g in root.iter("Group") if g.get("Name")]
    skipped = 0
    for index, annotation in enumerate(root.iter("Annotation")):
        name = annotation.get("Name")
        where = f"{path}: Annotation[{index}]" + (f" ({name!r})" if name else "")
        kind = annotation.get("Type", "")
        if kind in POINT_TYPES:
            skipped += 1
            continue
        if kind not in AREA_TYPES:
            raise AnnotationError(
                f"{where} has Type {kind!r}; ASAP area types are {', '.join(AREA_TYPES)} "
                f"(and {', '.join(POINT_TYPES)}, skipped); redraw it as a polygon"
            )
        group = annotation.get("PartOfGroup") or "None"
        if group == "None" and not need_group:
            group = ""
        elif group == "None" or (groups and group not in groups):
            listed = ", ".join(map(repr, groups)) or "none"
            raise AnnotationError(
                f"{where} belongs to group {group!r}, not one the file defines (groups: {listed}); "
                "assign it to a group in ASAP: the group is its class"
            )
        yield group, vertices(annotation, "Coordinate", where), where
    if skipped:
        log.info("%s: skipped %d dot/point-set annotation(s); only areas are regions", path, skipped)


def read_asap(path: str | Path) -> list[Region]:
    """The regions of an ASAP XML file, one per area annotation, its group as the class."""
    regions, repaired = [], 0
    for group, points, where in asap_polygons(path):
        if len(points) < 3:
            raise AnnotationError(
                f"{where} has {len(points)} coordinate(s); an area needs 3 or more: redraw or delete it"
            )
        geometry, fixed = checked_polygon(Polygon(points), f"{where} (group {group!r})", "polygon")
        repaired += fixed
        regions.append(Region(group, geometry))
    if repaired:
        log.warning("%s: repaired %d invalid polygon(s) with shapely.make_valid", path, repaired)
    return regions
