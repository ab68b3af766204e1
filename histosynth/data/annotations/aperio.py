"""Aperio ImageScope XML (TCGA work, MoNuSeg): <Annotations><Annotation Name=...><Regions><Region
Type NegativeROA><Vertices><Vertex X Y/>. One class per Annotation (its Name attribute, or the
configured attribute: an XML attribute of <Annotation> or one of its <Attribute Name Value>);
regions with NegativeROA="1" are holes cut from the Annotation's other regions."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import shapely
from shapely import affinity
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from histosynth.data.annotations.regions import AnnotationError, Region, checked_polygon, polygonal
from histosynth.data.annotations.xml import parse_xml, vertices

log = logging.getLogger(__name__)

# ImageScope region types: 0 free-hand/polygon, 1 rectangle, 2 ellipse (two corner vertices), 3 arrow, 4 ruler.
_LINE_TYPES = {"3", "4"}
_ELLIPSE = "2"
_FIX = "save the annotations from ImageScope (File > Save annotations)"


@dataclass(frozen=True)
class AperioRegion:
    """One <Region> of an Aperio file: its Annotation's position and class ('' = none), its area, and whether it is a hole."""

    annotation: int
    class_name: str
    geometry: BaseGeometry
    negative: bool
    where: str


def aperio_regions(path: str | Path, class_attribute: str = "Name") -> Iterator[AperioRegion]:
    """Every area <Region> of an Aperio XML file in file order (arrows and rulers skipped, with a count in the log)."""
    root = parse_xml(path, "Annotations", _FIX)
    skipped = 0
    for index, annotation in enumerate(root.iter("Annotation")):
        class_name = _class_of(annotation, class_attribute)
        for region in annotation.iter("Region"):
            where = f"{path}: Annotation[{index}] (Id {annotation.get('Id', '?')}) Region Id {region.get('Id', '?')}"
            kind = region.get("Type", "0")
            if kind in _LINE_TYPES:
                skipped += 1
                continue
            points = vertices(region, "Vertex", where)
            if kind == _ELLIPSE and len(points) == 2:
                (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
                ellipse = shapely.Point((x0 + x1) / 2, (y0 + y1) / 2).buffer(1.0, quad_segs=32)
                geometry = affinity.scale(ellipse, (x1 - x0) / 2, (y1 - y0) / 2)
            elif len(points) >= 3:
                geometry = Polygon(points)
            else:
                raise AnnotationError(
                    f"{where} has {len(points)} vertices; an area needs 3 or more: redraw or delete it"
                )
            geometry, repaired = checked_polygon(geometry, where, "region")
            if repaired:
                log.warning("%s: repaired an invalid polygon with shapely.make_valid", where)
            yield AperioRegion(index, class_name, geometry, region.get("NegativeROA", "0") == "1", where)
    if skipped:
        log.info("%s: skipped %d arrow/ruler region(s); only areas are regions", path, skipped)


def _class_of(annotation, attribute: str) -> str:
    """The Annotation's class: its XML attribute `attribute`, else the Value of its <Attribute Name=attribute>."""
    value = annotation.get(attribute)
    if not value:
        attributes = annotation.find("Attributes")
        for item in attributes.iter("Attribute") if attributes is not None else ():
            if item.get("Name") == attribute and item.get("Value"):
                value = item.get("Value")
                break
    return (value or "").strip()


def read_aperio(path: str | Path, class_attribute: str = "Name") -> list[Region]:
    """The regions of an Aperio XML file: one per Annotation, the union of its regions minus its negative ones."""
    by_annotation: dict[int, list[AperioRegion]] = {}
    for region in aperio_regions(path, class_attribute):
        by_annotation.setdefault(region.annotation, []).append(region)
    out = []
    for index, parts in by_annotation.items():
        if not parts[0].class_name:
            raise AnnotationError(
                f"{path}: Annotation[{index}] has no class in {class_attribute!r}; name the annotation layer in "
                "ImageScope, or set annotations.aperio_class to the attribute that holds the class"
            )
        positive = [p.geometry for p in parts if not p.negative]
        if not positive:
            raise AnnotationError(
                f"{parts[0].where}: Annotation[{index}] has only negative regions; "
                "a NegativeROA region cuts a hole in a positive region of the same annotation"
            )
        geometry = shapely.union_all(positive)
        holes = [p.geometry for p in parts if p.negative]
        if holes:
            geometry = polygonal(geometry.difference(shapely.union_all(holes)))
        if not geometry.is_empty:
            out.append(Region(parts[0].class_name, geometry))
    return out
