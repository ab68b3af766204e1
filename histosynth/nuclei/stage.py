"""Nuclei for a workflow stage: detector dispatch and resolution, patches of a slide and folders
of plain images."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.spatial import cKDTree
from tqdm import tqdm

from histosynth.data.slides import Slide
from histosynth.files import atomic_dir
from histosynth.nuclei.classical import detect_nuclei
from histosynth.nuclei.geojson import nuclei_geojson, nucleus_features
from histosynth.nuclei.instances import NucleiError, shape_table, write_instances
from histosynth.nuclei.model import MODEL_SETTINGS, NucleiModel, detect_with_model
from histosynth.parallel import map_chunks

log = logging.getLogger(__name__)


def detection_mpp(params: Mapping, source_mpp: float, model: NucleiModel | None = None) -> float:
    """Resolution detection runs at: the model's (the one it declares, else params["model_mpp"]),
    or for the classical detector params["mpp"] but never finer than the source."""
    if model is not None:
        return model.mpp or params["model_mpp"]
    return max(params["mpp"], source_mpp)


def detector_settings(nuclei: Mapping) -> dict:
    """The nuclei settings the configured detector reads: MODEL_SETTINGS when nuclei["model"] is
    set, else every other one (and model: None). `train` is in neither: it reaches a trained
    model's users through the model file. A rule's params hold these, so a changed setting of
    the detector not in use, or of training, reruns nothing."""
    if nuclei["model"]:
        return {key: nuclei[key] for key in MODEL_SETTINGS}
    return {"model": None} | {key: value for key, value in nuclei.items() if key not in (*MODEL_SETTINGS, "train")}


@functools.cache
def _note_classical_detector() -> None:
    log.info(
        "nuclei.model is not set: using the classical detector (colour deconvolution + watershed, heuristic classes)"
    )


def detect(
    rgb: np.ndarray, mpp: float, params: Mapping, model: NucleiModel | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Instances and table for an RGB image at `mpp`: the learned model when given (the image
    should then be at params["model_mpp"]), else the classical detector."""
    if model is None:
        _note_classical_detector()
        return detect_nuclei(rgb, mpp, params)
    expected = model.mpp or params["model_mpp"]
    if not math.isclose(mpp, expected, rel_tol=0.05):
        log.warning(
            "%s expects %.3f mpp but got an image at %.3f mpp; use segment_patch to resample", model.path, expected, mpp
        )
    return detect_with_model(rgb, model, params)


