"""Procedural H&E-like demo slides: a pyramidal TIFF with QuPath-style region and nuclei GeoJSON.

One seed draws a scene in level-0 pixels: an irregular tissue outline; blood vessels (a wall ring
with flattened nuclei around a pale lumen holding red blood cells); inflammation foci of packed
immune nuclei; fat made of Voronoi adipocytes, one region holding a stroma island with a vessel;
and stromal nuclei everywhere else. Physical sizes follow the requested microns per pixel.
Every pyramid level is then rendered tile by tile from that geometry (a Beer-Lambert mix of
haematoxylin, eosin and blood) and streamed into the TIFF, so memory stays flat as slides grow.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
import tifffile
from scipy.spatial import cKDTree
from shapely.affinity import scale as scale_about
from shapely.geometry import MultiPolygon, Polygon
from skimage.draw import polygon as fill_polygon
from tqdm import tqdm

from histosynth.files import atomic_file

DEMO_REGION_CLASSES = ("Tissue", "Blood vessel", "Inflammation", "Fat")
DEMO_NUCLEUS_CLASSES = ("stromal", "immune", "blood")

_REGION_COLORS = {"Tissue": [80, 160, 80], "Blood vessel": [200, 30, 30], "Inflammation": [160, 90, 160], "Fat": [230, 200, 60]}
_STROMAL, _IMMUNE, _BLOOD = range(3)  # indices into DEMO_NUCLEUS_CLASSES

# Optical density (R, G, B) of one unit of each stain, and of the glass and mounting medium.
_HAEMATOXYLIN = np.array([0.56, 0.72, 0.41])
_EOSIN = np.array([0.20, 0.80, 0.52])
_RED_CELL = np.array([0.17, 0.95, 0.80])
_GLASS_OD = 0.06  # 255 * exp(-0.06) = 240

_OUTLINE_VERTICES = 20  # per nucleus polygon in the nuclei GeoJSON
_MAX_OVERLAP = 0.2  # largest share of the smaller nucleus that two nuclei may overlap
# Level-0 nuclei are sampled at pixel centres (so pixels match the GeoJSON polygons); coarser
# levels average up to this many subsamples per pixel side, so small nuclei do not alias away.
_MAX_SUBSAMPLES = 4

# Smallest area (um^2) of a drawn nucleus or red cell, per class: the nuclei detector's defaults
# (nuclei settings: min_area_um2, blood_min_area_um2), so every ground-truth object is detectable.
_MIN_AREA_UM2 = {_STROMAL: 8.0, _IMMUNE: 8.0, _BLOOD: 12.0}

_NUCLEUS = np.dtype([("x", "f8"), ("y", "f8"), ("a", "f8"), ("b", "f8"), ("angle", "f8"), ("stain", "f8"), ("cls", "i1")])


def generate_demo_slide(tiff_path, regions_path, nuclei_path, *, size: int, mpp: float = 0.5,
                        tile_size: int = 256, levels: int = 3, seed: int = 0,
                        jpeg_quality: int = 90, progress: bool = True) -> dict:
    """Render one procedural slide tile by tile; write the pyramidal TIFF, its region GeoJSON and its
    nuclei GeoJSON. Returns a small summary dict (counts of features per class, nuclei per class,
    size, levels, seconds).

    The TIFF is square (`size` px at level 0), JPEG tiles of `tile_size`, `levels` levels each 4x
    smaller, with `mpp` in its resolution tags (OpenSlide reports it as openslide.mpp-x/y). All three
    files are written under temporary names and renamed only when everything succeeded.
    """
    if size < 256 or levels < 1 or tile_size < 16 or tile_size % 16 or mpp <= 0 or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"bad demo slide parameters: size={size} (>= 256), levels={levels} (>= 1), "
                         f"tile_size={tile_size} (multiple of 16), mpp={mpp} (> 0), jpeg_quality={jpeg_quality} (1-100)")
    started = time.perf_counter()
    scene = _build_scene(size, mpp, seed)
    with ExitStack() as stack:
        tiff_tmp, regions_tmp, nuclei_tmp = (stack.enter_context(atomic_file(p)) for p in (tiff_path, regions_path, nuclei_path))
        _write_regions(regions_tmp, scene)
        _write_nuclei(nuclei_tmp, scene.nuclei)
        _write_tiff(tiff_tmp, scene, seed=seed, levels=levels, tile_size=tile_size, jpeg_quality=jpeg_quality,
                    progress_name=Path(tiff_path).name if progress else None)
    cls = np.bincount(scene.nuclei["cls"], minlength=len(DEMO_NUCLEUS_CLASSES))
    return {
        "size": size, "levels": levels, "mpp": mpp,
        "regions": {"Tissue": 1, "Blood vessel": len(scene.vessels), "Inflammation": 1, "Fat": len(scene.fat)},
        "inflammation_foci": len(scene.inflammation.geoms),
        "nuclei": {name: int(n) for name, n in zip(DEMO_NUCLEUS_CLASSES, cls)},
        "seconds": round(time.perf_counter() - started, 2),
    }


# ---------------------------------------------------------------------------------------------
# Scene: every shape and nucleus in level-0 pixels


@dataclass
class _Scene:
    size: int
    px_per_um: float
    tissue: Polygon
    vessels: list[tuple[Polygon, Polygon]]  # (whole vessel, lumen)
    inflammation: MultiPolygon
    fat: list[Polygon]
    fat_sites: np.ndarray  # adipocyte centres (Voronoi sites), shape (n, 2)
    nuclei: np.ndarray  # _NUCLEUS records
    fibre_angle: float  # main direction of the stromal collagen fibres
    salt: int  # seeds the value noise of the textures


def _build_scene(size: int, mpp: float, seed: int) -> _Scene:
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
        focus, _ = _place(rng, free, min(rng.uniform(50, 300) * um, 0.06 * size), wobble=0.25, aspect=rng.uniform(1, 1.5))
        foci.append(_snapped(focus))
        free = free.difference(focus.buffer(gap))
        nuclei.append(_immune_nuclei(rng, foci[-1], um))

    fibre_angle = rng.uniform(0, np.pi)
    salt = int(rng.integers(2**31))
    stroma = tissue.difference(shapely.union_all([v for v, _ in vessels] + foci + fat))
    nuclei.append(_stromal_nuclei(rng, stroma, um, fibre_angle, salt))
    fat_sites = _fat_sites(rng, fat, um)
    nuclei.append(_fat_nuclei(rng, fat, fat_sites, um))
    return _Scene(size=size, px_per_um=um, tissue=tissue, vessels=vessels, inflammation=MultiPolygon(foci), fat=fat,
                  fat_sites=fat_sites, nuclei=_drop_overlaps(np.concatenate(nuclei)), fibre_angle=fibre_angle, salt=salt)


def _snapped(geom):
    """geom on a 0.01 px grid, as written to the GeoJSON, so rendering and annotations agree."""
    return shapely.set_precision(geom, 0.01)


def _blob(rng, cx: float, cy: float, radius: float, *, wobble: float, aspect: float = 1.0,
          harmonics: int = 5, vertices: int = 96) -> Polygon:
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
    out = np.empty(len(x), _NUCLEUS)
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
    wall = _ellipses(xy[:, 0], xy[:, 1], rng.uniform(2.5, 3.5, along.size) * um, rng.uniform(0.25, 0.4, along.size),
                     np.arctan2(*(ahead - xy)[:, ::-1].T), rng.uniform(1.1, 1.5, along.size), _STROMAL, um)
    fits = shapely.contains(outer.difference(lumen), shapely.polygons(_outlines(wall)))

    # red blood cells: small pale-centred red discs filling 5-30 % of the lumen
    room = lumen.buffer(-3 * um)
    n = int(rng.uniform(0.05, 0.3) * room.area / (np.pi * (2.5 * um) ** 2))
    xy = _sample(rng, room, n)
    red_cells = _ellipses(xy[:, 0], xy[:, 1], rng.uniform(2.1, 3, len(xy)) * um, rng.uniform(0.8, 1, len(xy)),
                          rng.uniform(0, np.pi, len(xy)), rng.uniform(0.9, 1.2, len(xy)), _BLOOD, um)
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
    return _ellipses(x, y, rng.uniform(1.65, 2.1, n) * um, rng.uniform(0.85, 1, n), rng.uniform(0, np.pi, n),
                     rng.uniform(1.3, 1.7, n), _IMMUNE, um)


def _stromal_nuclei(rng, stroma, um: float, fibre_angle: float, salt: int) -> np.ndarray:
    """Elongated nuclei of varied size, mostly along the fibres, denser in some places than others."""
    room = stroma.buffer(-3.5 * um)
    xy = _sample(rng, room, int(room.area / (300 * um**2)))
    density = _value_noise(xy[:, 0] / (150 * um), xy[:, 1] / (150 * um), salt + 7)
    xy = xy[rng.random(len(xy)) < 0.1 + 0.9 * density]
    n = len(xy)
    return _ellipses(xy[:, 0], xy[:, 1], rng.uniform(2.2, 3.5, n) * um, rng.uniform(0.3, 0.75, n),
                     fibre_angle + rng.normal(0, 0.35, n), rng.uniform(1.2, 1.6, n), _STROMAL, um)


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
    nuclei = _ellipses(xy[:, 0], xy[:, 1], rng.uniform(2.5, 3.5, n) * um, rng.uniform(0.25, 0.4, n),
                       np.arctan2(*(there - here)[:, ::-1].T) + np.pi / 2, rng.uniform(1.1, 1.4, n), _STROMAL, um)
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
    covered = np.concatenate([[]] + [_share_inside(nuclei[small[k:k + step]], nuclei[big[k:k + step]])
                                     for k in range(0, len(small), step)])
    return np.delete(nuclei, np.unique(j[covered > _MAX_OVERLAP]))


def _share_inside(inner: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """For each pair, the share of the `inner` ellipse's area that lies inside the `outer` ellipse."""
    s, g = inner[:, None], outer[:, None]
    points = (s["x"] + 1j * s["y"]) + (s["a"] * _DISC.real + 1j * s["b"] * _DISC.imag) * np.exp(1j * s["angle"])
    local = (points - (g["x"] + 1j * g["y"])) * np.exp(-1j * g["angle"])
    return ((local.real / g["a"]) ** 2 + (local.imag / g["b"]) ** 2 <= 1).mean(1)


