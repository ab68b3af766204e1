"""The images of a folder for `histosynth sheet`: an ImageFolder (one sub-folder per class) or a flat
folder of plain images, slide files and DICOM WSI series, with unique slide names."""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm")
IMAGE_SUFFIXES = PLAIN_SUFFIXES + SLIDE_SUFFIXES
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")  # slides.schema.yaml's slide pattern


class SheetError(ValueError):
    """A folder that cannot become a slide sheet; the message says why and what to change."""


@dataclass
class Entry:
    """One image of the folder: its file, label ('' = none), name (before sanitising) and its path
    relative to the folder without suffix (where its annotations are looked up)."""

    path: Path
    label: str
    name: str
    relative: Path


def scan_folder(folder: str | Path) -> list[Entry]:
    """The images of an ImageFolder (FOLDER/<class>/<image>) or a flat folder (FOLDER/<image>)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SheetError(f"{folder}: no such folder")
    images, classes, other = _classify(folder)
    if images and classes:
        raise SheetError(
            f"{folder}: mixed layout: {len(images)} image(s) (e.g. {images[0].name}) next to {len(classes)} "
            f"sub-folder(s) (e.g. {classes[0].name}/); use either one sub-folder per class (ImageFolder) or only "
            "images (flat, no labels)"
        )
    if classes:
        entries = []
        for class_dir in classes:
            found, nested, skipped = _classify(class_dir)
            if nested:
                raise SheetError(
                    f"{class_dir}: holds sub-folders ({', '.join(d.name for d in nested[:3])}); an "
                    "ImageFolder has images directly in each class folder (FOLDER/<class>/<image>)"
                )
            if not found:
                log.warning(
                    "%s: class folder without images (%s); no images of class %r",
                    class_dir,
                    _describe_other(skipped) or "empty",
                    class_dir.name,
                )
            entries += _entries(folder, found, class_dir.name)
    else:
        entries = _entries(folder, images, "")
    if not entries:
        detail = _describe_other(other)
        raise SheetError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found"
            + (f"; it holds only {detail}" if detail else ": the folder is empty")
        )
    return entries


def _classify(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """A folder's image items (files with an image suffix and DICOM WSI folders), other sub-folders,
    and the files it ignores. A MIRAX slide's data folder (named like the .mrxs file) is no sub-folder."""
    children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    mirax = {p.stem for p in children if p.suffix.lower() == ".mrxs" and p.is_file()}
    images, folders, other = [], [], []
    for child in children:
        if child.is_dir():
            if child.name in mirax:
                continue
            (images if _is_dicom_folder(child) else folders).append(child)
        elif child.suffix.lower() in IMAGE_SUFFIXES:
            images.append(child)
        else:
            other.append(child)
    return images, folders, other


def _is_dicom_folder(folder: Path) -> bool:
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return any(p.suffix.lower() == ".dcm" for p in children) and not any(p.is_dir() for p in children)


def _describe_other(files: list[Path]) -> str:
    counts = Counter(p.suffix.lower() or "(no suffix)" for p in files)
    return ", ".join(f"{n} {suffix} file{'s' * (n > 1)}" for suffix, n in sorted(counts.items()))


def _entries(root: Path, items: list[Path], label: str) -> list[Entry]:
    """Entries of one folder's items: files as they are, .dcm files (loose or in DICOM folders) one per series."""
    entries, loose_dicom = [], []
    for item in items:
        if item.is_dir():  # a DICOM WSI folder: one image per series, named after the folder
            series = _dicom_series(sorted(p for p in item.iterdir() if p.suffix.lower() == ".dcm"))
            for files in series:
                entries.append(Entry(_level0(files), label, item.name, item.relative_to(root)))
        elif item.suffix.lower() == ".dcm":
            loose_dicom.append(item)
        else:
            entries.append(Entry(item, label, item.stem, item.relative_to(root).with_suffix("")))
    for files in _dicom_series(loose_dicom):
        first = _level0(files)
        entries.append(Entry(first, label, first.stem, first.relative_to(root).with_suffix("")))
    return entries


def _dicom_series(files: list[Path]) -> list[list[Path]]:
    """.dcm files grouped by SeriesInstanceUID (one whole-slide image each; OpenSlide opens a series
    from any of its files); a file whose header cannot be read is a series of its own."""
    if not files:
        return []
    import pydicom

    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        try:
            uid = str(
                pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
            )
        except Exception:  # noqa: BLE001 - unreadable or without the UID: its own image, reported when opened
            uid = f"file:{path}"
        groups[uid].append(path)
    return list(groups.values())


def _level0(files: list[Path]) -> Path:
    """The file the sheet points at for a DICOM series: the largest (the full-resolution level)."""
    return max(files, key=lambda p: (p.stat().st_size, p.name))


def unique_names(entries: list[Entry]) -> list[str]:
    """Slide names matching ^[A-Za-z0-9_.-]+$, unique: other characters become '_'; a name used in
    several classes is prefixed with its class; what still repeats gets -2, -3, ... (in path order)."""
    names = [_sanitise(entry.name) for entry in entries]
    labels_of: dict[str, set[str]] = defaultdict(set)
    for name, entry in zip(names, entries, strict=True):
        labels_of[name].add(entry.label)
    names = [
        _sanitise(f"{entry.label}_{name}") if len(labels_of[name]) > 1 else name
        for name, entry in zip(names, entries, strict=True)
    ]
    taken = set(names)
    seen: set[str] = set()
    result = []
    for i in sorted(range(len(entries)), key=lambda i: str(entries[i].path)):
        name = names[i]
        if name in seen:
            count = 2
            while f"{name}-{count}" in taken:
                count += 1
            name = f"{name}-{count}"
            taken.add(name)
        seen.add(name)
        result.append((i, name))
    return [name for _, name in sorted(result)]


def _sanitise(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
    return name or "image"
