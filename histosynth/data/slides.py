"""Whole-slide access through OpenSlide: opening with clear errors, resolution, reading at a
target mpp, and low-resolution renderings (histosynth.data.tissue finds the tissue on them).
Besides the slide formats OpenSlide reads (DICOM WSI included), a plain PNG/JPEG/TIFF (e.g. one
tile of a tile dataset) opens as a single-level slide; it records no trustworthy resolution, so
its mpp must be given (except to describe it)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from histosynth.data.dicom_wsi import dicom_problem, is_dicom

log = logging.getLogger(__name__)

# Largest region (pixels per side) read in one call while building low-resolution renderings.
READ_CHUNK = 1024


class SlideError(RuntimeError):
    """A slide that cannot be opened or read; the message names the file and what to do."""


SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
MPP_FIX = "give its microns per pixel in the slide sheet's mpp column, or --slide-mpp on the CLI"


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

    def __init__(self, path: str | Path, mpp: float | None = None, fallback_mpp: float = 0.5, need_mpp: bool = True):
        """Open `path` (a slide file, a DICOM WSI file or folder, or a plain PNG/JPEG/TIFF).
        `mpp` overrides the recorded level-0 resolution and is required for plain images unless
        `need_mpp` is false (then their mpp is None: enough to describe them, not to read at an
        mpp); `fallback_mpp` is assumed (with a warning) for a slide format that records none."""
        self.path = Path(path)
        if self.path.is_dir():
            self.path = _dicom_in_folder(self.path)
        if not self.path.is_file():
            raise SlideError(f"{self.path}: no such slide file")
        self.vendor: str | None = None  # set where OpenSlide's vendor property does not apply
        try:
            self.osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as err:
            if is_dicom(self.path):
                raise SlideError(dicom_problem(self.path, err)) from err
            if not isinstance(err, openslide.OpenSlideUnsupportedFormatError):
                raise SlideError(
                    f"{self.path}: OpenSlide could not open it ({err}); the file may be truncated or corrupt"
                ) from err
            if _damaged(self.path):
                raise SlideError(
                    f"{self.path}: has a slide file's name or TIFF header but OpenSlide cannot read it ({err}); "
                    "the file looks truncated or corrupt: copy it again (compare its size or checksum with the source)"
                ) from err
            image, self.vendor = _open_plain(self.path, mpp, err, need_mpp)
            self.osr = openslide.ImageSlide(image)
            self.mpp = float(mpp) if mpp else None  # None only where need_mpp is false
            return
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
        rgb = _on_white(rgba)
        if rgb.size != (out_w, out_h):
            rgb = rgb.resize((out_w, out_h), Image.Resampling.LANCZOS)
        return np.asarray(rgb)

    def render(self, mpp: float, pool: Executor | None = None) -> np.ndarray:
        """The whole slide at (about) `mpp`: the associated thumbnail resized when it is fine enough
        (and smaller than the pyramid level that would be read), else the coarsest sufficient level
        assembled chunk by chunk: each read covers at most READ_CHUNK x READ_CHUNK pixels of its
        level, so memory stays bounded; with `pool` the chunks are read in parallel."""
        width0, height0 = self.dimensions
        scale = self.mpp / mpp  # output pixels per level-0 pixel
        out_w, out_h = max(1, round(width0 * scale)), max(1, round(height0 * scale))
        level_ds = self.osr.level_downsamples[self.level_for(mpp)]
        thumbnail = self.thumbnail()
        if (
            thumbnail is not None
            and self.mpp * width0 / thumbnail.width <= mpp * (1 + 1e-6)
            and thumbnail.width < width0 / level_ds
        ):
            return np.asarray(_on_white(thumbnail).resize((out_w, out_h), Image.Resampling.LANCZOS))
        chunk = max(1, int(READ_CHUNK * level_ds * scale))  # output pixels per read
        boxes = [
            (left, top, min(chunk, out_w - left), min(chunk, out_h - top))
            for top in range(0, out_h, chunk)
            for left in range(0, out_w, chunk)
        ]

        def read(box):
            left, top, w, h = box
            return self.read(left / scale, top / scale, w / scale, h / scale, (w, h))

        canvas = np.empty((out_h, out_w, 3), np.uint8)
        for (left, top, w, h), pixels in zip(boxes, (pool.map if pool else map)(read, boxes)):
            canvas[top : top + h, left : left + w] = pixels
        return canvas

    def thumbnail(self) -> Image.Image | None:
        """The associated thumbnail when it covers the scanned area (its aspect ratio matches
        level 0 to a pixel: a glass overview does not), else None."""
        if "thumbnail" not in self.osr.associated_images:
            return None
        thumbnail = self.osr.associated_images["thumbnail"]
        (width0, height0), (width, height) = self.dimensions, thumbnail.size
        return thumbnail if abs(width * height0 - height * width0) <= max(width0, height0) else None

    @property
    def plain(self) -> bool:
        """Whether the slide is a plain PNG/JPEG/TIFF image (a tile, not a whole-slide format)."""
        return self.vendor is not None

    def describe(self) -> dict:
        """Vendor, dimensions, levels and resolution (mpp None where unknown), for `histosynth inspect`."""
        osr = self.osr
        return {
            "path": str(self.path),
            "vendor": self.vendor or osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
            "dimensions": osr.dimensions,
            "levels": [
                {
                    "level": i,
                    "dimensions": osr.level_dimensions[i],
                    "downsample": osr.level_downsamples[i],
                    "mpp": self.mpp * osr.level_downsamples[i] if self.mpp else None,
                }
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


def _dicom_in_folder(folder: Path) -> Path:
    """The file to open for a DICOM WSI given as its folder (one .dcm file per level, as
    wsidicomizer writes it): the largest .dcm file, which OpenSlide opens with its siblings."""
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file()]
    if not files:
        raise SlideError(
            f"{folder}: a folder, not a slide file, and it holds no .dcm files (a DICOM WSI); "
            "give the slide file itself"
        )
    return max(files, key=lambda p: (p.stat().st_size, p.name))


@contextmanager
def _unlimited_pixels() -> Iterator[None]:
    """Pillow without its decompression-bomb limit: a plain image may be a large tile mosaic."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _open_plain(path: Path, mpp: float | None, openslide_err: Exception, need_mpp: bool) -> tuple[Image.Image, str]:
    """A plain image OpenSlide refused, as an RGB PIL image and its description ('plain image
    (PNG)', 'plain TIFF (3 pages, page 0 used)'). The format is identified first and the mpp
    checked (where `need_mpp`) before any pixel is decoded."""
    with open(path, "rb") as handle:
        is_tiff = handle.read(4) in TIFF_MAGIC
    kind = "TIFF" if is_tiff else _pillow_format(path)
    if kind is None:
        raise SlideError(
            f"{path}: not a slide format OpenSlide reads ({openslide_err}) nor a plain image; supported: Aperio svs, "
            "generic tiled TIFF, Hamamatsu ndpi/vms, MIRAX mrxs, Leica scn, Ventana bif, Philips TIFF, DICOM WSI, "
            "and plain PNG/JPEG/TIFF images (with their mpp)"
        )
    if need_mpp and not mpp:
        raise SlideError(
            f"{path}: a plain {kind} image (not a whole-slide format) records no trustworthy resolution; {MPP_FIX}"
        )
    return _read_tiff(path) if is_tiff else _read_pillow(path)