def _outlines(nuclei: np.ndarray) -> np.ndarray:
    """Closed polygon rings of the nuclei ellipses, shape (n, _OUTLINE_VERTICES + 1, 2)."""
    t = np.linspace(0, 2 * np.pi, _OUTLINE_VERTICES, endpoint=False)
    t = np.append(t, 0)
    e = nuclei[:, None]
    ring = (e["x"] + 1j * e["y"]) + (e["a"] * np.cos(t) + 1j * e["b"] * np.sin(t)) * np.exp(1j * e["angle"])
    return np.stack([ring.real, ring.imag], axis=-1)


# ---------------------------------------------------------------------------------------------
# Output files


def _write_regions(path: Path, scene: _Scene) -> None:
    """The region annotations as a QuPath-style FeatureCollection: tissue, vessels, inflammation, fat."""
    named = [("Tissue", scene.tissue), *(("Blood vessel", v) for v, _ in scene.vessels),
             ("Inflammation", scene.inflammation), *(("Fat", f) for f in scene.fat)]
    features = [{"type": "Feature", "geometry": _geometry(geom),
                 "properties": {"objectType": "annotation", "classification": {"name": name, "color": _REGION_COLORS[name]}}}
                for name, geom in named]
    with open(path, "w") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh)


def _geometry(geom) -> dict:
    """GeoJSON geometry of a (Multi)Polygon, coordinates rounded to 0.01 px."""
    polygons = [[np.round(shapely.get_coordinates(ring), 2).tolist() for ring in (p.exterior, *p.interiors)]
                for p in shapely.get_parts(geom)]
    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def _write_nuclei(path: Path, nuclei: np.ndarray) -> None:
    """Stream the nuclei as a FeatureCollection of ellipse polygons (ids from 1), a chunk at a time."""
    with open(path, "w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for start in range(0, len(nuclei), 4096):
            chunk = nuclei[start:start + 4096]
            for k, (ring, cls) in enumerate(zip(np.round(_outlines(chunk), 2).tolist(), chunk["cls"].tolist())):
                feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                           "properties": {"objectType": "detection", "classification": {"name": DEMO_NUCLEUS_CLASSES[cls]},
                                          "id": start + k + 1}}
                fh.write(("," if start + k else "") + "\n" + json.dumps(feature))
        fh.write("\n]}\n")


