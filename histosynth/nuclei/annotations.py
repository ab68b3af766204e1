"""Nuclei annotations of image folders: instance masks (PNG/TIFF, 0 = background) and
MoNuSeg-style Aperio XML (one Region of Vertices per nucleus), read as instance masks."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import polygon as draw_polygon

from histosynth.nuclei.instances import NucleiError

MASK_SUFFIXES = (".png", ".tif", ".tiff")
SUFFIXES = (*MASK_SUFFIXES, ".xml")


def annotation_files(folder: str | Path) -> dict[str, Path]:
    """Stem -> annotation file (instance mask or XML) of a folder; a stem given twice is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NucleiError(f"{folder}: not a folder of instance masks (PNG/TIFF) or MoNuSeg XML files")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in SUFFIXES:
            continue
        if path.stem in files:
            raise NucleiError(f"{folder}: {files[path.stem].name} and {path.name} both annotate {path.stem!r}; keep one")
        files[path.stem] = path
    return files


def read_mask(path: str | Path) -> np.ndarray:
    """An instance mask (PNG/TIFF of integer ids, 0 = background) as int64."""
    with Image.open(path) as image:
        mask = np.asarray(image)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer) and mask.dtype != bool:
        raise NucleiError(f"{path}: an instance mask must be one channel of integer ids (0 = background), "
                          f"got shape {mask.shape} of {mask.dtype}")
    return mask.astype(np.int64)


def read_xml(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """The nuclei of a MoNuSeg/Aperio XML file (Regions whose Vertices carry X, Y in pixels) as an
    int64 instance mask of `shape`: region k (in file order, those with 3+ vertices) is id k,
    later regions painted over earlier ones; a pixel belongs to a polygon containing it
    (skimage.draw.polygon, as the benchmark's scorer)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise NucleiError(f"{path}: not readable XML ({error})") from None
    out = np.zeros(shape, np.int64)
    k = 0
    for region in root.iter("Region"):
        try:
            points = np.array([(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")])
        except (TypeError, ValueError):
            raise NucleiError(f"{path}: Region {region.get('Id', '?')} has a Vertex without numeric X and Y") from None
        if len(points) < 3:
            continue
        k += 1
        rr, cc = draw_polygon(points[:, 1], points[:, 0], shape)
        out[rr, cc] = k
    return out


def read_annotation(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Instances of an annotation file: a mask as is, an XML file rasterised on `shape`."""
    path = Path(path)
    if path.suffix.lower() != ".xml":
        return read_mask(path)
    if shape is None:
        raise NucleiError(f"{path}: an XML annotation needs the image size; give the images folder (--images)")
    return read_xml(path, shape)


def image_shape(folder: str | Path, stem: str) -> tuple[int, int]:
    """(rows, cols) of the image <stem>.* in `folder`."""
    for path in sorted(Path(folder).glob(f"{stem}.*")):
        if path.suffix.lower() in (*MASK_SUFFIXES, ".jpg", ".jpeg"):
            with Image.open(path) as image:
                return image.height, image.width
    raise NucleiError(f"{folder}: no image named {stem}.png/.tif/.jpg for the annotation {stem}.xml")


def read_annotated_folder(images_dir: str | Path, annotations_dir: str | Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(stem, RGB uint8, instances) of every image in images_dir (PNG/TIFF/JPEG) that has an
    annotation of the same stem in annotations_dir; images without one are an error naming them."""
    images = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in (*MASK_SUFFIXES, ".jpg", ".jpeg"))
    if not images:
        raise NucleiError(f"{images_dir}: no images (.png, .tif, .jpg)")
    annotations = annotation_files(annotations_dir)
    missing = [p.name for p in images if p.stem not in annotations]
    if missing:
        raise NucleiError(f"{annotations_dir}: no annotation (<stem>.xml/.png/.tif) for {', '.join(missing[:10])}")
    out = []
    for path in images:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        instances = read_annotation(annotations[path.stem], rgb.shape[:2])
        if instances.shape != rgb.shape[:2]:
            raise NucleiError(f"{annotations[path.stem]}: {instances.shape[1]}x{instances.shape[0]} px but its image "
                              f"{path.name} is {rgb.shape[1]}x{rgb.shape[0]}")
        out.append((path.stem, rgb, instances))
    return out
