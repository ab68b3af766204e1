"""Tissue detection on a low-resolution rendering of a slide. An image decides first whether it
shows glass at all (the share of bright, unsaturated pixels): a slide with glass around its tissue
is split by Otsu's threshold on saturation; a tile that is tissue throughout keeps everything but
glass-like pixels and ink, so its pale regions are not split from its dense ones. Pen ink (green
to blue, red, black) is not tissue; only background enclosed by tissue is filled as a hole."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Rows of a rendering converted to HSV at once by detect_tissue.
HSV_BAND = 256
# Value (brightness) from which a pixel below min_saturation is glass; from which any pixel is
# near-white glass where the image has glass.
BRIGHT = 0.8
NEAR_WHITE = 0.92
# Shorter side (pixels) a detection rendering has at least, when the slide's resolution allows:
# a 250 um tile is 31 px at 8 um/px, too coarse for its windows.
MIN_MASK_SIDE = 256


@dataclass
class Tissue:
    """A detection's mask and how it was decided (for the log and the error messages)."""

    mask: np.ndarray  # bool, True on tissue
    threshold: float  # the saturation threshold applied
    glass_share: float  # share of bright pixels below min_saturation
    has_glass: bool  # glass_share >= min_glass: tissue split from glass by saturation
    ink_share: float  # share of pixels rejected as pen ink

    def describe(self, min_glass: float) -> str:
        """One line on how tissue was told from the rest."""
        if self.has_glass:
            how = (
                f"glass found ({100 * self.glass_share:.0f}% bright and unsaturated >= min_glass={min_glass}): "
                f"tissue is saturation >= {self.threshold:.3f}"
            )
        else:
            how = (
                f"no glass ({100 * self.glass_share:.0f}% bright and unsaturated < min_glass={min_glass}): "
                "tissue is everything but glass-like pixels and ink"
            )
        return f"{how}; ink {100 * self.ink_share:.1f}%"


