"""The QC thumbnail of a patch extraction: the slide with what is not tissue shaded, the tissue's
outline, the kept windows and the annotated regions drawn over it, and a legend."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from histosynth.data.annotations import Region
from histosynth.data.slides import Slide

if TYPE_CHECKING:
    from histosynth.data.patches import TissueMap

QC_MAX_SIDE = 1600  # longest side of the QC thumbnail in pixels
QC_TISSUE, QC_EXCLUDED = (0, 160, 0), (70, 70, 90)  # the tissue outline; the shade over what is not tissue
QC_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def qc_thumbnail(
    slide: Slide,
    tissue: TissueMap,
    kept_xy: np.ndarray,
    regions: list[Region],
    extent: float,
    classes: dict[str, int],
    pool: Executor | None = None,
) -> Image.Image:
    """Slide thumbnail (longest side QC_MAX_SIDE at most, the associated one when it has at least half
    that; read through `pool` when given) with what is not tissue shaded, the detected tissue's
    smooth outline, kept windows and annotated regions drawn over it, and a legend."""
    width0, height0 = slide.dimensions
    mpp = max(slide.mpp, slide.mpp * max(width0, height0) / QC_MAX_SIDE)
    thumbnail = slide.thumbnail()
    if thumbnail is not None and mpp < slide.mpp * width0 / thumbnail.width <= 2 * mpp:
        mpp = slide.mpp * width0 / thumbnail.width  # the scanner's thumbnail, at least half the size limit, will do
    pixels = np.array(slide.render(mpp, pool))  # writable: a thumbnail's array is not
    inside = _smooth_mask(tissue.mask, pixels.shape[:2])
    pixels[~inside] = (0.45 * pixels[~inside] + 0.55 * np.array(QC_EXCLUDED)).astype(np.uint8)
    contour = ndimage.binary_dilation(inside & ~ndimage.binary_erosion(inside, border_value=1))
    pixels[contour] = QC_TISSUE
    canvas = Image.fromarray(pixels)
    to_px = canvas.width / width0
    draw = ImageDraw.Draw(canvas)
    for x, y in kept_xy:
        draw.rectangle([x * to_px, y * to_px, (x + extent) * to_px, (y + extent) * to_px], outline=(255, 200, 0))
    colour_of = {name: QC_COLOURS[(i - 1) % len(QC_COLOURS)] for name, i in classes.items()}
    for region in regions:
        colour = colour_of.get(region.class_name, (40, 40, 40))
        for polygon in getattr(region.geometry, "geoms", [region.geometry]):
            for ring in [polygon.exterior, *polygon.interiors]:
                draw.line([(px * to_px, py * to_px) for px, py in ring.coords], fill=colour, width=2)
    present = {region.class_name for region in regions}
    legend = [("kept window", (255, 200, 0)), ("detected tissue", QC_TISSUE), ("not tissue", QC_EXCLUDED)]
    legend += [(name, colour) for name, colour in colour_of.items() if name in present]
    legend += [(f"{name} (not a label)", (40, 40, 40)) for name in sorted(present - set(colour_of))]
    for i, (label, colour) in enumerate(legend):
        draw.rectangle([6, 6 + 14 * i, 16, 16 + 14 * i], fill=colour, outline=(255, 255, 255))
        draw.text((20, 5 + 14 * i), label, fill=(0, 0, 0), stroke_width=2, stroke_fill=(255, 255, 255))
    return canvas


def _smooth_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A low-resolution mask at `shape` with smooth edges: interpolated bilinearly, blurred over
    half a mask pixel and cut at one half, so its outline follows the tissue rather than its blocks."""
    grey = Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.Resampling.BILINEAR)
    grey = grey.filter(ImageFilter.GaussianBlur(0.5 * shape[1] / mask.shape[1]))
    return np.asarray(grey) >= 128
