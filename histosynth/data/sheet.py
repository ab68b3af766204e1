"""`histosynth sheet`: a slide sheet (TSV) from a folder of images, split by image.

Layouts: an ImageFolder (one sub-folder per class; the sub-folder's name becomes each image's
`label`) or a flat folder (no label). Images are plain PNG/JPEG/TIFF files or slide files; a DICOM
WSI is one series of .dcm files (a folder of them, as wsidicomizer writes it, counts as one image,
named after the folder). Splits are drawn per label (stratified), deterministic given the seed, and
optionally keep images of one group (a regex capture of the name, e.g. the patient) together.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.data.annotations import FORMATS, AnnotationError, detect_format
from histosynth.files import atomic_file
from histosynth.seeds import derive_seed

log = logging.getLogger(__name__)

SHEET_COLUMNS = ("slide", "image", "annotations", "split", "mpp", "label")
SPLITS = ("train", "val", "test")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm")
IMAGE_SUFFIXES = PLAIN_SUFFIXES + SLIDE_SUFFIXES
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")  # slides.schema.yaml's slide pattern
POLYGON_SUFFIXES = (".geojson", ".json", ".xml")  # --annotations: QuPath GeoJSON, ASAP or Aperio XML
MASK_SUFFIXES = (".png", ".tif", ".tiff")  # --masks: label-mask images
POLYGON_KINDS = ("geojson", "asap", "aperio")  # histosynth.data.annotations.FORMATS of polygon files


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


def parse_split(text: str) -> dict[str, float]:
    """'train=0.6,val=0.2,test=0.2' -> {'train': 0.6, 'val': 0.2, 'test': 0.2} (fractions summing to 1)."""
    fractions: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not sep or name not in SPLITS or not 0 <= fraction <= 1 or name in fractions:
            raise SheetError(
                f"--split: {item!r} is not SPLIT=FRACTION with SPLIT one of {', '.join(SPLITS)} "
                "(each once) and FRACTION in [0, 1]"
            )
        fractions[name] = fraction
    if not fractions or not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise SheetError(f"--split: fractions must sum to 1, got {text!r}")
    return {name: f for name, f in fractions.items() if f > 0}


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


def assign_splits(labels: list[str], groups: list[str], fractions: dict[str, float], seed: int) -> list[str]:
    """The split of every image: groups (images sharing a group stay together; by default each
    image is its own) are shuffled per label with a seed derived from `seed` and the label, and
    dealt out by `fractions` (largest remainder), every split getting at least one group of each
    label. A group's label is its most common one."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    by_label: dict[str, list[str]] = defaultdict(list)
    for group, rows in members.items():
        counts = Counter(labels[i] for i in rows)
        top = max(counts.values())
        label = min(name for name, n in counts.items() if n == top)
        if len(counts) > 1:
            log.warning("group %r holds images of labels %s; stratified as %r", group, dict(counts), label)
        by_label[label].append(group)
    names = list(fractions)
    too_few = {label: len(units) for label, units in by_label.items() if len(units) < len(names)}
    if too_few:
        unit = "groups" if len(members) < len(groups) else "images"
        listing = ", ".join(f"{label or '(no label)'!r}: {n}" for label, n in sorted(too_few.items()))
        raise SheetError(
            f"too few {unit} to give each of the {len(names)} splits ({', '.join(names)}) at least one per label: "
            f"{listing}; add images, merge those classes, or use fewer splits (e.g. --split train=0.8,val=0.2)"
        )
    split_of = [""] * len(labels)
    for label in sorted(by_label):
        units = sorted(by_label[label])
        order = np.random.default_rng(derive_seed(seed, "sheet", label)).permutation(len(units))
        start = 0
        for name, count in zip(names, _counts(len(units), [fractions[n] for n in names]), strict=True):
            for position in order[start : start + count]:
                for i in members[units[position]]:
                    split_of[i] = name
            start += count
    return split_of


