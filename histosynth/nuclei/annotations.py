"""Nuclei annotations in every format the region annotations take (histosynth.data.annotations
tells them apart by content): QuPath GeoJSON detections, MoNuSeg/Aperio ImageScope XML (one
Region per nucleus), ASAP XML (one Annotation per nucleus) and instance-mask images (PNG/TIFF,
integer ids, 0 = background). One reader serves the workflow (nucleus polygons in level-0 pixels
for nuclei_quality and train_nuclei) and nuclei-score (instance masks of image folders)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from shapely.geometry import mapping
from skimage.draw import polygon as draw_polygon

from histosynth.data.annotations import AnnotationError, detect_format
from histosynth.data.annotations.aperio import aperio_regions
from histosynth.data.annotations.asap import asap_polygons
from histosynth.data.annotations.geojson import read_features
from histosynth.data.annotations.masks import mask_downsample as check_mask_size
from histosynth.data.annotations.masks import read_mask_image
from histosynth.data.slides import Slide
from histosynth.nuclei.geojson import NucleusRasterizer, instance_outline
from histosynth.nuclei.instances import NucleiError

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".png", ".tif", ".tiff")
IMAGE_SUFFIXES = (*MASK_SUFFIXES, ".jpg", ".jpeg")
SUFFIXES = (*MASK_SUFFIXES, ".xml", ".geojson", ".json")


def read_nuclei(
    path: str | Path, *, mask_downsample: float = 1.0, aperio_class: str = "Name", slide: str | Path | None = None
) -> list[dict]:
    """Nucleus features (GeoJSON Features with polygon geometry in level-0 pixels and, where the
    file gives one, classification.name) of a nuclei annotation file of any accepted format, for
    NucleusRasterizer. An instance mask's pixel (r, c) covers level-0 [c*d, (c+1)*d) x [r*d, ...)
    for d = mask_downsample; its nuclei are unclassified (`other`); given the `slide` file, a mask that
    does not cover it at that downsample is an error naming both sizes (and the downsample it looks
    like). Aperio regions marked NegativeROA are not nuclei and are skipped."""
    path = Path(path)
    try:
        kind = detect_format(path)
        if kind == "geojson":
            return read_features(path)
        if kind == "aperio":
            regions = [r for r in aperio_regions(path, aperio_class) if not r.negative]
            return [_feature(mapping(r.geometry), r.class_name) for r in regions]
        if kind == "asap":
            return [
                _feature({"type": "Polygon", "coordinates": [np.vstack([p, p[:1]]).tolist()]}, group)
                for group, p, _ in asap_polygons(path, need_group=False)
                if len(p) >= 3
            ]
        instances = read_mask_image(path, "an instance mask")
        size = None
        if slide is not None:
            with Slide(slide, need_mpp=False) as opened:
                size = opened.dimensions
        return _mask_features(instances, check_mask_size(path, instances.shape, size, mask_downsample))
    except AnnotationError as err:
        raise NucleiError(f"nuclei annotations: {err}") from None


def _feature(geometry: dict, class_name: str) -> dict:
    properties = {"objectType": "detection"}
    if class_name:
        properties["classification"] = {"name": class_name}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def _mask_features(instances: np.ndarray, scale: float) -> list[dict]:
    """One unclassified feature per instance id of a mask, outlined so that rasterising it on the
    mask's own grid gives the instance back."""
    features = []
    for index, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        crop = np.pad(instances[box] == index, 1)
        geometry = instance_outline(crop, (box[1].start - 1) * scale, (box[0].start - 1) * scale, scale)
        if geometry is not None:
            features.append(_feature(geometry, ""))
    return features


def annotation_files(folder: str | Path) -> dict[str, Path]:
    """Stem -> annotation file (instance mask, XML or GeoJSON) of a folder; a stem given twice is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NucleiError(f"{folder}: not a folder of instance masks (PNG/TIFF), MoNuSeg/ASAP XML or GeoJSON files")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in SUFFIXES:
            continue
        if path.stem in files:
            raise NucleiError(
                f"{folder}: {files[path.stem].name} and {path.name} both annotate {path.stem!r}; keep one"
            )
        files[path.stem] = path
    return files


def is_mask(path: str | Path) -> bool:
    """Whether an annotation file is an instance-mask image (by content)."""
    try:
        return detect_format(path) == "mask"
    except AnnotationError as err:
        raise NucleiError(str(err)) from None


def read_mask(path: str | Path) -> np.ndarray:
    """An instance mask (PNG/TIFF of integer ids, 0 = background) as int64."""
    try:
        return read_mask_image(path, "an instance mask")
    except AnnotationError as err:
        raise NucleiError(str(err)) from None


def read_xml(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """The nuclei of a MoNuSeg/Aperio XML file as an int64 instance mask of `shape`: region k (in
    file order, negative regions left out) is id k, later regions painted over earlier ones; a
    pixel belongs to a polygon containing it (skimage.draw.polygon, as the benchmark's scorer)."""
    out = np.zeros(shape, np.int64)
    try:
        regions = [r for r in aperio_regions(path) if not r.negative]
    except AnnotationError as err:
        raise NucleiError(str(err)) from None
    for k, region in enumerate(regions, start=1):
        for part in getattr(region.geometry, "geoms", [region.geometry]):
            points = np.asarray(part.exterior.coords)
            rr, cc = draw_polygon(points[:, 1], points[:, 0], shape)
            out[rr, cc] = k
    return out


def read_annotation(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Instances of an annotation file: a mask as is; polygons (XML, GeoJSON) rasterised on `shape`."""
    path = Path(path)
    if is_mask(path):
        return read_mask(path)
    if shape is None:
        raise NucleiError(f"{path}: a polygon annotation needs the image size; give the images folder (--images)")
    if detect_format(path) == "aperio":
        return read_xml(path, shape)
    instances, _ = NucleusRasterizer(read_nuclei(path)).rasterize(0, 0, shape[1], shape[0], shape)
    return instances.astype(np.int64)


def image_shape(folder: str | Path, stem: str) -> tuple[int, int]:
    """(rows, cols) of the image <stem>.* in `folder`."""
    for path in sorted(Path(folder).glob(f"{stem}.*")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                return image.height, image.width
    raise NucleiError(f"{folder}: no image named {stem}.png/.tif/.jpg for the annotation of {stem}")


def read_annotated_folder(
    images_dir: str | Path, annotations_dir: str | Path
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(stem, RGB uint8, instances) of every image in images_dir (PNG/TIFF/JPEG) that has an
    annotation of the same stem in annotations_dir; images without one are an error naming them."""
    images = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise NucleiError(f"{images_dir}: no images (.png, .tif, .jpg)")
    annotations = annotation_files(annotations_dir)
    missing = [p.name for p in images if p.stem not in annotations]
    if missing:
        raise NucleiError(
            f"{annotations_dir}: no annotation (<stem>.xml/.png/.tif/.geojson) for {', '.join(missing[:10])}"
        )
    out = []
    for path in images:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        instances = read_annotation(annotations[path.stem], rgb.shape[:2])
        if instances.shape != rgb.shape[:2]:
            raise NucleiError(
                f"{annotations[path.stem]}: {instances.shape[1]}x{instances.shape[0]} px but its image "
                f"{path.name} is {rgb.shape[1]}x{rgb.shape[0]}"
            )
        out.append((path.stem, rgb, instances))
    return out
