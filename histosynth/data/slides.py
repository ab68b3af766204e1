"""Whole-slide access through OpenSlide: opening with clear errors, resolution, reading at a
target mpp, and tissue detection on a low-resolution rendering."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

log = logging.getLogger(__name__)

# Largest region (pixels per side) read in one call while building low-resolution renderings.
READ_CHUNK = 1024
# Rows of a rendering converted to HSV at once by detect_tissue.
HSV_BAND = 256


class SlideError(RuntimeError):
    """A slide that cannot be opened or read; the message names the file and what to do."""


SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


def _damaged(path: Path) -> bool:
    """Whether a file OpenSlide refused claims to be a slide (by its suffix or TIFF header) yet
    cannot be parsed: then it is truncated or corrupt, not merely another format. A TIFF that
    tifffile reads whole (e.g. a plain, untiled TIFF) is not damaged."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head not in TIFF_MAGIC:
        return path.suffix.lower() in SLIDE_SUFFIXES
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            ends = [o + c for page in tif.pages for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)]
    except Exception:  # noqa: BLE001 - a TIFF header whose directories cannot be parsed is damage
        return True
    return max(ends, default=0) > path.stat().st_size  # image data beyond the end: cut short


class Slide:
    """An open whole-slide image with a known level-0 resolution."""

    def __init__(self, path: str | Path, mpp: float | None = None, fallback_mpp: float = 0.5):
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(f"{self.path}: no such slide file")
        try:
            self.osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as err:
            if _damaged(self.path):
                raise SlideError(
                    f"{self.path}: has a slide file's name or TIFF header but OpenSlide cannot read it ({err}); "
                    "the file looks truncated or corrupt: copy it again (compare its size or checksum with the source)"
                ) from err
            raise SlideError(
                f"{self.path}: not a slide format OpenSlide reads ({err}); "
                "supported: Aperio svs, generic tiled TIFF, Hamamatsu ndpi/vms, MIRAX mrxs, Leica scn, "
                "Ventana bif, Philips TIFF, DICOM WSI"
            ) from err
        except openslide.OpenSlideError as err:
            raise SlideError(f"{self.path}: OpenSlide could not open it ({err}); the file may be truncated or corrupt") from err
        self.mpp = mpp if mpp else self._recorded_mpp()
        if self.mpp is None:
            log.warning("%s records no microns per pixel; assuming fallback_mpp=%s", self.path, fallback_mpp)
            self.mpp = float(fallback_mpp)

    def _recorded_mpp(self) -> float | None:
        props = self.osr.properties
        try:
            mpp_x = float(props[openslide.PROPERTY_NAME_MPP_X])
            mpp_y = float(props.get(openslide.PROPERTY_NAME_MPP_Y, mpp_x))
        except (KeyError, ValueError):
            return None
        if mpp_x <= 0:
            return None
        if not math.isclose(mpp_x, mpp_y, rel_tol=0.02):
            log.warning("%s has anisotropic pixels (mpp-x %.4f, mpp-y %.4f); using mpp-x", self.path, mpp_x, mpp_y)
        return mpp_x

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.osr.dimensions

    def level_for(self, target_mpp: float) -> int:
        """The coarsest level whose resolution is still at least as fine as target_mpp."""
        return self.osr.get_best_level_for_downsample(target_mpp / self.mpp + 1e-6)

    def read(self, x: float, y: float, width: float, height: float, out_size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array of shape (out_h, out_w, 3) for the level-0 window [x, x+width) x [y, y+height),
        read from the best level and resampled; transparent (unscanned) pixels become white."""
        out_w, out_h = out_size
        level = self.osr.get_best_level_for_downsample(min(width / out_w, height / out_h) + 1e-6)
        ds = self.osr.level_downsamples[level]
        read_w = max(1, math.ceil(width / ds))
        read_h = max(1, math.ceil(height / ds))
        try:
            rgba = self.osr.read_region((int(round(x)), int(round(y))), level, (read_w, read_h))
        except openslide.OpenSlideError as err:
            raise SlideError(
                f"{self.path}: reading level {level} at ({x:.0f}, {y:.0f}) failed ({err}); "
                "the file is probably truncated or corrupt"
            ) from err
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        if rgb.size != (out_w, out_h):
            rgb = rgb.resize((out_w, out_h), Image.Resampling.LANCZOS)
        return np.asarray(rgb)

    def render(self, mpp: float) -> np.ndarray:
        """The whole slide at (about) `mpp`, assembled chunk by chunk: each read covers at most
        READ_CHUNK x READ_CHUNK pixels of the level it comes from, so memory stays bounded."""
        width0, height0 = self.dimensions
        scale = self.mpp / mpp  # output pixels per level-0 pixel
        out_w, out_h = max(1, round(width0 * scale)), max(1, round(height0 * scale))
        level_ds = self.osr.level_downsamples[self.level_for(mpp)]
        chunk = max(1, int(READ_CHUNK * level_ds * scale))  # output pixels per read
        canvas = np.empty((out_h, out_w, 3), np.uint8)
        for top in range(0, out_h, chunk):
            for left in range(0, out_w, chunk):
                w, h = min(chunk, out_w - left), min(chunk, out_h - top)
                canvas[top : top + h, left : left + w] = self.read(left / scale, top / scale, w / scale, h / scale, (w, h))
        return canvas

    def describe(self) -> dict:
        """Vendor, dimensions, levels and resolution, for `histosynth inspect`."""
        osr = self.osr
        return {
            "path": str(self.path),
            "vendor": osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
            "dimensions": osr.dimensions,
            "levels": [
                {"level": i, "dimensions": osr.level_dimensions[i], "downsample": osr.level_downsamples[i],
                 "mpp": self.mpp * osr.level_downsamples[i]}
                for i in range(osr.level_count)
            ],
            "mpp": self.mpp,
            "objective_power": osr.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER),
            "associated_images": sorted(osr.associated_images),
        }

    def close(self) -> None:
        self.osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def detect_tissue(rgb: np.ndarray, mpp: float, params: Mapping) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a low-resolution RGB rendering taken at `mpp`, and the saturation
    threshold used: Otsu on HSV saturation (floored at min_saturation), near-white and pen-ink
    pixels rejected, small objects removed and small holes filled. Works in row bands so the
    float HSV copy never covers the whole rendering."""
    saturation = np.empty(rgb.shape[:2], np.uint8)  # saturation x 255: a quarter of float32's memory
    candidate = np.empty(rgb.shape[:2], bool)
    for top in range(0, rgb.shape[0], HSV_BAND):
        hsv = rgb2hsv(rgb[top : top + HSV_BAND])
        hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
        saturation[top : top + HSV_BAND] = np.round(sat * 255)
        keep = val < 0.92  # near-white glass
        if params["reject_pen"]:
            ink = (hue > 0.2) & (hue < 0.7) & (sat > 0.25)  # green through blue: neither eosin nor haematoxylin
            keep &= ~ink & (val > 0.15)  # and not near-black marker
        candidate[top : top + HSV_BAND] = keep
    threshold = params["min_saturation"]
    if saturation.min() < saturation.max():
        threshold = max(threshold, float(threshold_otsu(saturation)) / 255)
    tissue = (saturation >= threshold * 255) & candidate
    del saturation, candidate
    px_area = mpp * mpp
    tissue = _drop_components(tissue, int(params["min_object_um2"] / px_area))
    tissue |= ~_drop_components(~tissue, int(params["max_hole_um2"] / px_area))  # fill small holes
    return tissue, threshold


def _drop_components(mask: np.ndarray, max_size: int) -> np.ndarray:
    """`mask` without its 4-connected components of at most max_size pixels (int32 labels keep
    the transient memory at four bytes per pixel)."""
    labels, _ = ndimage.label(mask, output=np.int32)
    keep = np.bincount(labels.ravel()) > max_size
    keep[0] = False
    return keep[labels]
