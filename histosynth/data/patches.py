"""Patch extraction: a sliding window over the tissue of one slide at a target mpp, keeping
windows with enough tissue (and enough target label), writing image and label-mask PNGs, an
index table and a QC thumbnail. Streams: only one window's pixels are in memory at a time."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from histosynth.data.annotations import RegionRasterizer, class_fractions, load_regions
from histosynth.data.io import arrow_table, write_png
from histosynth.data.qc_thumbnail import qc_thumbnail
from histosynth.data.slides import Slide
from histosynth.data.tissue import Tissue, detect_tissue, detection_mpp
from histosynth.files import atomic_dir, atomic_file

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

INDEX_BATCH = 4096  # index rows per parquet row group


class PatchError(RuntimeError):
    """A slide that yields no patches; the message says which threshold removed them."""


def class_indices(names: list[str]) -> dict[str, int]:
    """Mask value of each label class: the n-th configured name gets n (0 is background)."""
    return {name: i + 1 for i, name in enumerate(names)}


def fraction_column(class_name: str) -> str:
    """Index column holding a class's pixel fraction, e.g. 'Blood vessel' -> 'frac_blood_vessel'."""
    return "frac_" + re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


def dominant_class(table: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Per row, 1 + the position of the region class covering most of the patch, 0 when none does;
    the label of the diffusion model's class embedding (num_classes = len(classes) + 1)."""
    fractions = table[[fraction_column(name) for name in classes]].to_numpy()
    return np.where(fractions.max(axis=1) > 0, fractions.argmax(axis=1) + 1, 0)


def fraction_columns(mask: np.ndarray, classes: dict[str, int]) -> dict[str, float]:
    """A label mask's frac_<class> index values (annotations.class_fractions under their column names)."""
    return {fraction_column(name): value for name, value in class_fractions(mask, classes).items()}


def keep_window(tissue_fraction: float, label_fraction: float | None, min_tissue: float, min_label: float) -> bool:
    """The thesis rule: keep when tissue >= min_tissue and, with a target class, its fraction >= min_label."""
    if tissue_fraction < min_tissue:
        return False
    return label_fraction is None or label_fraction >= min_label


def window_origins(extent: int, window: float, stride: float) -> np.ndarray:
    """Whole-pixel level-0 offsets of the windows along one axis that fit entirely inside [0, extent)."""
    if window > extent:
        return np.empty(0, np.int64)
    count = int(math.floor((extent - window) / stride + 1e-9)) + 1
    return np.floor(np.arange(count) * stride + 1e-9).astype(np.int64)


class TissueMap:
    """A low-resolution tissue mask and the per-window lookup the scan needs."""

    def __init__(self, mask: np.ndarray, scale: float, detection: Tissue | None = None):
        self.mask = mask
        self.scale = scale  # mask pixels per level-0 pixel
        self.detection = detection  # how the mask was found (None: given)

    def fraction(self, x: float, y: float, extent: float, size: int) -> float:
        """The tissue fraction of a size x size patch over the level-0 window: the share of its
        pixel centres that fall on tissue. A window covers few mask pixels, so each is counted
        once with the number of centres on it rather than looked up per centre."""
        centres = (np.arange(size) + 0.5) * (extent / size)
        h, w = self.mask.shape
        rows, row_counts = np.unique(
            np.minimum(((y + centres) * self.scale).astype(np.int64), h - 1), return_counts=True
        )
        cols, col_counts = np.unique(
            np.minimum(((x + centres) * self.scale).astype(np.int64), w - 1), return_counts=True
        )
        on_tissue = row_counts @ self.mask[np.ix_(rows, cols)].astype(np.int64) @ col_counts
        return float(on_tissue) / (size * size)


def build_tissue_map(
    slide: Slide,
    params: Mapping,
    outline: RegionRasterizer | None,
    labels: RegionRasterizer | None,
    pool: Executor | None = None,
) -> TissueMap:
    """Detect tissue on a rendering at params["mpp"] (finer for a small image: tissue.detection_mpp;
    read through `pool` when given). Annotated label regions count as tissue (fat and vessel lumens
    are pale but annotated tissue); an annotated outline bounds the result."""
    mask_mpp = detection_mpp(slide.mpp, slide.dimensions, params["mpp"])
    thumb = slide.render(mask_mpp, pool)
    detection = detect_tissue(thumb, mask_mpp, params)
    mask = detection.mask.copy()
    scale = thumb.shape[1] / slide.dimensions[0]
    width0, height0 = slide.dimensions
    if labels is not None:
        mask |= labels.rasterize(0, 0, width0, height0, mask.shape) > 0
    if outline is not None:
        inside = outline.rasterize(0, 0, width0, height0, mask.shape) > 0
        log.info(
            "%s: tissue restricted to the annotated outline (%.1f%% of the slide)", slide.path, 100 * inside.mean()
        )
        mask &= inside
    if not mask.any():
        raise PatchError(
            f"{slide.path}: no tissue detected at {mask_mpp:.3g} mpp ({detection.describe(params['min_glass'])}"
            f"{', inside the annotated tissue outline' if outline is not None else ''}); check the slide, "
            "or lower patches.tissue.min_saturation / patches.tissue.min_object_um2"
        )
    log.info(
        "%s: tissue covers %.1f%% of the slide at %.3g mpp (%s)",
        slide.path,
        100 * mask.mean(),
        mask_mpp,
        detection.describe(params["min_glass"]),
    )
    return TissueMap(mask, scale, detection)


def extract_slide(
    image: str | Path,
    annotations: str | Path | None,
    patches_dir: str | Path,
    index_path: str | Path,
    qc_path: str | Path | None = None,
    *,
    slide_name: str,
    split: str,
    config: dict,
    classes: dict[str, int] | None = None,
    mpp: float | None = None,
    label: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Cut one slide into patches under patches_dir (images/, masks/), write the index table at
    index_path (image and mask paths relative to its folder; patch ids start with slide_name) and,
    when qc_path is given, the QC thumbnail there; return the index path.
    `config` is the validated workflow config (sections patches, classes, priority, annotations);
    `classes` maps label names to mask values (default: config `classes` in order, from 1);
    `mpp` overrides the slide's recorded resolution (required for a plain PNG/JPEG/TIFF image);
    `label` is the image-level class (the slide sheet's label) written into every index row (null: none);
    `workers` is the CPU cores reading and writing windows (default patches.workers, else all), two
    threads each (a window's read waits on the disk and its hand-back on the GIL, so twice the
    cores keep them busy); the outputs are the same for any number."""
    patches_dir, index_path = Path(patches_dir), Path(index_path)
    relative = Path(os.path.relpath(patches_dir, index_path.parent))
    params = config["patches"]
    classes = classes or class_indices(config["classes"])
    threads = 2 * (workers or params.get("workers") or os.cpu_count() or 1)
    started = time.perf_counter()
    with (
        Slide(image, mpp=mpp, fallback_mpp=config["patches"]["fallback_mpp"]) as slide,
        ThreadPoolExecutor(threads, thread_name_prefix="patches") as pool,
    ):
        regions, labels, outline = _annotation_rasterizers(slide, annotations, classes, config)
        tissue = build_tissue_map(slide, params["tissue"], outline, labels, pool)
        extent = params["size"] * params["mpp"] / slide.mpp
        step = params["stride"] * params["mpp"] / slide.mpp
        if extent / params["size"] < 1 - 1e-6:
            log.warning(
                "%s: target %.3f mpp is finer than the slide's %.3f mpp; patches are upsampled",
                image,
                params["mpp"],
                slide.mpp,
            )
        xs = window_origins(slide.dimensions[0], extent, step)
        ys = window_origins(slide.dimensions[1], extent, step)
        if not len(xs) or not len(ys):
            raise PatchError(
                f"{image}: slide ({slide.dimensions[0]}x{slide.dimensions[1]} px) is smaller than one window ({extent:.0f} px at level 0)"
            )
        with atomic_dir(patches_dir) as tmp_dir, atomic_file(index_path) as index_tmp:
            counts = {"windows": len(xs) * len(ys), "tissue": 0, "max_tissue": 0.0, "max_label": 0.0}
            window = _Window(slide, labels, params, classes, extent, tmp_dir, relative, slide_name)
            rows = _scan_windows(window, tissue, xs, ys, pool, threads, progress, counts)
            kept_xy = _write_index(rows, index_tmp, slide_mpp=slide.mpp, label=label or None, split=split)
            if not len(kept_xy):
                raise PatchError(_no_patch_message(image, params, counts))
        if qc_path is not None:
            with atomic_file(qc_path) as qc_tmp:
                write_png(np.asarray(qc_thumbnail(slide, tissue, kept_xy, regions, extent, classes, pool)), qc_tmp)
        plain = slide.plain
    seconds = time.perf_counter() - started
    log.info(
        "%s: %s in %.1f s (%.1f patches/s, %d threads)",
        slide_name,
        _kept_summary(params, counts, len(kept_xy)),
        seconds,
        len(kept_xy) / seconds,
        threads,
    )
    if plain and len(kept_xy) < counts["windows"] / 2:
        log.warning(
            "%s: a plain image that keeps %d of the %d windows that fit: if it is tissue throughout, look at the QC "
            "picture %s (shaded = not tissue) and raise patches.tissue.min_glass or lower min_saturation",
            image,
            len(kept_xy),
            counts["windows"],
            qc_path or "(not written)",
        )
    return index_path


def _kept_summary(params: Mapping, counts: dict, kept: int) -> str:
    """'kept K of N windows that fit; A had tissue < min_tissue, B target class < min_label'."""
    text = f"kept {kept} of {counts['windows']} windows that fit"
    reasons = [f"{counts['windows'] - counts['tissue']} had tissue < patches.min_tissue={params['min_tissue']}"]
    if params["target_class"]:
        reasons.append(
            f"{counts['tissue'] - kept} had {params['target_class']!r} < patches.min_label={params['min_label']}"
        )
    return f"{text}; {', '.join(reasons)}"


def _write_index(rows, path: Path, **constant_columns) -> np.ndarray:
    """Stream index rows (plus constant columns) into a parquet file in row groups, so memory
    does not grow with the number of patches; return the kept windows' (x, y) origins."""
    writer, batch, kept = None, [], []
    try:
        for row in rows:
            row.update(constant_columns)
            batch.append(row)
            kept.append((row["x"], row["y"]))
            if len(batch) == INDEX_BATCH:
                writer = _flush(writer, batch, path)
        if batch:
            writer = _flush(writer, batch, path)
    finally:
        if writer is not None:
            writer.close()
    return np.asarray(kept, np.int64).reshape(-1, 2)


def _flush(writer, batch: list[dict], path: Path):
    table = arrow_table(batch)  # label and split are string columns even when null, so indexes concatenate
    writer = writer or pq.ParquetWriter(path, table.schema)
    writer.write_table(table)
    batch.clear()
    return writer


def _annotation_rasterizers(slide: Slide, annotations, classes: dict[str, int], config: dict):
    """Regions of the slide, a rasterizer for label classes and one for the tissue outline (or None)."""
    if not annotations:
        return [], None, None
    settings = config["annotations"]
    regions = load_regions(annotations, settings, slide_size=slide.dimensions)
    tissue_class = settings["tissue_class"]
    ignore = [*settings["ignore_classes"], *([tissue_class] if tissue_class and tissue_class not in classes else [])]
    labels = RegionRasterizer(
        regions,
        classes,
        slide_size=slide.dimensions,
        ignore=ignore,
        priority=config["priority"],
        source=str(annotations),
    )
    outline_regions = [r for r in regions if tissue_class and r.class_name == tissue_class]
    outline = (
        RegionRasterizer(outline_regions, {tissue_class: 1}, slide_size=slide.dimensions, source=str(annotations))
        if outline_regions
        else None
    )
    return regions, labels, outline


class _Window:
    """What one window needs to become a patch (label mask, keep rule, pixels, PNGs, index row):
    called from the worker threads, it reads only shared state that does not change."""

    def __init__(self, slide, labels, params, classes, extent, out_dir, relative, slide_name):
        self.slide, self.labels, self.params, self.classes = slide, labels, params, classes
        self.extent, self.out_dir, self.relative, self.slide_name = extent, out_dir, relative, slide_name
        self.target = classes.get(params["target_class"]) if params["target_class"] else None
        self.level = slide.level_for(params["mpp"])
        self.shape = (params["size"], params["size"])
        self.empty_mask = np.zeros(self.shape, np.uint8)
        (out_dir / "images").mkdir()
        (out_dir / "masks").mkdir()

    def __call__(self, x: int, y: int, tissue_fraction: float) -> tuple[float | None, dict | None]:
        """The window's target-class fraction (None without a target class) and, when it is
        kept, its index row after writing its image and mask PNGs (else None)."""
        params, extent = self.params, self.extent
        mask = self.labels.rasterize(x, y, extent, extent, self.shape) if self.labels else self.empty_mask
        label_fraction = float((mask == self.target).mean()) if self.target else None
        if not keep_window(tissue_fraction, label_fraction, params["min_tissue"], params["min_label"]):
            return label_fraction, None
        name = f"{self.slide_name}_x{x}_y{y}"
        pixels = self.slide.read(x, y, extent, extent, self.shape[::-1])
        write_png(pixels, self.out_dir / "images" / f"{name}.png", params["png_compression"])
        write_png(mask, self.out_dir / "masks" / f"{name}.png", params["png_compression"])
        row = {
            "patch_id": name,
            "slide": self.slide_name,
            "x": int(x),
            "y": int(y),
            "level": self.level,
            "mpp": params["mpp"],
            "size": params["size"],
            "image": (self.relative / "images" / f"{name}.png").as_posix(),
            "mask": (self.relative / "masks" / f"{name}.png").as_posix(),
            "tissue_fraction": tissue_fraction,
        }
        row.update(fraction_columns(mask, self.classes))
        return label_fraction, row


def _scan_windows(
    window: _Window, tissue: TissueMap, xs, ys, pool: Executor, threads: int, progress: bool, counts: dict
):
    """Slide the window over the grid row by row and yield the kept windows' index rows in grid
    order; windows with enough tissue go to `pool` (at most 8 per thread in flight, so memory
    stays flat). `counts` tallies windows seen, windows with enough tissue and the best fractions met."""
    min_tissue, size = window.params["min_tissue"], window.params["size"]
    pending: deque[Future] = deque()

    def collect() -> dict | None:
        label_fraction, row = pending.popleft().result()
        if label_fraction is not None:
            counts["max_label"] = max(counts["max_label"], label_fraction)
        return row

    for y in tqdm(ys, desc=f"{window.slide_name}: window rows", unit="row", disable=not progress, mininterval=2):
        for x in xs:
            tissue_fraction = tissue.fraction(x, y, window.extent, size)
            counts["max_tissue"] = max(counts["max_tissue"], tissue_fraction)
            if tissue_fraction < min_tissue:
                continue
            counts["tissue"] += 1
            pending.append(pool.submit(window, int(x), int(y), tissue_fraction))
            while len(pending) > 8 * threads:
                if (row := collect()) is not None:
                    yield row
    while pending:
        if (row := collect()) is not None:
            yield row


def _no_patch_message(image, params: Mapping, counts: dict) -> str:
    message = (
        f"{image}: 0 of {counts['windows']} windows kept. {counts['tissue']} had tissue >= patches.min_tissue="
        f"{params['min_tissue']} (highest tissue fraction {counts['max_tissue']:.2f})"
    )
    if params["target_class"] and counts["tissue"]:
        message += (
            f"; none of those had {params['target_class']!r} >= patches.min_label={params['min_label']} "
            f"(highest {counts['max_label']:.2f}). Lower patches.min_label or check the annotations"
        )
    else:
        message += ". Lower patches.min_tissue or check the tissue detection settings (patches.tissue)"
    return message + "."
