"""Procedural H&E-like demo slides: a pyramidal TIFF with QuPath-style region and nuclei GeoJSON.

One seed draws a scene in level-0 pixels: an irregular tissue outline; blood vessels (a wall ring
with flattened nuclei around a pale lumen holding red blood cells); inflammation foci of packed
immune nuclei; fat made of Voronoi adipocytes, one region holding a stroma island with a vessel;
and stromal nuclei everywhere else (histosynth.demo.scene). Physical sizes follow the requested
microns per pixel. Every pyramid level is then rendered tile by tile from that geometry (a
Beer-Lambert mix of haematoxylin, eosin and blood; histosynth.demo.render) and streamed into the
TIFF, so memory stays flat as slides grow.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import shapely
import tifffile
from shapely.geometry import Polygon
from tqdm import tqdm

from histosynth.demo.render import Renderer
from histosynth.demo.scene import DEMO_NUCLEUS_CLASSES, Scene, build_scene, outlines
from histosynth.files import atomic_file

_REGION_COLORS = {
    "Tissue": [80, 160, 80],
    "Blood vessel": [200, 30, 30],
    "Inflammation": [160, 90, 160],
    "Fat": [230, 200, 60],
}


def generate_demo_slide(
    tiff_path,
    regions_path,
    nuclei_path,
    *,
    size: int,
    mpp: float = 0.5,
    tile_size: int = 256,
    levels: int = 3,
    seed: int = 0,
    jpeg_quality: int = 90,
    progress: bool = True,
) -> dict:
    """Render one procedural slide tile by tile; write the pyramidal TIFF, its region GeoJSON and its
    nuclei GeoJSON. Returns a small summary dict (counts of features per class, nuclei per class,
    size, levels, seconds).

    The TIFF is square (`size` px at level 0), JPEG tiles of `tile_size`, `levels` levels each 4x
    smaller, with `mpp` in its resolution tags (OpenSlide reports it as openslide.mpp-x/y). All three
    files are written under temporary names and renamed only when everything succeeded.
    """
    if size < 256 or levels < 1 or tile_size < 16 or tile_size % 16 or mpp <= 0 or not 1 <= jpeg_quality <= 100:
        raise ValueError(
            f"bad demo slide parameters: size={size} (>= 256), levels={levels} (>= 1), "
            f"tile_size={tile_size} (multiple of 16), mpp={mpp} (> 0), jpeg_quality={jpeg_quality} (1-100)"
        )
    started = time.perf_counter()
    scene = build_scene(size, mpp, seed)
    with ExitStack() as stack:
        tiff_tmp, regions_tmp, nuclei_tmp = (
            stack.enter_context(atomic_file(p)) for p in (tiff_path, regions_path, nuclei_path)
        )
        _write_regions(regions_tmp, scene)
        _write_nuclei(nuclei_tmp, scene.nuclei)
        _write_tiff(
            tiff_tmp,
            scene,
            seed=seed,
            levels=levels,
            tile_size=tile_size,
            jpeg_quality=jpeg_quality,
            progress_name=Path(tiff_path).name if progress else None,
        )
    cls = np.bincount(scene.nuclei["cls"], minlength=len(DEMO_NUCLEUS_CLASSES))
    return {
        "size": size,
        "levels": levels,
        "mpp": mpp,
        "regions": {"Tissue": 1, "Blood vessel": len(scene.vessels), "Inflammation": 1, "Fat": len(scene.fat)},
        "inflammation_foci": len(scene.inflammation.geoms),
        "nuclei": {name: int(n) for name, n in zip(DEMO_NUCLEUS_CLASSES, cls)},
        "seconds": round(time.perf_counter() - started, 2),
    }


def _write_regions(path: Path, scene: Scene) -> None:
    """The region annotations as a QuPath-style FeatureCollection: tissue, vessels, inflammation, fat."""
    named = [
        ("Tissue", scene.tissue),
        *(("Blood vessel", v) for v, _ in scene.vessels),
        ("Inflammation", scene.inflammation),
        *(("Fat", f) for f in scene.fat),
    ]
    features = [
        {
            "type": "Feature",
            "geometry": _geometry(geom),
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": _REGION_COLORS[name]}},
        }
        for name, geom in named
    ]
    with open(path, "w") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh)


def _geometry(geom) -> dict:
    """GeoJSON geometry of a (Multi)Polygon, coordinates rounded to 0.01 px."""
    polygons = [
        [np.round(shapely.get_coordinates(ring), 2).tolist() for ring in (p.exterior, *p.interiors)]
        for p in shapely.get_parts(geom)
    ]
    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def _write_nuclei(path: Path, nuclei: np.ndarray) -> None:
    """Stream the nuclei as a FeatureCollection of ellipse polygons (ids from 1), a chunk at a time."""
    with open(path, "w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for start in range(0, len(nuclei), 4096):
            chunk = nuclei[start : start + 4096]
            for k, (ring, cls) in enumerate(zip(np.round(outlines(chunk), 2).tolist(), chunk["cls"].tolist())):
                feature = {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {
                        "objectType": "detection",
                        "classification": {"name": DEMO_NUCLEUS_CLASSES[cls]},
                        "id": start + k + 1,
                    },
                }
                fh.write(("," if start + k else "") + "\n" + json.dumps(feature))
        fh.write("\n]}\n")


def _write_tiff(
    path: Path, scene: Scene, *, seed: int, levels: int, tile_size: int, jpeg_quality: int, progress_name: str | None
) -> None:
    """Write the pyramid as successive top-level IFDs (level 0 first), each streamed tile by tile."""
    renderer = Renderer(scene, tile_size, seed)
    mpp = 1 / scene.px_per_um
    with tifffile.TiffWriter(path, bigtiff=scene.size**2 > 2**31) as tif:
        for level in range(levels):
            ds = 4**level
            width = math.ceil(scene.size / ds)
            across = math.ceil(width / tile_size)
            with tqdm(
                total=across**2, desc=f"{progress_name} level {level}", unit="tile", disable=progress_name is None
            ) as bar:
                tif.write(
                    renderer.tiles(level, across, bar),
                    shape=(width, width, 3),
                    dtype=np.uint8,
                    tile=(tile_size, tile_size),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": jpeg_quality},
                    subfiletype=1 if level else 0,
                    resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                    resolutionunit="CENTIMETER",
                    metadata=None,
                )
