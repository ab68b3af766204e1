"""`histosynth sheet`: a slide sheet (TSV) from a folder of images, split by image.

Layouts (read by histosynth.data.image_folder): an ImageFolder (one sub-folder per class; the
sub-folder's name becomes each image's `label`) or a flat folder (no label). Images are plain
PNG/JPEG/TIFF files or slide files; a DICOM WSI is one series of .dcm files (a folder of them, as
wsidicomizer writes it, counts as one image, named after the folder). Splits are drawn per label
(stratified), deterministic given the seed, and optionally keep images of one group (a regex
capture of the name, e.g. the patient) together.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.data.annotations import FORMATS, AnnotationError, detect_format
from histosynth.data.image_folder import PLAIN_SUFFIXES, Entry, SheetError, scan_folder, unique_names
from histosynth.files import atomic_file
from histosynth.seeds import derive_seed

log = logging.getLogger(__name__)

SHEET_COLUMNS = ("slide", "image", "annotations", "split", "mpp", "label")
SPLITS = ("train", "val", "test")
POLYGON_SUFFIXES = (".geojson", ".json", ".xml")  # --annotations: QuPath GeoJSON, ASAP or Aperio XML
MASK_SUFFIXES = (".png", ".tif", ".tiff")  # --masks: label-mask images
POLYGON_KINDS = ("geojson", "asap", "aperio")  # histosynth.data.annotations.FORMATS of polygon files


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
