"""Painting label masks for slide windows from Regions (whatever format they were read from)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import shapely
from shapely.geometry import Polygon

from histosynth.data.annotations.regions import AnnotationError, Region, polygonal

log = logging.getLogger(__name__)


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
            pieces = [
                p for p in shapely.get_parts(shapely.union_all(geoms)) if isinstance(p, Polygon) and not p.is_empty
            ]
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
        inside = polygonal(region.geometry.intersection(slide))
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
