"""Conditioning maps for synthesis: per patch, the region label mask plus nuclei (class map and
instance boundaries), stored compactly as an RGB uint8 PNG and expanded into float channels
for the diffusion model.

Encoded map: channel 0 = region class index (0 = none), channel 1 = nucleus class index
(histosynth.nuclei.instances.NUCLEUS_CLASSES position + 1, 0 = none), channel 2 = 255 on instance
boundary pixels, else 0.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage.segmentation import find_boundaries

from histosynth.data.io import write_png, write_table
from histosynth.data.qc_thumbnail import QC_COLOURS
from histosynth.files import atomic_dir
from histosynth.nuclei.instances import NUCLEUS_CLASSES, NUCLEUS_COLOURS, instance_class_indices, read_instances
from histosynth.parallel import map_chunks

log = logging.getLogger(__name__)

BOUNDARY = 255
PREVIEW_BACKGROUND = (245, 240, 245)
PREVIEW_BOUNDARY = (40, 40, 40)
REGION_TINT = 0.35  # weight of the region colour over the preview background


def encode_conditioning(
    region_mask: np.ndarray | None, instances: np.ndarray, instance_classes: dict[int, int]
) -> np.ndarray:
    """The encoded (H, W, 3) uint8 map of a patch from its region mask (None: no region
    annotations, channel 0 stays 0), its instance mask and {instance_id: nucleus class index}."""
    instances = np.asarray(instances)
    if region_mask is not None and region_mask.shape != instances.shape:
        raise ValueError(f"region mask {region_mask.shape} and instance mask {instances.shape} differ in shape")
    present = np.unique(instances[instances > 0])
    missing = sorted(set(present.tolist()) - set(instance_classes))
    if missing:
        raise ValueError(f"instances {missing[:10]} have no class in instance_classes; every nucleus needs one")
    lut = np.zeros(int(instances.max(initial=0)) + 1, np.uint8)
    for instance_id, index in instance_classes.items():
        if instance_id < len(lut):
            lut[instance_id] = index
    encoded = np.zeros((*instances.shape, 3), np.uint8)
    if region_mask is not None:
        encoded[..., 0] = region_mask
    encoded[..., 1] = lut[instances]
    encoded[..., 2] = find_boundaries(instances, mode="inner") * BOUNDARY
    return encoded


def channel_names(
    region_classes: Sequence[str],
    nucleus_classes: Sequence[str] = NUCLEUS_CLASSES,
    *,
    use_regions: bool = True,
    use_nuclei: bool = True,
    use_boundaries: bool = True,
) -> list[str]:
    """Names of the channels conditioning_channels makes, in order: region:background and
    region:<class> per region class, nucleus:<class> per nucleus class, then nucleus_boundary."""
    names = []
    if use_regions:
        names += ["region:background"] + [f"region:{name}" for name in region_classes]
    if use_nuclei:
        names += [f"nucleus:{name}" for name in nucleus_classes]
    if use_boundaries:
        names.append("nucleus_boundary")
    return names


def conditioning_channels(
    encoded: np.ndarray,
    n_region_classes: int,
    n_nucleus_classes: int = len(NUCLEUS_CLASSES),
    *,
    use_regions: bool = True,
    use_nuclei: bool = True,
    use_boundaries: bool = True,
) -> np.ndarray:
    """Float32 channels of an encoded map (H, W, 3) -> (C, H, W), or a batch (N, H, W, 3) ->
    (N, C, H, W): one-hot regions including background (n_region_classes + 1), one-hot nucleus
    classes without background (n_nucleus_classes), and the boundary (1), each when enabled;
    the order is channel_names'."""
    encoded = np.asarray(encoded)
    if encoded.ndim not in (3, 4) or encoded.shape[-1] != 3:
        raise ValueError(f"expected an encoded map (H, W, 3) or a batch (N, H, W, 3), got shape {encoded.shape}")
    parts = []
    if use_regions:
        parts.append(
            _one_hot(encoded[..., 0], 0, n_region_classes, f"a region class above n_region_classes={n_region_classes}")
        )
    if use_nuclei:
        parts.append(
            _one_hot(
                encoded[..., 1], 1, n_nucleus_classes, f"a nucleus class above n_nucleus_classes={n_nucleus_classes}"
            )
        )
    if use_boundaries:
        parts.append((encoded[..., None, :, :, 2] > 0).astype(np.float32))
    if not parts:
        return np.zeros((*encoded.shape[:-3], 0, *encoded.shape[-3:-1]), np.float32)
    return np.concatenate(parts, axis=-3)