def _pillow_format(path: Path) -> str | None:
    try:
        with _unlimited_pixels(), Image.open(path) as image:
            return image.format
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _read_pillow(path: Path) -> tuple[Image.Image, str]:
    """A PNG/JPEG/... as RGB: 16-bit grey scaled to 8 bits (x 255/65535), transparency composited on white."""
    with _unlimited_pixels(), Image.open(path) as image:
        kind = image.format
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise SlideError(
                f"{path}: a {kind} image Pillow cannot decode ({err}); the file looks truncated or "
                "corrupt: copy it again"
            ) from err
        if image.mode.startswith("I;16") or image.mode == "I":
            grey = np.asarray(image)
            if grey.min() < 0 or grey.max() > 65535:
                raise SlideError(f"{path}: 32-bit integer samples outside 0..65535; convert it to 8-bit RGB")
            return Image.fromarray(_to_uint8(grey.astype(np.uint16), 16, None, path)).convert(
                "RGB"
            ), f"plain image ({kind})"
        if image.mode == "F":
            return Image.fromarray(_to_uint8(np.asarray(image), 32, None, path)).convert("RGB"), f"plain image ({kind})"
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
            return _on_white(image.convert("RGBA")), f"plain image ({kind})"
        return image.convert("RGB"), f"plain image ({kind})"