def _counts(n: int, fractions: list[float]) -> list[int]:
    """n split by fractions: floors plus the remainder to the largest fractional parts (earlier
    splits first on ties), then one taken from the largest for every split left empty."""
    exact = [n * f for f in fractions]
    counts = [math.floor(x + 1e-9) for x in exact]
    for i in sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0:
            counts[max(range(len(counts)), key=lambda j: (counts[j], -j))] -= 1
            counts[i] = 1
    return counts


def build_sheet(
    folder: str | Path,
    *,
    split: dict[str, float],
    seed: int = 0,
    mpp: float | None = None,
    annotations_dir: str | Path | None = None,
    masks_dir: str | Path | None = None,
    nuclei_dir: str | Path | None = None,
    absolute: bool = False,
    group: str | re.Pattern | None = None,
) -> pd.DataFrame:
    """The slide sheet (columns SHEET_COLUMNS) of the images under `folder`. Paths are written
    relative to the working directory (as the workflow resolves them), or absolute. `mpp` fills
    the mpp column (required when plain PNG/JPEG/TIFF images are present); `annotations_dir` is
    searched for <relative path>.<suffix>, then <name>.<suffix>, per image, for a polygon file
    (.geojson, .json, .xml: QuPath GeoJSON, ASAP or Aperio XML), `masks_dir` likewise for a
    label-mask image (.png, .tif, .tiff), `nuclei_dir` for hand-drawn nuclei in any of those
    formats (an instance mask for a mask; adds the nuclei column); `group` is a regex whose first
    capture group (on the image's name) keeps images together in one split."""
    entries = scan_folder(folder)
    if mpp is None:
        plain = [e.path for e in entries if _is_plain(e.path)]
        if plain:
            raise SheetError(
                f"{folder}: {len(plain)} plain image(s) (e.g. {plain[0]}) record no trustworthy resolution; "
                "give their microns per pixel with --mpp"
            )
    elif not mpp > 0:
        raise SheetError(f"--mpp must be a positive number of microns per pixel, got {mpp}")
    names = unique_names(entries)
    groups = _groups(entries, names, group)
    splits = assign_splits([e.label for e in entries], groups, split, seed)
    regions = [(annotations_dir, POLYGON_SUFFIXES, POLYGON_KINDS), (masks_dir, MASK_SUFFIXES, ("mask",))]
    annotations = [_annotation_file(e, regions) for e in entries]
    nuclei = [
        _annotation_file(e, [(nuclei_dir, POLYGON_SUFFIXES + MASK_SUFFIXES, (*POLYGON_KINDS, "mask"))]) for e in entries
    ]
    for folder_given, files in ((annotations_dir, annotations), (masks_dir, annotations), (nuclei_dir, nuclei)):
        if folder_given:
            found = sum(a is not None and Path(folder_given) in a.parents for a in files)
            log.info("%d of %d images have annotations in %s", found, len(entries), folder_given)
    sheet = pd.DataFrame(
        {
            "slide": names,
            "image": [_written(e.path, absolute) for e in entries],
            "annotations": [_written(a, absolute) if a else "" for a in annotations],
            "split": splits,
            "mpp": f"{mpp:g}" if mpp else "",
            "label": [e.label for e in entries],
            **({"nuclei": [_written(n, absolute) if n else "" for n in nuclei]} if nuclei_dir else {}),
        },
        columns=[*SHEET_COLUMNS, *(["nuclei"] if nuclei_dir else [])],
    )
    for column in ("image", "annotations", "label", *(["nuclei"] if nuclei_dir else [])):
        bad = [text for text in sheet[column] if any(ch in text for ch in "\t\n\r#")]
        if bad:
            raise SheetError(
                f"{column} {bad[0]!r} holds a tab, line break or '#', which the slide sheet cannot carry "
                "('#' starts a comment there); rename it"
            )
    return sheet.sort_values(["label", "slide"], kind="stable").reset_index(drop=True)