def _write_tiff(path: Path, scene: _Scene, *, seed: int, levels: int, tile_size: int, jpeg_quality: int,
                progress_name: str | None) -> None:
    """Write the pyramid as successive top-level IFDs (level 0 first), each streamed tile by tile."""
    renderer = _Renderer(scene, tile_size, seed)
    mpp = 1 / scene.px_per_um
    with tifffile.TiffWriter(path, bigtiff=scene.size**2 > 2**31) as tif:
        for level in range(levels):
            ds = 4**level
            width = math.ceil(scene.size / ds)
            across = math.ceil(width / tile_size)
            with tqdm(total=across**2, desc=f"{progress_name} level {level}", unit="tile", disable=progress_name is None) as bar:
                tif.write(renderer.tiles(level, across, bar), shape=(width, width, 3), dtype=np.uint8,
                          tile=(tile_size, tile_size), photometric="rgb", compression="jpeg",
                          compressionargs={"level": jpeg_quality}, subfiletype=1 if level else 0,
                          resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER", metadata=None)


# ---------------------------------------------------------------------------------------------
# Rendering


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic pseudo-random value in [0, 1) for each integer lattice point."""
    h = ix.astype(np.uint64) * np.uint64(0x9E3779B1) ^ iy.astype(np.uint64) * np.uint64(0x85EBCA77) ^ np.uint64(salt)
    h = (h ^ (h >> np.uint64(15))) * np.uint64(0x2C1B3C6D)
    h = (h ^ (h >> np.uint64(12))) * np.uint64(0x297A2D39)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / 2**24


def _value_noise(u: np.ndarray, v: np.ndarray, salt: int) -> np.ndarray:
    """Smooth value noise in [0, 1] at (u, v) in lattice units (broadcast together)."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    top = _hash01(iu, iv, salt) * (1 - fu) + _hash01(iu + 1, iv, salt) * fu
    bottom = _hash01(iu, iv + 1, salt) * (1 - fu) + _hash01(iu + 1, iv + 1, salt) * fu
    return top * (1 - fv) + bottom * fv


def _mask(geom, x0: int, y0: int, ds: int, n: int) -> np.ndarray:
    """Pixels of the n x n tile at level pixel (x0, y0) (downsample ds) whose centres lie inside geom."""
    if geom.contains(shapely.box(x0 * ds, y0 * ds, (x0 + n) * ds, (y0 + n) * ds)):
        return np.ones((n, n), bool)
    mask = np.zeros((n, n), bool)
    for part in shapely.get_parts(shapely.clip_by_rect(geom, (x0 - 1) * ds, (y0 - 1) * ds, (x0 + n + 1) * ds, (y0 + n + 1) * ds)):
        if not isinstance(part, Polygon):
            continue
        for k, ring in enumerate((part.exterior, *part.interiors)):
            xy = shapely.get_coordinates(ring) / ds - (x0 + 0.5, y0 + 0.5)
            rows, cols = fill_polygon(xy[:, 1], xy[:, 0], (n, n))
            mask[rows, cols] = k == 0
    return mask


def _paint_ellipses(nuclei: np.ndarray, x0: int, y0: int, ds: int, n: int) -> np.ndarray:
    """Each ellipse's stain, darker towards its rim, times its coverage of each pixel of the n x n
    tile at level pixel (x0, y0) of a level with downsample ds."""
    out = np.zeros(n * n)
    if len(nuclei) == 0:
        return out.reshape(n, n)
    s = min(ds, _MAX_SUBSAMPLES)
    sub = (np.arange(s) + 0.5) / s
    reach = int(np.ceil(nuclei["a"].max() / ds)) + 1
    offsets = np.arange(-reach, reach + 1)
    w = offsets.size
    step = max(1, 2**19 // (w * w * s * s))
    for start in range(0, len(nuclei), step):
        e = nuclei[start:start + step]
        cols = np.floor(e["x"] / ds).astype(np.int64)[:, None] + offsets  # (m, w)
        rows = np.floor(e["y"] / ds).astype(np.int64)[:, None] + offsets
        dx = ((cols[:, :, None] + sub) * ds - e["x"][:, None, None])[:, None, None, :, :]  # (m, 1, 1, w, s)
        dy = ((rows[:, :, None] + sub) * ds - e["y"][:, None, None])[:, :, :, None, None]  # (m, w, s, 1, 1)
        angle, a, b = (e[k].reshape(-1, 1, 1, 1, 1) for k in ("angle", "a", "b"))
        c, si = np.cos(angle), np.sin(angle)
        q = ((dx * c + dy * si) / a) ** 2 + ((dy * c - dx * si) / b) ** 2
        value = np.where(q <= 1, 0.7 + 0.45 * q, 0).mean(axis=(2, 4)) * e["stain"][:, None, None]  # (m, w, w)
        r, k = rows - y0, cols - x0
        ok = ((r >= 0) & (r < n))[:, :, None] & ((k >= 0) & (k < n))[:, None, :] & (value > 0)
        out += np.bincount((r[:, :, None] * n + k[:, None, :])[ok], value[ok], minlength=n * n)
    return out.reshape(n, n)


class _Renderer:
    """Renders any tile of any level from the scene geometry, touching only what intersects it."""

    def __init__(self, scene: _Scene, tile_size: int, seed: int):
        self.scene, self.n, self.seed = scene, tile_size, seed
        nuclei = scene.nuclei
        self.nuclei_tree = cKDTree(np.c_[nuclei["x"], nuclei["y"]])
        self.reach = nuclei["a"].max()
        self.fat_tree = cKDTree(scene.fat_sites)
        for geom in (scene.tissue, scene.inflammation, *scene.fat, *(g for v in scene.vessels for g in v)):
            shapely.prepare(geom)

    def tiles(self, level: int, across: int, bar: tqdm) -> Iterator[np.ndarray]:
        """The tiles of `level` (`across` x `across`) in TIFF order, row by row, advancing `bar`."""
        for ty, tx in itertools.product(range(across), repeat=2):
            tile = self.tile(level, tx, ty)
            bar.update()
            yield tile

    def tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        """RGB uint8 tile (tx, ty) of `level`."""
        n, ds = self.n, 4**level
        x0, y0 = tx * n, ty * n
        box = shapely.box(x0 * ds, y0 * ds, (x0 + n) * ds, (y0 + n) * ds)
        od = np.full((n, n, 3), _GLASS_OD)
        if self.scene.tissue.intersects(box):
            tissue = _mask(self.scene.tissue, x0, y0, ds, n)
            eosin, haem, blood = self._stains(tissue, box, x0, y0, ds)
            od += eosin[..., None] * _EOSIN + haem[..., None] * _HAEMATOXYLIN + blood[..., None] * _RED_CELL
        noise = np.random.default_rng([self.seed, level, ty, tx]).normal(0, 1.5, (n, n, 3))
        return np.clip(255 * np.exp(-od) + noise, 0, 255).round().astype(np.uint8)

    def _stains(self, tissue, box, x0, y0, ds):
        """Eosin, haematoxylin and red-cell stain amounts over the tile."""
        scene, n, um = self.scene, self.n, self.scene.px_per_um
        x = (x0 + np.arange(n) + 0.5)[None, :] * ds  # level-0 coordinates of the pixel centres
        y = (y0 + np.arange(n) + 0.5)[:, None] * ds
        fibre = self._fibre(x, y, ds)
        patch = _value_noise(x / (300 * um), y / (300 * um), scene.salt + 1)
        eosin = np.where(tissue, (0.55 + 0.4 * patch) * (0.3 + 0.9 * fibre), 0.0)
        haem = np.where(tissue, 0.04, 0.0)
        if scene.inflammation.intersects(box):
            foci = _mask(scene.inflammation, x0, y0, ds, n)
            eosin[foci] *= 0.7
            haem[foci] += 0.1
        for outer, lumen in scene.vessels:
            if outer.intersects(box):
                whole, inner = _mask(outer, x0, y0, ds, n), _mask(lumen, x0, y0, ds, n)
                wall = whole & ~inner
                eosin[wall] = (0.9 + 0.6 * fibre)[wall]
                haem[wall] = 0.06
                eosin[inner] = (0.03 + 0.08 * patch)[inner]
                haem[inner] = 0
        for region in scene.fat:
            if region.intersects(box):
                fat = _mask(region, x0, y0, ds, n)
                eosin[fat] = 0.9 * self._membranes(np.broadcast_to(x, (n, n))[fat], np.broadcast_to(y, (n, n))[fat], ds)
                haem[fat] = 0
        near = self.nuclei_tree.query_ball_point(((x0 + n / 2) * ds, (y0 + n / 2) * ds), n * ds / 2 + self.reach, p=np.inf)
        nuclei = self.scene.nuclei[np.sort(np.asarray(near, dtype=np.int64))]
        blood = nuclei["cls"] == _BLOOD
        chromatin = 0.75 + 0.5 * self._detail(_value_noise(x / (0.8 * um), y / (0.8 * um), scene.salt + 2), 0.8 * um / ds)
        haem += _paint_ellipses(nuclei[~blood], x0, y0, ds, n) * chromatin
        return eosin, haem, _paint_ellipses(nuclei[blood], x0, y0, ds, n)

    @staticmethod
    def _detail(noise, feature_px: float):
        """Fade noise towards its mean where its features are finer than a pixel (no aliasing speckle)."""
        return 0.5 + min(1.0, feature_px) * (noise - 0.5)

    def _fibre(self, x, y, ds) -> np.ndarray:
        """Wavy collagen fibres along the scene's fibre direction, in [0, 1]."""
        scene, um = self.scene, self.scene.px_per_um
        c, s = math.cos(scene.fibre_angle), math.sin(scene.fibre_angle)
        warp = _value_noise(x / (80 * um), y / (80 * um), scene.salt + 3)
        u, v = x * c + y * s, -x * s + y * c + 40 * um * warp
        fine = self._detail(_value_noise(u / (25 * um), v / (2.5 * um), scene.salt + 4), 2.5 * um / ds)
        coarse = self._detail(_value_noise(u / (70 * um), v / (8 * um), scene.salt + 5), 8 * um / ds)
        return np.clip(0.5 + 1.5 * (0.6 * fine + 0.4 * coarse - 0.5), 0, 1)

    def _membranes(self, x, y, ds) -> np.ndarray:
        """Adipocyte membrane coverage (0-1) at level-0 points: near the bisector of their two nearest sites."""
        sites = self.scene.fat_sites
        points = np.c_[x, y]
        _, nearest = self.fat_tree.query(points, k=2)
        p, q = sites[nearest[:, 0]], sites[nearest[:, 1]]
        distance = np.abs(((points - (p + q) / 2) * (q - p)).sum(1)) / np.hypot(*(q - p).T)
        return np.clip((0.8 * self.scene.px_per_um - distance) / ds + 0.5, 0, 1)
