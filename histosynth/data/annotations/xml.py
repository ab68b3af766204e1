"""Parsing of the XML annotation formats (stdlib xml.etree: the files are small and local, and
the project needs no lxml/dlup for two fixed layouts): the element path used in error messages
and the numeric vertices of an element."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from histosynth.data.annotations.regions import AnnotationError


def parse_xml(path: str | Path, root_tag: str, fix: str) -> ET.Element:
    """The root element of an XML file, which must be `root_tag`."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise AnnotationError(f"{path}: not readable XML ({err}); {fix}") from None
    if root.tag != root_tag:
        raise AnnotationError(f"{path}: root element is <{root.tag}>, expected <{root_tag}>; {fix}")
    return root


def vertices(element: ET.Element, tag: str, where: str) -> np.ndarray:
    """(n, 2) float X, Y of the `tag` children (at any depth) of `element`, in document order
    (ASAP orders by its Order attribute, honoured when present)."""
    points = list(element.iter(tag))
    if points and all(p.get("Order") is not None for p in points):
        try:
            points.sort(key=lambda p: int(p.get("Order")))
        except ValueError:
            raise AnnotationError(f"{where}: a <{tag}> has a non-integer Order; fix or delete it") from None
    try:
        return np.array([(float(p.get("X")), float(p.get("Y"))) for p in points], float).reshape(-1, 2)
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: a <{tag}> lacks numeric X and Y attributes; fix or delete it") from None