def _is_plain(path: Path) -> bool:
    """Whether a file is a plain image OpenSlide does not read (so it has no recorded mpp)."""
    if path.suffix.lower() not in PLAIN_SUFFIXES:
        return False
    import openslide

    return openslide.OpenSlide.detect_format(str(path)) is None


def _groups(entries: list[Entry], names: list[str], group: str | re.Pattern | None) -> list[str]:
    if group is None:
        return names
    pattern = re.compile(group) if isinstance(group, str) else group
    if pattern.groups < 1:
        raise SheetError(f"--group {pattern.pattern!r} needs a capture group, e.g. '^(patient[0-9]+)_'")
    keys, unmatched = [], []
    for entry, name in zip(entries, names, strict=True):
        match = pattern.search(entry.name)
        if match is None or match.group(1) is None:
            unmatched.append(entry.name)
            keys.append(f"image:{name}")
        else:
            keys.append(f"group:{match.group(1)}")
    if unmatched:
        log.warning(
            "--group %r matches %d of %d image names (not e.g. %r); those are split on their own",
            pattern.pattern,
            len(entries) - len(unmatched),
            len(entries),
            unmatched[0],
        )
    return keys


def _annotation_file(entry: Entry, searches: list[tuple]) -> Path | None:
    """The image's annotation file among the (folder, suffixes, accepted formats) searches (a
    folder of None is skipped; found in two is an error), checked to be of a format its folder holds."""
    found = []
    for directory, suffixes, kinds in searches:
        if not directory:
            continue
        path = _find(entry, Path(directory), suffixes)
        if path is None:
            continue
        try:
            kind = detect_format(path)
        except AnnotationError as err:
            raise SheetError(str(err)) from None
        if kind not in kinds:
            raise SheetError(
                f"{path}: holds {FORMATS[kind]}, but {directory} is searched for "
                f"{' or '.join(FORMATS[k] for k in kinds)}; move it to the other folder option"
            )
        found.append(path)
    if len(found) > 1:
        raise SheetError(f"{entry.path}: annotated twice ({found[0]} and {found[1]}); keep one of them")
    return found[0] if found else None


def _find(entry: Entry, directory: Path, suffixes: tuple[str, ...]) -> Path | None:
    """<relative path>.<suffix>, then <name>.<suffix>, in `directory`; two suffixes of one stem are an error."""
    for stem in (directory / entry.relative.as_posix(), directory / entry.name):
        candidates = [stem.with_name(stem.name + suffix) for suffix in suffixes]
        candidates = [c for c in candidates if c.is_file()]
        if len(candidates) > 1:
            raise SheetError(
                f"{directory}: {candidates[0].name} and {candidates[1].name} both annotate {entry.path.name}; keep one"
            )
        if candidates:
            return candidates[0]
    return None


def _written(path: Path, absolute: bool) -> str:
    return str(path.resolve()) if absolute else os.path.relpath(path)


def write_sheet(sheet: pd.DataFrame, path: str | Path) -> Path:
    """Write the sheet as TSV (atomically)."""
    with atomic_file(path) as tmp:
        sheet.to_csv(tmp, sep="\t", index=False)
    return Path(path)


def summary(sheet: pd.DataFrame) -> str:
    """Images per label (rows) and split (columns), with totals."""
    labels = sheet["label"].replace("", "(no label)")
    table = pd.crosstab(labels, sheet["split"], margins=True, margins_name="total")
    table = table[[s for s in (*SPLITS, "total") if s in table.columns]]
    table = table.rename_axis(index="label", columns=None).reset_index()
    n_labels = int((sheet["label"] != "").any() and sheet["label"].nunique())
    head = f"{len(sheet)} images" + (f", {n_labels} labels" if n_labels else ", no labels")
    return f"{head}\n{table.to_string(index=False)}"
