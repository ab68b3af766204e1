"""Which annotation format a file holds, told by its content (not only its suffix), and the
one entry point that reads any of them into Regions. The sheet's files are checked here when
the workflow starts, so a file of the wrong kind fails before any job."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from histosynth.config import section_defaults
from histosynth.data.annotations.aperio import read_aperio
from histosynth.data.annotations.asap import read_asap
from histosynth.data.annotations.geojson import read_geojson
from histosynth.data.annotations.masks import TIFF_MAGIC, read_label_mask
from histosynth.data.annotations.regions import AnnotationError, Region

# format -> what it is, for messages and docs/annotations.md
FORMATS = {
    "geojson": "QuPath GeoJSON",
    "asap": "ASAP XML",
    "aperio": "Aperio ImageScope XML",
    "mask": "label-mask image (PNG/TIFF)",
}
_XML_ROOTS = {"ASAP_Annotations": "asap", "Annotations": "aperio"}
_ACCEPTED = ", ".join(FORMATS.values())


def detect_format(path: str | Path) -> str:
    """'geojson', 'asap', 'aperio' or 'mask' from the file's first bytes (and an XML file's root
    element); a missing file or any other content is an AnnotationError naming it."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError as err:
        raise AnnotationError(
            f"{path}: cannot read the annotation file ({err.strerror}); fix the path in the sheet"
        ) from None
    if head.startswith(b"\x89PNG") or head[:4] in TIFF_MAGIC:
        return "mask"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 (some Windows tools save XML so)
        head = head.decode("utf-16", errors="ignore").encode()
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] == b"<":
        return _xml_format(path)
    if not text or text[:1] in b'{["-0123456789tfn' or path.suffix.lower() in (".json", ".geojson"):
        return "geojson"  # JSON: the GeoJSON reader says what is wrong with it, if anything
    kind = "a JPEG image (lossy: not a mask)" if head.startswith(b"\xff\xd8") else "neither JSON, XML nor PNG/TIFF"
    raise AnnotationError(f"{path}: {kind}; accepted annotation formats are {_ACCEPTED}")


def _xml_format(path: Path) -> str:
    try:
        for _, element in ET.iterparse(path, events=("start",)):
            root = element.tag
            break
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: not readable XML ({err})") from None
    if root not in _XML_ROOTS:
        raise AnnotationError(
            f"{path}: XML with root <{root}>; accepted are ASAP XML (<ASAP_Annotations>) and "
            "Aperio ImageScope XML (<Annotations>)"
        )
    return _XML_ROOTS[root]


def load_regions(
    path: str | Path, settings: Mapping | None = None, *, slide_size: tuple[int, int] | None = None
) -> list[Region]:
    """The regions of an annotation file of any accepted format. `settings` is config
    `annotations` (schema defaults for what it leaves out): class_key (GeoJSON), aperio_class
    (Aperio), mask_values and mask_downsample (label masks, checked against slide_size = (width,
    height) when given)."""
    s = section_defaults("annotations", dict(settings or {}))
    kind = detect_format(path)
    if kind == "geojson":
        return read_geojson(path, s["class_key"])
    if kind == "asap":
        return read_asap(path)
    if kind == "aperio":
        return read_aperio(path, s["aperio_class"])
    if not s["mask_values"]:
        raise AnnotationError(
            f"{path}: a label-mask image needs annotations.mask_values ({{value: class}}, 0 = background) in the config"
        )
    return read_label_mask(path, s["mask_values"], s["mask_downsample"], slide_size)


def check_sheet_files(sheet, sheet_path: str | Path, mask_values=None) -> None:
    """Every existing file of the sheet's annotations and nuclei columns is of an accepted format, and
    a label mask in the annotations column has annotations.mask_values to name its values (checked
    at workflow start: a file of the wrong kind fails before any job)."""
    for column in ("annotations", "nuclei"):
        for slide, path in zip(sheet["slide"], sheet[column] if column in sheet else (), strict=False):
            if not path or not Path(path).exists():  # a missing file: Snakemake names it, or a rule makes it (demo)
                continue
            try:
                kind = detect_format(path)
            except AnnotationError as err:
                raise AnnotationError(f"{sheet_path}, slide {slide}, column {column}: {err}") from None
            if column == "annotations" and kind == "mask" and not mask_values:
                raise AnnotationError(
                    f"{sheet_path}, slide {slide}, column annotations: {path} is a label mask, but "
                    "annotations.mask_values is empty; map its values to classes, e.g. "
                    "annotations: {mask_values: {1: Tumor, 2: Stroma}} (0 is background)"
                )
