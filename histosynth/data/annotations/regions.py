"""The contract every annotation reader returns: a list of Regions (class name + valid polygonal
geometry in level-0 pixel coordinates), and the error type whose message names file, element and fix."""

from __future__ import annotations

from dataclasses import dataclass

import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry


class AnnotationError(ValueError):
    """Bad annotation input; message names the file, the element and the fix."""


@dataclass(frozen=True)
class Region:
    """One annotated region: its class name and a valid (Multi)Polygon in level-0 pixel coordinates."""

    class_name: str
    geometry: BaseGeometry


def polygonal(geom: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a geometry (a Polygon, a MultiPolygon, or an empty Polygon)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    polygons = [p for p in shapely.get_parts(geom) if isinstance(p, (Polygon, MultiPolygon)) and not p.is_empty]
    return shapely.union_all(polygons) if polygons else Polygon()


def checked_polygon(geom: BaseGeometry, where: str, what: str) -> tuple[BaseGeometry, bool]:
    """A valid polygonal geometry and whether it had to be repaired (shapely.make_valid); an
    empty one, or one with no area left after repair, is an error naming `where` (file and element)."""
    if geom.is_empty:
        raise AnnotationError(f"{where} has an empty {what}; redraw or delete it")
    if geom.is_valid:
        return geom, False
    repaired = polygonal(shapely.make_valid(geom))
    if repaired.is_empty:
        raise AnnotationError(f"{where} has an invalid {what} with no area left after repair; redraw or delete it")
    return repaired, True
