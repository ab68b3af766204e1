"""Label-mask images (GlaS, CRAG, BCSS, Kather-style tile sets): a one-channel PNG/TIFF at the
image's size or at a stated downsample, each value a class by `annotations.mask_values`
({value: class}, 0 = background). Read into Regions whose outlines follow the pixel edges, so a
mask painted back at its own grid is the mask itself."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import shapely
import tifffile
from PIL import Image
from shapely import affinity

from histosynth.data.annotations.regions import AnnotationError, Region

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def read_mask_image(path: str | Path, what: str = "a label mask") -> np.ndarray:
    """A one-channel integer image (PNG or TIFF; a palette PNG gives its indices) as int64."""
    path = Path(path)
    try:
        if path.read_bytes()[:4] in TIFF_MAGIC:
            mask = tifffile.imread(path, key=0)
        else:
            with Image.open(path) as image:
                mask = np.asarray(image)
    except (OSError, ValueError, tifffile.TiffFileError) as err:
        raise AnnotationError(f"{path}: cannot read {what} image ({err})") from None
    if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise AnnotationError(
            f"{path}: {what} must be one channel of integer ids (0 = background), got shape "
            f"{mask.shape} of {mask.dtype}; save it as a grey or palette PNG/TIFF"
        )
    return mask.astype(np.int64)


def mask_downsample(
    path: str | Path, mask_shape: tuple[int, int], slide_size: tuple[int, int] | None, downsample: float
) -> float:
    """Check that a (rows, cols) mask covers the slide (width, height) at `downsample` (each mask pixel
    is downsample x downsample level-0 pixels; the last row/column may be partial) and return it."""
    if slide_size is None:
        return downsample
    width, height = slide_size
    rows, cols = mask_shape
    if abs(cols - width / downsample) >= 1 or abs(rows - height / downsample) >= 1:
        hint = (
            f"; it looks like downsample {width / cols:g}: set annotations.mask_downsample: {width / cols:g}"
            if abs(width / cols - height / rows) < max(width / cols, height / rows) * 0.01
            else ""
        )
        raise AnnotationError(
            f"{path}: the mask is {cols}x{rows} px but its image is {width}x{height} px at annotations.mask_downsample "
            f"{downsample:g} (expected {width / downsample:.0f}x{height / downsample:.0f}){hint}"
        )
    return downsample


def read_label_mask(
    path: str | Path, mask_values: Mapping[str, str], downsample: float = 1.0, slide_size: tuple[int, int] | None = None
) -> list[Region]:
    """Regions of a label mask: one per class, the pixels of its values, in level-0 coordinates
    (mask pixel (r, c) covers [c*d, (c+1)*d) x [r*d, (r+1)*d) for downsample d). Values found but
    not in `mask_values` are an error listing them."""
    mask = read_mask_image(path)
    downsample = mask_downsample(path, mask.shape, slide_size, downsample)
    values = {int(v): name for v, name in mask_values.items()}
    found = np.unique(mask)
    unknown = [int(v) for v in found if v != 0 and int(v) not in values]
    if unknown:
        shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
        raise AnnotationError(
            f"{path}: mask values {shown} have no class; map each to a class in annotations.mask_values "
            f"(now {dict(mask_values) or '{}'}), e.g. mask_values: {{{unknown[0]}: Tumor}} (0 is background)"
        )
    regions = []
    for name in dict.fromkeys(values[int(v)] for v in found if v != 0):
        chosen = np.isin(mask, [v for v, n in values.items() if n == name])
        geometry = affinity.scale(pixel_outline(chosen), downsample, downsample, origin=(0, 0))
        regions.append(Region(name, geometry))
    return regions


def pixel_outline(mask: np.ndarray) -> shapely.Geometry:
    """The (Multi)Polygon covered by the True pixels of a boolean mask, pixel (r, c) being the
    square [c, c+1) x [r, r+1): the union of each row's runs (shapely.coverage_union_all)."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    change = np.diff(padded, axis=1)
    rows, starts = np.nonzero(change == 1)
    _, stops = np.nonzero(change == -1)  # same row order: row-major nonzero, one stop per start
    boxes = shapely.box(starts, rows, stops, rows + 1)
    return shapely.coverage_union_all(boxes)
