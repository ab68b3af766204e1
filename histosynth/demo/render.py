"""Rendering of the demo slide: any tile of any pyramid level painted from the scene geometry
(a Beer-Lambert mix of haematoxylin, eosin and blood), touching only what intersects it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import shapely
from scipy.spatial import cKDTree
from shapely.geometry import Polygon
from skimage.draw import polygon as fill_polygon
from tqdm import tqdm

from histosynth.demo.scene import BLOOD, Scene, value_noise

# Optical density (R, G, B) of one unit of each stain, and of the glass and mounting medium.
_HAEMATOXYLIN = np.array([0.56, 0.72, 0.41])
_EOSIN = np.array([0.20, 0.80, 0.52])
_RED_CELL = np.array([0.17, 0.95, 0.80])
_GLASS_OD = 0.06  # 255 * exp(-0.06) = 240
# Level-0 nuclei are sampled at pixel centres (so pixels match the GeoJSON polygons); coarser
# levels average up to this many subsamples per pixel side, so small nuclei do not alias away.
_MAX_SUBSAMPLES = 4


def _mask(geom, x0: int, y0: int, ds: int, n: int) -> np.ndarray:
    """Pixels of the n x n tile at level pixel (x0, y0) (downsample ds) whose centres lie inside geom."""
    if geom.contains(shapely.box(x0 * ds, y0 * ds, (x0 + n) * ds, (y0 + n) * ds)):
        return np.ones((n, n), bool)
    mask = np.zeros((n, n), bool)
    for part in shapely.get_parts(
        shapely.clip_by_rect(geom, (x0 - 1) * ds, (y0 - 1) * ds, (x0 + n + 1) * ds, (y0 + n + 1) * ds)
    ):
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
        e = nuclei[start : start + step]
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


class Renderer:
    """Renders any tile of any level from the scene geometry, touching only what intersects it."""

    def __init__(self, scene: Scene, tile_size: int, seed: int):
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
        patch = value_noise(x / (300 * um), y / (300 * um), scene.salt + 1)
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
        near = self.nuclei_tree.query_ball_point(
            ((x0 + n / 2) * ds, (y0 + n / 2) * ds), n * ds / 2 + self.reach, p=np.inf
        )
        nuclei = self.scene.nuclei[np.sort(np.asarray(near, dtype=np.int64))]
        blood = nuclei["cls"] == BLOOD
        chromatin = 0.75 + 0.5 * self._detail(
            value_noise(x / (0.8 * um), y / (0.8 * um), scene.salt + 2), 0.8 * um / ds
        )
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
        warp = value_noise(x / (80 * um), y / (80 * um), scene.salt + 3)
        u, v = x * c + y * s, -x * s + y * c + 40 * um * warp
        fine = self._detail(value_noise(u / (25 * um), v / (2.5 * um), scene.salt + 4), 2.5 * um / ds)
        coarse = self._detail(value_noise(u / (70 * um), v / (8 * um), scene.salt + 5), 8 * um / ds)
        return np.clip(0.5 + 1.5 * (0.6 * fine + 0.4 * coarse - 0.5), 0, 1)

    def _membranes(self, x, y, ds) -> np.ndarray:
        """Adipocyte membrane coverage (0-1) at level-0 points: near the bisector of their two nearest sites."""
        sites = self.scene.fat_sites
        points = np.c_[x, y]
        _, nearest = self.fat_tree.query(points, k=2)
        p, q = sites[nearest[:, 0]], sites[nearest[:, 1]]
        distance = np.abs(((points - (p + q) / 2) * (q - p)).sum(1)) / np.hypot(*(q - p).T)
        return np.clip((0.8 * self.scene.px_per_um - distance) / ds + 0.5, 0, 1)
