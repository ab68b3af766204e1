"""The demo slide's scene, drawn from one seed in level-0 pixels: an irregular tissue outline; blood
vessels (a wall ring with flattened nuclei around a pale lumen holding red blood cells);
inflammation foci of packed immune nuclei; fat made of Voronoi adipocytes, one region holding a
stroma island with a vessel; and stromal nuclei everywhere else."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from scipy.spatial import cKDTree
from shapely.affinity import scale as scale_about
from shapely.geometry import MultiPolygon, Polygon

DEMO_REGION_CLASSES = ("Tissue", "Blood vessel", "Inflammation", "Fat")
DEMO_NUCLEUS_CLASSES = ("stromal", "immune", "blood")
STROMAL, IMMUNE, BLOOD = range(3)  # indices into DEMO_NUCLEUS_CLASSES
_OUTLINE_VERTICES = 20  # per nucleus polygon in the nuclei GeoJSON
_MAX_OVERLAP = 0.2  # largest share of the smaller nucleus that two nuclei may overlap
# Smallest area (um^2) of a drawn nucleus or red cell, per class: the nuclei detector's defaults
# (nuclei settings: min_area_um2, blood_min_area_um2), so every ground-truth object is detectable.
_MIN_AREA_UM2 = {STROMAL: 8.0, IMMUNE: 8.0, BLOOD: 12.0}
NUCLEUS = np.dtype(
    [("x", "f8"), ("y", "f8"), ("a", "f8"), ("b", "f8"), ("angle", "f8"), ("stain", "f8"), ("cls", "i1")]
)


@dataclass
class Scene:
    size: int
    px_per_um: float
    tissue: Polygon
    vessels: list[tuple[Polygon, Polygon]]  # (whole vessel, lumen)
    inflammation: MultiPolygon
    fat: list[Polygon]
    fat_sites: np.ndarray  # adipocyte centres (Voronoi sites), shape (n, 2)
    nuclei: np.ndarray  # NUCLEUS records
    fibre_angle: float  # main direction of the stromal collagen fibres
    salt: int  # seeds the value noise of the textures


def build_scene(size: int, mpp: float, seed: int) -> Scene:
    """Draw the whole scene from `seed`: regions placed apart from each other, then their nuclei."""
    rng = np.random.default_rng(seed)
    um = 1.0 / mpp
    tissue = _tissue_outline(rng, size)
    gap = min(10 * um, 0.01 * size)
    free = tissue.buffer(-gap)
    fat, vessels, nuclei = [], [], []

    def add_vessel(room, radius):
        outer, lumen, cells = _vessel(rng, room, radius, um)
        vessels.append((outer, lumen))
        nuclei.append(cells)
        return outer

    for i in range(rng.integers(1, 3)):
        radius = min(rng.uniform(250, 1500) * um, 0.13 * size)
        outline, _ = _place(rng, free, radius, wobble=0.2, aspect=rng.uniform(1, 1.6), vertices=240)
        free = free.difference(outline.buffer(gap))
        if i == 0:  # a stroma island holding a vessel: an interior ring in the Fat polygon
            island, _ = _place(rng, outline.buffer(-gap), 0.35 * radius, wobble=0.15)
            outline = outline.difference(island)
            add_vessel(island.buffer(-gap / 2), 0.6 * 0.35 * radius)
        fat.append(_snapped(outline))

    for _ in range(rng.integers(2, 6)):
        outer = add_vessel(free, min(rng.uniform(30, 250) * um, 0.05 * size))
        free = free.difference(outer.buffer(gap))

    foci = []
    for _ in range(rng.integers(2, 5)):
        focus, _ = _place(
            rng, free, min(rng.uniform(50, 300) * um, 0.06 * size), wobble=0.25, aspect=rng.uniform(1, 1.5)
        )
        foci.append(_snapped(focus))
        free = free.difference(focus.buffer(gap))
        nuclei.append(_immune_nuclei(rng, foci[-1], um))

    fibre_angle = rng.uniform(0, np.pi)
    salt = int(rng.integers(2**31))
    stroma = tissue.difference(shapely.union_all([v for v, _ in vessels] + foci + fat))
    nuclei.append(_stromal_nuclei(rng, stroma, um, fibre_angle, salt))
    fat_sites = _fat_sites(rng, fat, um)
    nuclei.append(_fat_nuclei(rng, fat, fat_sites, um))
    return Scene(
        size=size,
        px_per_um=um,
        tissue=tissue,
        vessels=vessels,
        inflammation=MultiPolygon(foci),
        fat=fat,
        fat_sites=fat_sites,
        nuclei=_drop_overlaps(np.concatenate(nuclei)),
        fibre_angle=fibre_angle,
        salt=salt,
    )


def _snapped(geom):
    """geom on a 0.01 px grid, as written to the GeoJSON, so rendering and annotations agree."""
    return shapely.set_precision(geom, 0.01)


def _blob(
    rng,
    cx: float,
    cy: float,
    radius: float,
    *,
    wobble: float,
    aspect: float = 1.0,
    harmonics: int = 5,
    vertices: int = 96,
) -> Polygon:
    """A random star-shaped blob around (cx, cy): a circle of `radius` whose radius varies by random
    low-frequency cosines (amplitude ~`wobble`), stretched by `aspect` and randomly rotated."""
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    k = np.arange(2, harmonics + 2)[:, None]
    amplitude = wobble * rng.uniform(0, 1, (harmonics, 1)) / k * 2
    phase = rng.uniform(0, 2 * np.pi, (harmonics, 1))
    r = radius * (1 + (amplitude * np.cos(k * t + phase)).sum(0))
    x, y = r * np.cos(t) * math.sqrt(aspect), r * np.sin(t) / math.sqrt(aspect)
    turn = rng.uniform(0, np.pi)
    c, s = math.cos(turn), math.sin(turn)
    return Polygon(np.c_[cx + c * x - s * y, cy + s * x + c * y])


def _tissue_outline(rng, size: int) -> Polygon:
    """An irregular blob centred on the slide, covering about 50-70 % of it."""
    unit = _blob(rng, 0, 0, 1.0, wobble=0.12, aspect=rng.uniform(1, 1.15), harmonics=10, vertices=720)
    minx, miny, maxx, maxy = unit.bounds
    scale = min(math.sqrt(rng.uniform(0.6, 0.72) * size**2 / unit.area), 0.97 * size / max(maxx - minx, maxy - miny))
    cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
    placed = shapely.affinity.affine_transform(unit, [scale, 0, 0, scale, size / 2 - scale * cx, size / 2 - scale * cy])
    return _snapped(placed)


def _sample(rng, geom, n: int) -> np.ndarray:
    """n points drawn uniformly inside geom, shape (n, 2)."""
    if n <= 0 or geom.is_empty or geom.area <= 0:
        return np.empty((0, 2))
    shapely.prepare(geom)
    minx, miny, maxx, maxy = geom.bounds
    fill = geom.area / ((maxx - minx) * (maxy - miny))
    found, count = [], 0
    while count < n:
        xy = rng.uniform((minx, miny), (maxx, maxy), (int(1.2 * (n - count) / fill) + 16, 2))
        xy = xy[shapely.contains_xy(geom, xy[:, 0], xy[:, 1])]
        found.append(xy)
        count += len(xy)
    return np.concatenate(found)[:n]


def _place(rng, free, radius: float, **shape) -> tuple[Polygon, tuple[float, float]]:
    """A random blob of about `radius` lying inside `free` (shrunk until one fits), and its centre."""
    for _ in range(12):
        for cx, cy in _sample(rng, free.buffer(-radius), 8):
            blob = _blob(rng, cx, cy, radius, **shape)
            if free.contains(blob):
                return blob, (cx, cy)
        radius *= 0.75
    raise ValueError("no room left on the demo slide for another feature; use a larger size")


def _ellipses(x, y, a, ratio, angle, stain, cls: int, um: float) -> np.ndarray:
    """Nucleus records: centre, semi-axes a and b = a * ratio (widened to the class's minimum area),
    orientation of a (radians), stain strength and class."""
    b = np.minimum(a, np.maximum(a * ratio, _MIN_AREA_UM2[cls] * um**2 / (np.pi * a)))
    out = np.empty(len(x), NUCLEUS)
    out["x"], out["y"], out["a"], out["b"], out["angle"], out["stain"], out["cls"] = x, y, a, b, angle, stain, cls
    return out


def _vessel(rng, free, radius: float, um: float) -> tuple[Polygon, Polygon, np.ndarray]:
    """A vessel inside `free`: the whole vessel, its lumen, and its wall nuclei and red blood cells."""
    outer, centre = _place(rng, free, radius, wobble=0.1, aspect=rng.uniform(1, 1.8))
    ratio = rng.uniform(0.55, 0.8)  # lumen / vessel size
    lumen = scale_about(outer, ratio, ratio, origin=centre)
    outer, lumen = _snapped(outer), _snapped(lumen)

    # flattened wall nuclei along the middle of the wall, lying along it
    midline = scale_about(outer, (1 + ratio) / 2, (1 + ratio) / 2, origin=centre).exterior
    along = np.arange(0, midline.length, rng.uniform(8, 14) * um)
    along = (along + rng.uniform(0, 4 * um, along.size)) % midline.length
    xy = shapely.get_coordinates(shapely.line_interpolate_point(midline, along))
    ahead = shapely.get_coordinates(shapely.line_interpolate_point(midline, (along + 1) % midline.length))
    wall = _ellipses(
        xy[:, 0],
        xy[:, 1],
        rng.uniform(2.5, 3.5, along.size) * um,
        rng.uniform(0.25, 0.4, along.size),
        np.arctan2(*(ahead - xy)[:, ::-1].T),
        rng.uniform(1.1, 1.5, along.size),
        STROMAL,
        um,
    )
    fits = shapely.contains(outer.difference(lumen), shapely.polygons(outlines(wall)))

    # red blood cells: small pale-centred red discs filling 5-30 % of the lumen
    room = lumen.buffer(-3 * um)
    n = int(rng.uniform(0.05, 0.3) * room.area / (np.pi * (2.5 * um) ** 2))
    xy = _sample(rng, room, n)
    red_cells = _ellipses(
        xy[:, 0],
        xy[:, 1],
        rng.uniform(2.1, 3, len(xy)) * um,
        rng.uniform(0.8, 1, len(xy)),
        rng.uniform(0, np.pi, len(xy)),
        rng.uniform(0.9, 1.2, len(xy)),
        BLOOD,
        um,
    )
    return outer, lumen, np.concatenate([wall[fits], red_cells])


def _immune_nuclei(rng, focus: Polygon, um: float) -> np.ndarray:
    """Small round dark nuclei packed on a jittered hexagonal lattice, thinning out towards the rim."""
    spacing = 3.9 * um
    minx, miny, maxx, maxy = focus.bounds
    rows = np.arange(miny, maxy, spacing * math.sqrt(3) / 2)
    cols = np.arange(minx, maxx, spacing)
    x = (cols[None, :] + spacing / 2 * (np.arange(rows.size) % 2)[:, None]).ravel()
    y = np.repeat(rows, cols.size)
    x, y = x + rng.uniform(-0.15, 0.15, x.size) * spacing, y + rng.uniform(-0.15, 0.15, y.size) * spacing
    inside = shapely.contains_xy(focus.buffer(-2.1 * um), x, y)
    x, y = x[inside], y[inside]
    depth = shapely.distance(focus.exterior, shapely.points(x, y)) / um
    keep = rng.random(x.size) < np.clip(0.45 + depth / 15, 0, 0.95)
    x, y, n = x[keep], y[keep], keep.sum()
    return _ellipses(
        x,
        y,
        rng.uniform(1.65, 2.1, n) * um,
        rng.uniform(0.85, 1, n),
        rng.uniform(0, np.pi, n),
        rng.uniform(1.3, 1.7, n),
        IMMUNE,
        um,
    )


def _stromal_nuclei(rng, stroma, um: float, fibre_angle: float, salt: int) -> np.ndarray:
    """Elongated nuclei of varied size, mostly along the fibres, denser in some places than others."""
    room = stroma.buffer(-3.5 * um)
    xy = _sample(rng, room, int(room.area / (300 * um**2)))
    density = value_noise(xy[:, 0] / (150 * um), xy[:, 1] / (150 * um), salt + 7)
    xy = xy[rng.random(len(xy)) < 0.1 + 0.9 * density]
    n = len(xy)
    return _ellipses(
        xy[:, 0],
        xy[:, 1],
        rng.uniform(2.2, 3.5, n) * um,
        rng.uniform(0.3, 0.75, n),
        fibre_angle + rng.normal(0, 0.35, n),
        rng.uniform(1.2, 1.6, n),
        STROMAL,
        um,
    )


def _fat_sites(rng, fat: list[Polygon], um: float) -> np.ndarray:
    """Adipocyte centres: a jittered square grid over each fat region (cells ~20-40 um across)."""
    sites = []
    for region in fat:
        cell = rng.uniform(24, 32) * um
        around = region.buffer(cell)
        minx, miny, maxx, maxy = around.bounds
        x, y = np.meshgrid(np.arange(minx, maxx, cell), np.arange(miny, maxy, cell))
        xy = np.c_[x.ravel(), y.ravel()] + rng.uniform(-0.35, 0.35, (x.size, 2)) * cell
        sites.append(xy[shapely.contains_xy(around, xy[:, 0], xy[:, 1])])
    return np.concatenate(sites)


def _fat_nuclei(rng, fat: list[Polygon], sites: np.ndarray, um: float) -> np.ndarray:
    """A few flattened nuclei on adipocyte membranes: halfway to the nearest neighbouring site, along the membrane."""
    _, nearest = cKDTree(sites).query(sites, k=2)
    chosen = rng.random(len(sites)) < 0.05
    here, there = sites[chosen], sites[nearest[chosen, 1]]
    xy = (here + there) / 2
    n = len(xy)
    nuclei = _ellipses(
        xy[:, 0],
        xy[:, 1],
        rng.uniform(2.5, 3.5, n) * um,
        rng.uniform(0.25, 0.4, n),
        np.arctan2(*(there - here)[:, ::-1].T) + np.pi / 2,
        rng.uniform(1.1, 1.4, n),
        STROMAL,
        um,
    )
    return nuclei[shapely.contains_xy(shapely.union_all(fat).buffer(-3.5 * um), xy[:, 0], xy[:, 1])]


# Points spread evenly over the unit disc (a sunflower spiral), to measure ellipse overlaps.
_DISC = np.sqrt((np.arange(48) + 0.5) / 48) * np.exp(1j * np.arange(48) * np.pi * (3 - math.sqrt(5)))


def _drop_overlaps(nuclei: np.ndarray) -> np.ndarray:
    """Drop each nucleus that overlaps an earlier one by more than _MAX_OVERLAP of the smaller one's area
    (even when that earlier one is dropped too: conservative, but a single vectorised pass)."""
    xy = np.c_[nuclei["x"], nuclei["y"]]
    i, j = cKDTree(xy).query_pairs(2 * nuclei["a"].max(), output_type="ndarray").T
    near = np.hypot(*(xy[i] - xy[j]).T) < nuclei["a"][i] + nuclei["a"][j]
    i, j = i[near], j[near]
    area = nuclei["a"] * nuclei["b"]
    small = np.where(area[i] <= area[j], i, j)
    big = i + j - small
    step = 2**13  # pairs per pass, bounding memory
    covered = np.concatenate(
        [[]]
        + [_share_inside(nuclei[small[k : k + step]], nuclei[big[k : k + step]]) for k in range(0, len(small), step)]
    )
    return np.delete(nuclei, np.unique(j[covered > _MAX_OVERLAP]))


def _share_inside(inner: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """For each pair, the share of the `inner` ellipse's area that lies inside the `outer` ellipse."""
    s, g = inner[:, None], outer[:, None]
    points = (s["x"] + 1j * s["y"]) + (s["a"] * _DISC.real + 1j * s["b"] * _DISC.imag) * np.exp(1j * s["angle"])
    local = (points - (g["x"] + 1j * g["y"])) * np.exp(-1j * g["angle"])
    return ((local.real / g["a"]) ** 2 + (local.imag / g["b"]) ** 2 <= 1).mean(1)


def outlines(nuclei: np.ndarray) -> np.ndarray:
    """Closed polygon rings of the nuclei ellipses, shape (n, _OUTLINE_VERTICES + 1, 2)."""
    t = np.linspace(0, 2 * np.pi, _OUTLINE_VERTICES, endpoint=False)
    t = np.append(t, 0)
    e = nuclei[:, None]
    ring = (e["x"] + 1j * e["y"]) + (e["a"] * np.cos(t) + 1j * e["b"] * np.sin(t)) * np.exp(1j * e["angle"])
    return np.stack([ring.real, ring.imag], axis=-1)


def hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic pseudo-random value in [0, 1) for each integer lattice point."""
    h = ix.astype(np.uint64) * np.uint64(0x9E3779B1) ^ iy.astype(np.uint64) * np.uint64(0x85EBCA77) ^ np.uint64(salt)
    h = (h ^ (h >> np.uint64(15))) * np.uint64(0x2C1B3C6D)
    h = (h ^ (h >> np.uint64(12))) * np.uint64(0x297A2D39)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / 2**24


def value_noise(u: np.ndarray, v: np.ndarray, salt: int) -> np.ndarray:
    """Smooth value noise in [0, 1] at (u, v) in lattice units (broadcast together)."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    top = hash01(iu, iv, salt) * (1 - fu) + hash01(iu + 1, iv, salt) * fu
    bottom = hash01(iu, iv + 1, salt) * (1 - fu) + hash01(iu + 1, iv + 1, salt) * fu
    return top * (1 - fv) + bottom * fv