def _read_tiff(path: Path) -> tuple[Image.Image, str]:
    """A TIFF OpenSlide refused (untiled, or not a pyramid it knows) through tifffile: the largest
    page (the first of equally large ones; pages after it are logged as ignored) as RGB uint8."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            chosen = max(range(len(pages)), key=lambda i: (pages[i].imagewidth * pages[i].imagelength, -i))
            page = pages[chosen]
            if len(pages) > 1:
                ignored = [i for i in range(len(pages)) if i != chosen]
                log.info(
                    "%s: %d pages; using page %d (%d x %d px), ignoring page(s) %s",
                    path,
                    len(pages),
                    chosen,
                    page.imagewidth,
                    page.imagelength,
                    ", ".join(map(str, ignored)),
                )
            array = page.asarray()
            rgb = _tiff_page_rgb(array, page, path)
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001 - tifffile/imagecodecs raise many types for undecodable data
        raise SlideError(
            f"{path}: a plain TIFF tifffile cannot decode ({err}); convert it to 8-bit RGB "
            "(e.g. a tiled pyramidal TIFF with vips tiffsave --tile --pyramid)"
        ) from err
    description = f"plain TIFF ({len(pages)} pages, page {chosen} used)" if len(pages) > 1 else "plain TIFF"
    return Image.fromarray(rgb), description


def _tiff_page_rgb(array: np.ndarray, page, path: Path) -> np.ndarray:
    """One TIFF page's samples as (H, W, 3) uint8: planar samples moved last, palette applied,
    grey repeated, an alpha sample composited on white, >8-bit samples scaled to 8 bits."""
    import tifffile

    axes = page.axes
    if axes.startswith("S"):  # planar configuration: samples first
        array, axes = np.moveaxis(array, 0, -1), axes[1:] + "S"
    if axes not in ("YX", "YXS"):
        raise SlideError(
            f"{path}: TIFF page with axes {axes!r} (e.g. a z-stack or time series); only 2-D grey or "
            "colour images are supported: export one RGB plane"
        )
    photometric = page.photometric
    if photometric == tifffile.PHOTOMETRIC.SEPARATED:
        raise SlideError(f"{path}: a CMYK TIFF; convert it to RGB")
    if photometric == tifffile.PHOTOMETRIC.PALETTE:
        colormap = page.colormap  # (3, 2**bits) uint16
        lut = np.round(colormap.T * (255 / 65535 if colormap.max() > 255 else 1)).astype(np.uint8)
        return lut[array]
    if array.ndim == 2:
        array = array[..., None]
    samples = array.shape[-1]
    if samples not in (1, 2, 3, 4):
        raise SlideError(f"{path}: TIFF page with {samples} samples per pixel; expected grey, grey+alpha, RGB or RGBA")
    max_value = page.tags.get("MaxSampleValue")
    max_value = max_value.value if max_value is not None else None
    if isinstance(max_value, tuple):
        max_value = max(max_value)
    pixels = _to_uint8(array, page.bitspersample, max_value, path)
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        pixels[..., : 1 if samples <= 2 else 3] = 255 - pixels[..., : 1 if samples <= 2 else 3]
    colour, alpha = (pixels[..., :1], pixels[..., 1:2]) if samples <= 2 else (pixels[..., :3], pixels[..., 3:])
    if alpha.shape[-1]:
        a = alpha.astype(np.float32) / 255
        premultiplied = (page.extrasamples or (0,))[0] == tifffile.EXTRASAMPLE.ASSOCALPHA
        colour = np.round((colour if premultiplied else colour * a) + 255 * (1 - a)).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(colour, 3, axis=-1) if colour.shape[-1] == 1 else colour)


def _to_uint8(array: np.ndarray, bits: int, max_value: int | None, path: Path) -> np.ndarray:
    """Samples as uint8: 8-bit as they are, 1-bit to 0/255, unsigned >8-bit scaled by 255/max where max is
    the MaxSampleValue tag or else 2**bits - 1 (e.g. 4095 for 12-bit), float in [0, 1] scaled by 255."""
    if array.dtype == np.uint8:
        return array  # decoded for us alone: no copy
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "u":
        top = int(max_value) if max_value else (2 ** min(int(bits), array.dtype.itemsize * 8) - 1)
        log.info("%s: %d-bit samples (%s..%s) scaled to 8 bits (x 255/%d)", path, bits, array.min(), array.max(), top)
        return np.round(np.minimum(array, top).astype(np.float32) * (255 / top)).astype(np.uint8)
    if array.dtype.kind == "f" and array.size and 0 <= np.nanmin(array) and np.nanmax(array) <= 1:
        return np.round(np.nan_to_num(array) * 255).astype(np.uint8)
    raise SlideError(
        f"{path}: {array.dtype} samples (range {array.min()}..{array.max()}) have no clear mapping to "
        "8-bit colour; convert the image to 8- or 16-bit unsigned RGB or grey"
    )


def _on_white(rgba: Image.Image) -> Image.Image:
    """An RGBA region as RGB with its transparent (unscanned) pixels white."""
    if rgba.mode == "RGBA" and rgba.getextrema()[3][0] < 255:
        rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return rgba.convert("RGB")
