"""DICOM whole-slide images: recognising a DICOM file and saying, from its header, why OpenSlide
refused it (not a whole-slide image, or the required WSI attributes it lacks)."""

from __future__ import annotations

from pathlib import Path

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
# Attributes OpenSlide 4 (libdicom) needs in each DICOM WSI instance: without any one of them it
# refuses the file (checked by deleting each from a wsidicomizer-written instance).
DICOM_WSI_REQUIRED = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "ImageType",
    "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def is_dicom(path: Path) -> bool:
    """Whether the file is DICOM Part 10: 'DICM' after the 128-byte preamble."""
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def dicom_problem(path: Path, err: Exception) -> str:
    """Why OpenSlide refused a DICOM file, from its header: not a whole-slide image, or the
    required WSI attributes it lacks."""
    start = f"{path}: a DICOM file OpenSlide cannot open as a whole-slide image ({err})"
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as read_err:  # noqa: BLE001 - any parse failure is reported as such
        return f"{start}; pydicom cannot parse its header either ({read_err}): the file looks truncated or corrupt"
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class and sop_class != WSI_SOP_CLASS:
        name = getattr(pydicom.uid.UID(sop_class), "name", sop_class)
        return (
            f"{start}; its SOPClassUID is {sop_class} ({name}), not VL Whole Slide Microscopy Image Storage "
            f"{WSI_SOP_CLASS}: only DICOM whole-slide images are slides; convert the scan with wsidicomizer"
        )
    missing = [key for key in DICOM_WSI_REQUIRED if key not in ds and not (key == "SOPClassUID" and sop_class)]
    samples = ds.get("SamplesPerPixel", 1)
    if samples and int(samples) > 1 and "PlanarConfiguration" not in ds:
        missing.append("PlanarConfiguration")
    image_type = list(ds.get("ImageType", []) or [])
    problems = []
    if missing:
        problems.append("it lacks the required WSI attribute(s) " + ", ".join(missing))
    if image_type and (len(image_type) < 3 or image_type[2] not in ("VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL")):
        problems.append(f"its ImageType {image_type} has no third value VOLUME, LABEL, OVERVIEW or THUMBNAIL")
    if not problems:
        return (
            f"{start}; its header has every required WSI attribute, so the pixel data or a sibling instance is "
            "probably damaged: convert the slide again (e.g. with wsidicomizer) or validate it with dciodvfy"
        )
    return f"{start}; {'; '.join(problems)}: write it with a DICOM WSI converter (e.g. wsidicomizer)"