def detection_mpp(slide_mpp: float, dimensions: tuple[int, int], mpp: float) -> float:
    """The resolution tissue is detected at: `mpp` (patches.tissue.mpp), finer for small images so
    that their shorter side has MIN_MASK_SIDE pixels, never finer than the slide itself."""
    short_um = min(dimensions) * slide_mpp
    return max(slide_mpp, min(mpp, short_um / MIN_MASK_SIDE))


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """Float HSV in [0, 1] of an RGB uint8 array (..., 3), as skimage.color.rgb2hsv (computed here:
    importing scikit-image's would cost `histosynth patches` a third of its start-up)."""
    rgb = rgb.astype(np.float64) / 255
    value = rgb.max(axis=-1)
    delta = np.ptp(rgb, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        saturation = np.where(delta == 0, 0.0, delta / value)
        red, green, blue = np.moveaxis(rgb, -1, 0)
        hue = np.where(
            red == value,
            (green - blue) / delta,
            np.where(green == value, 2.0 + (blue - red) / delta, 4.0 + (red - green) / delta),
        )
    hue = np.where(delta == 0, 0.0, (hue / 6.0) % 1.0)
    return np.stack([hue, saturation, value], axis=-1)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of integer values, as skimage.filters.threshold_otsu gives it for them: the
    value maximising the between-class variance over a histogram with one bin per integer."""
    low = int(values.min())
    counts = np.bincount((values.ravel() - low).astype(np.intp)).astype(np.float64)
    centres = np.arange(low, low + len(counts), dtype=np.float64)
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean1 = np.cumsum(counts * centres) / weight1
        mean2 = (np.cumsum((counts * centres)[::-1]) / weight2[::-1])[::-1]
    between = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return int(centres[np.nanargmax(between)])


def pen_ink(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Pixels of marker ink, never stained tissue: green to cyan (hue 0.2-0.6), saturated bright blue
    (0.6-0.68; dense nuclei are more violet, darker or paler at fine resolutions), pure red (hue
    within 0.025 of red, saturation > 0.5: eosin's pink lies at 0.89-0.97, with blue well above
    green) and black (dark and unsaturated). Colour ranges after histolab's pen filters, written as
    hue bounds; red blood cells fall in the red range too (detect_tissue fills them back where
    tissue encloses them)."""
    green_cyan = (hue > 0.2) & (hue < 0.6) & (sat > 0.25)
    blue = (hue >= 0.6) & (hue < 0.68) & (sat > 0.5) & (val > 0.5)  # haematoxylin: more violet, darker or paler
    red = ((hue > 0.975) | (hue < 0.025)) & (sat > 0.5) & (val > 0.3)
    black = (val < 0.15) | ((val < 0.4) & (sat < 0.3))
    return green_cyan | blue | red | black


def detect_tissue(rgb: np.ndarray, mpp: float, params: Mapping) -> Tissue:
    """Tissue of a low-resolution RGB rendering taken at `mpp` under the patches.tissue settings:
    with glass (at least min_glass of the pixels bright and below min_saturation), saturation at or
    above Otsu's threshold (floored at min_saturation; min_saturation alone when otsu is false) and
    not near-white; without glass, every pixel but glass-like areas of at least min_object_um2. Ink
    (reject_pen) is removed, then objects under min_object_um2; then holes enclosed by tissue up to
    max_hole_um2 are filled, ink among them (red blood cells in a vessel look like red ink).
    Works in row bands so the float HSV copy never covers the whole rendering."""
    saturation = np.empty(rgb.shape[:2], np.uint8)  # saturation x 255: a quarter of float32's memory
    glassy, near_white, ink = (np.zeros(rgb.shape[:2], bool) for _ in range(3))
    for top in range(0, rgb.shape[0], HSV_BAND):
        hue, sat, val = np.moveaxis(rgb_to_hsv(rgb[top : top + HSV_BAND]), -1, 0)
        saturation[top : top + HSV_BAND] = np.round(sat * 255)
        glassy[top : top + HSV_BAND] = (val >= BRIGHT) & (sat < params["min_saturation"])
        near_white[top : top + HSV_BAND] = val >= NEAR_WHITE
        if params["reject_pen"]:
            ink[top : top + HSV_BAND] = pen_ink(hue, sat, val)
    glass_share = float(glassy.mean())
    has_glass = glass_share >= params["min_glass"]
    threshold = params["min_saturation"]
    px_area = mpp * mpp
    min_object = int(params["min_object_um2"] / px_area)
    if has_glass:
        if params["otsu"] and saturation.min() < saturation.max():
            threshold = max(threshold, otsu_threshold(saturation) / 255)
        tissue = (saturation >= threshold * 255) & ~near_white & ~ink
    else:  # glass-like specks smaller than an object (a noisy pale pixel) are no glass either
        tissue = ~_drop_components(glassy, min_object) & ~ink
    del saturation, glassy, near_white
    tissue = _drop_components(tissue, min_object)
    tissue |= enclosed_holes(tissue, int(params["max_hole_um2"] / px_area))  # blood in a vessel is as red as ink
    return Tissue(tissue, float(threshold), glass_share, bool(has_glass), float(ink.mean()))


def enclosed_holes(tissue: np.ndarray, max_size: int) -> np.ndarray:
    """The 4-connected background components of at most max_size pixels that tissue encloses:
    background touching the image's edge is glass beyond it, not a hole."""
    labels, _ = ndimage.label(~tissue, output=np.int32)
    small = np.bincount(labels.ravel()) <= max_size
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    small[edge] = False
    small[0] = False
    return small[labels]


def _drop_components(mask: np.ndarray, max_size: int) -> np.ndarray:
    """`mask` without its 4-connected components of at most max_size pixels (int32 labels keep
    the transient memory at four bytes per pixel)."""
    labels, _ = ndimage.label(mask, output=np.int32)
    keep = np.bincount(labels.ravel()) > max_size
    keep[0] = False
    return keep[labels]