def _one_hot(labels: np.ndarray, first: int, last: int, too_high: str) -> np.ndarray:
    """(..., C, H, W) float32 one-hot of (..., H, W) labels first..last; labels below `first` give all zeros."""
    if labels.size and int(labels.max()) > last:
        raise ValueError(f"the map holds {too_high}: {int(labels.max())}; the map and the class settings disagree")
    classes = np.arange(first, last + 1, dtype=labels.dtype).reshape(-1, 1, 1)
    return (labels[..., None, :, :] == classes).astype(np.float32)


def write_conditioning(encoded: np.ndarray, path: str | Path) -> None:
    """Save an encoded map as an RGB PNG."""
    write_png(encoded, path)


def read_conditioning(path: str | Path) -> np.ndarray:
    """Read an encoded map (H, W, 3) uint8."""
    with Image.open(path) as image:
        if image.mode != "RGB":
            raise ValueError(
                f"{path}: a conditioning map is an RGB PNG, found mode {image.mode}; rebuild it (rule conditioning)"
            )
        return np.asarray(image)


def preview(encoded: np.ndarray) -> np.ndarray:
    """A human-viewable RGB rendering of an encoded map: regions tinted (colours of the patch QC
    thumbnail), nuclei filled with their class colour, boundaries dark."""
    regions, nuclei, boundary = encoded[..., 0], encoded[..., 1], encoded[..., 2] > 0
    region_lut = np.array([PREVIEW_BACKGROUND] + [QC_COLOURS[i % len(QC_COLOURS)] for i in range(255)], np.float32)
    tinted = (1 - REGION_TINT) * np.array(PREVIEW_BACKGROUND, np.float32) + REGION_TINT * region_lut
    out = tinted[regions]
    nucleus_lut = np.array([PREVIEW_BACKGROUND] + [NUCLEUS_COLOURS[name] for name in NUCLEUS_CLASSES], np.float32)
    has_nucleus = (nuclei > 0) & (nuclei <= len(NUCLEUS_CLASSES))
    out[has_nucleus] = nucleus_lut[nuclei[has_nucleus]]
    out[boundary] = PREVIEW_BOUNDARY
    return out.astype(np.uint8)


def build_slide_conditioning(
    index: pd.DataFrame,
    nuclei_dir: str | Path,
    nuclei_table: pd.DataFrame,
    out_dir: str | Path,
    *,
    use_regions: bool = True,
    progress: bool = True,
    workers: int = 1,
) -> int:
    """Write out_dir/<patch_id>.png, the encoded map of every patch in a slide's index
    (histosynth.data.io.read_patch_index), from its label mask (when use_regions) and its nuclei
    (nuclei_dir/<patch_id>.png and the nuclei table of the slide), on `workers` processes (the
    maps do not depend on their number). Returns the patch count."""
    nuclei_dir = Path(nuclei_dir)
    by_patch = {patch_id: rows for patch_id, rows in nuclei_table.groupby("patch_id")}
    rows = list(index.itertuples(index=False))
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp_dir:

        def encode(positions: range) -> None:
            for position in positions:
                row = rows[position]
                path = nuclei_dir / f"{row.patch_id}.png"
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{path}: no nuclei mask for patch {row.patch_id}; rerun the nuclei stage for this slide"
                    )
                instances = read_instances(path)
                nuclei = by_patch.get(row.patch_id)
                classes = instance_class_indices(nuclei) if nuclei is not None else {}
                regions = None
                if use_regions:
                    with Image.open(row.mask) as mask:
                        regions = np.asarray(mask)
                write_conditioning(encode_conditioning(regions, instances, classes), tmp_dir / f"{row.patch_id}.png")

        for _ in map_chunks(encode, len(rows), workers, desc="conditioning", progress=progress):
            pass
    seconds = time.perf_counter() - started
    log.info(
        "%d conditioning maps in %.1f s (%.1f patches/s, %d processes)",
        len(index),
        seconds,
        len(index) / seconds,
        workers,
    )
    return len(index)


def write_conditioning_index(index: pd.DataFrame, maps_dir: str | Path, path: str | Path) -> None:
    """Write the conditioning index: the slide's patch index rows (absolute paths, as
    histosynth.data.io.read_patch_index gives them) plus a `conditioning` column, every path stored
    relative to the new table's folder."""
    path = Path(path)
    table = index.copy()
    table["conditioning"] = [str(Path(maps_dir) / f"{patch_id}.png") for patch_id in table["patch_id"]]
    for column in ("image", "mask", "conditioning"):
        table[column] = [os.path.relpath(p, path.parent) for p in table[column]]
    write_table(table, path)