def rescale(rgb: np.ndarray, mpp: float, target_mpp: float) -> np.ndarray:
    """An RGB image at `mpp` resampled (Lanczos) to target_mpp; unchanged within 1 %."""
    if math.isclose(target_mpp, mpp, rel_tol=0.01):
        return rgb
    size = (max(1, round(rgb.shape[1] * mpp / target_mpp)), max(1, round(rgb.shape[0] * mpp / target_mpp)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def resize_instances(instances: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize keeping instance ids: each output pixel takes the input pixel under its centre."""
    rows, cols = out_shape
    h, w = instances.shape
    r = ((np.arange(rows) + 0.5) * h / rows).astype(np.intp)
    c = ((np.arange(cols) + 0.5) * w / cols).astype(np.intp)
    return instances[np.ix_(r, c)]


def segment_patch(
    rgb: np.ndarray, mpp: float, out_shape: tuple[int, int], params: Mapping, model: NucleiModel | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Detect nuclei in an RGB image at `mpp` (resampled to the detection mpp when it differs) and
    return uint16 instances on the out_shape = (rows, cols) grid with their table measured on that
    grid; ids are kept, and nuclei too small to survive the resize are dropped."""
    det_mpp = detection_mpp(params, mpp, model)
    instances, table = detect(rescale(rgb, mpp, det_mpp), det_mpp, params, model)
    if instances.shape == tuple(out_shape):
        return instances, table
    instances = resize_instances(instances, out_shape)
    resized = shape_table(instances)
    if resized.empty:
        return instances, resized
    carried = table.set_index("instance_id").loc[resized["instance_id"]]
    for column in ("class", "score", "hematoxylin"):
        resized[column] = carried[column].to_numpy()
    return instances, resized


def segment_slide_patches(
    index: pd.DataFrame,
    slide_path: str | Path,
    out_dir: str | Path,
    params: Mapping,
    model: NucleiModel | None = None,
    progress: bool = True,
    workers: int = 1,
) -> tuple[pd.DataFrame, dict]:
    """Segment nuclei in every patch of one slide's index (histosynth.data.io.read_patch_index).

    Each patch's window is read from the slide at the detection mpp, segmented, and its instances
    resized to the patch grid and written to out_dir/<patch_id>.png (uint16). Returns the
    per-nucleus table (patch grid pixel units, plus patch_id, slide_x/slide_y: the centroid in
    level-0 pixels, and `primary`: whether this patch's centre is the nearest to the nucleus,
    which holds when windows overlap) and a GeoJSON FeatureCollection of the primary nuclei in
    level-0 coordinates. The classical detector runs on `workers` processes (a model runs in this
    one: it parallelises itself); the outputs do not depend on their number.
    """
    if index.empty:
        raise NucleiError(f"{slide_path}: the patch index is empty; nothing to segment")
    slide_mpp = float(index["slide_mpp"].iloc[0])
    extent = (index["size"] * index["mpp"] / slide_mpp).to_numpy()  # level-0 window sides
    centres = np.column_stack([index["x"] + extent / 2, index["y"] + extent / 2])
    nearest = cKDTree(centres)
    rows = list(index.itertuples(index=False))
    workers = 1 if model is not None else workers
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp_dir:

        def segment(positions: range) -> tuple[list[pd.DataFrame], list[dict]]:
            """The tables and primary nuclei's features of rows[positions], their masks written."""
            tables, features = [], []
            with Slide(slide_path, mpp=slide_mpp) as slide:
                det_mpp = detection_mpp(params, slide.mpp, model)
                for position in positions:
                    row = rows[position]
                    read_size = max(1, round(row.size * row.mpp / det_mpp))
                    rgb = slide.read(row.x, row.y, extent[position], extent[position], (read_size, read_size))
                    instances, table = segment_patch(rgb, det_mpp, (row.size, row.size), params, model)
                    write_instances(instances, tmp_dir / f"{row.patch_id}.png")
                    scale = extent[position] / row.size
                    table.insert(0, "patch_id", row.patch_id)
                    table["slide_x"] = row.x + (table["centroid_x"] + 0.5) * scale
                    table["slide_y"] = row.y + (table["centroid_y"] + 0.5) * scale
                    table["primary"] = nearest.query(table[["slide_x", "slide_y"]].to_numpy(), p=np.inf)[1] == position
                    features += nucleus_features(instances, table[table["primary"]], row.x, row.y, scale, row.mpp)
                    tables.append(table)
            return tables, features

        tables, features = [], []
        for part_tables, part_features in map_chunks(
            segment, len(rows), workers, desc=f"{Path(slide_path).stem}: nuclei", progress=progress
        ):
            tables += part_tables
            features += part_features
    seconds = time.perf_counter() - started
    table = pd.concat(tables, ignore_index=True)
    log.info(
        "%s: %d nuclei in %d patches at %.3f mpp, %.1f s (%.1f patches/s, %d processes)",
        slide_path,
        len(table),
        len(index),
        detection_mpp(params, slide_mpp, model),
        seconds,
        len(index) / seconds,
        workers,
    )
    return table, nuclei_geojson(features)


def segment_images(
    paths: Iterable[str | Path],
    mpp: float,
    out_dir: str | Path,
    params: Mapping,
    model: NucleiModel | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Segment nuclei in plain RGB images (PNG, TIFF) at `mpp`; writes out_dir/<stem>.png
    (uint16 instances on each image's grid) and returns the per-nucleus table with an `image`
    column holding the stem."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise NucleiError(f"no images to segment for {out_dir}; give PNG or TIFF files")
    stems = [p.stem for p in paths]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise NucleiError(
            f"image names must be unique without their extension (outputs are <stem>.png); repeated: {repeated}"
        )
    tables = []
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp_dir:
        for path in tqdm(paths, desc="nuclei", unit="image", disable=not progress, mininterval=2):
            try:
                with Image.open(path) as image:
                    rgb = np.asarray(image.convert("RGB"))
            except OSError as err:
                raise NucleiError(f"{path}: cannot read the image ({err}); give RGB PNG or TIFF files") from err
            instances, table = segment_patch(rgb, mpp, rgb.shape[:2], params, model)
            write_instances(instances, tmp_dir / f"{path.stem}.png")
            table.insert(0, "image", path.stem)
            tables.append(table)
    seconds = time.perf_counter() - started
    log.info("%d images segmented in %.1f s (%.1f images/s)", len(paths), seconds, len(paths) / seconds)
    return pd.concat(tables, ignore_index=True)
