"""Export of a mixed dataset as files that training code outside the workflow reads.

A ratio's training set is a manifest of rows pointing into results/ (histosynth.evaluation.mixing);
with the held-out real patches (the val and test slides' patch indexes) it becomes one dataset,
written in one of three layouts:

- `segmentation`: images/<name>.png, masks/<name>.png (uint8, value n = the n-th entry of
  `classes`, 0 background), train.txt / val.txt / test.txt (one name per line) and dataset.json
  naming the classes (nnU-Net's keys: labels, channel_names, file_ending, numTraining);
- `imagefolder`: <split>/<label>/<name>.png, one folder per image-level label
  (torchvision.datasets.ImageFolder on a split folder; Hugging Face datasets' "imagefolder" on
  the export, metadata.csv included);
- `coco`: images/<split>/<name>.png and annotations/instances_<split>.json, the nuclei of every
  image as COCO instance segmentation (uncompressed RLE, category ids = nucleus class index).

Every layout carries metadata.csv (per split for imagefolder): file_name, split, label, source
(real/synthetic), generator (the synthetic set's mode, `real` for real patches), model_hash
(`none` for real patches), seed (-1 for real patches), slide, source_slide, origin_id and the
curation scores of synthetic images (empty for real patches). Files are hard links where the file system
allows, copies otherwise; the export is written to a temporary folder renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from skimage.segmentation import watershed

from histosynth.data.io import read_file_table, read_patch_index, write_csv
from histosynth.data.labels import patch_labels, run_labels
from histosynth.evaluation.mixing import read_mix
from histosynth.files import atomic_dir
from histosynth.nuclei.instances import NUCLEUS_CLASSES, read_instances

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("segmentation", "imagefolder", "coco")
SPLITS = ("train", "val", "test")
# Curation's per-image scores (histosynth.evaluation.curation) carried into metadata.csv when present.
SCORE_COLUMNS = (
    "consistency",
    "nuclei_consistency",
    "similarity",
    "relative_distance",
    "source_similarity",
    "feature_distance",
    "copy",
)
METADATA_COLUMNS = (
    "file_name",
    "split",
    "label",
    "source",
    "generator",
    "model_hash",
    "seed",
    "slide",
    "source_slide",
    "origin_id",
)

# (instances, class name per instance id 1..N) of one dataset row, or None when it has no nuclei
NucleiReader = Callable[[pd.Series], "tuple[np.ndarray, list[str]] | None"]


class ExportError(ValueError):
    """A dataset that cannot be exported as asked; the message says why and what to do."""


def dataset_rows(
    manifest: str | Path, heldout_indexes: list[str | Path], curated: Mapping[str, str | Path], labels: Mapping
) -> pd.DataFrame:
    """One row per image of the exported dataset: the ratio's manifest (split train) and the
    val/test rows of the held-out patch indexes, with columns name, split, label, source,
    generator, image, mask, slide, source_slide, origin_id, model_hash, seed, conditioning and the
    curation scores (from the curated sets, {mode: path}, joined on the synthetic image's id)."""
    train = read_mix(manifest).rename(columns={"class": "label", "mode": "generator"})
    frames = [train]
    for path in heldout_indexes:
        index = read_patch_index(path)
        index = index[index["split"].isin(("val", "test"))]
        if len(index):
            frames.append(
                pd.DataFrame(
                    {
                        "source": "real",
                        "generator": "real",
                        "image": index["image"],
                        "mask": index["mask"],
                        "split": index["split"],
                        "origin_id": index["patch_id"],
                        "slide": index["slide"],
                        "source_slide": index["slide"],
                        "label": patch_labels(index, labels),
                    }
                )
            )
    rows = pd.concat(frames, ignore_index=True)
    synthetic = [read_file_table(path).assign(generator=mode) for mode, path in curated.items()]
    if synthetic:
        keep = ["generator", "id", "model_hash", "seed", "conditioning", *SCORE_COLUMNS]
        table = pd.concat(synthetic, ignore_index=True)
        table = table[[c for c in keep if c in table]].rename(columns={"id": "origin_id"})
        rows = rows.merge(table, on=["generator", "origin_id"], how="left", validate="many_to_one")
    rows = rows.reindex(columns=[*rows.columns, *(c for c in ("model_hash", "seed", "conditioning") if c not in rows)])
    rows["seed"] = pd.to_numeric(rows["seed"]).astype("Int64")
    rows["name"] = [re.sub(r"[^A-Za-z0-9_.-]+", "_", str(o)) for o in rows["origin_id"]]
    repeated = rows["name"][rows["name"].duplicated()].tolist()
    if repeated:
        raise ExportError(
            f"image names repeat across the dataset ({repeated[:5]}); slide and synthetic ids must be unique"
        )
    return rows


def link_or_copy(source: str | Path, target: Path) -> None:
    """A hard link of `source` at `target`, or a copy where the file system refuses links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def export_dataset(
    rows: pd.DataFrame, fmt: str, out: str | Path, *, classes: list[str], name: str, nuclei: NucleiReader | None = None
) -> Path:
    """Write `rows` (dataset_rows) in format `fmt` to the folder `out`, atomically; returns `out`."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "coco" and nuclei is None:
        raise ExportError("the coco export needs the nuclei of the images (rule nuclei_masks' outputs)")
    with atomic_dir(out) as tmp:
        if fmt == "segmentation":
            written = _segmentation(rows, tmp, classes, name)
        elif fmt == "imagefolder":
            written = _imagefolder(rows, tmp)
        else:
            written = _coco(rows, tmp, nuclei)
        if fmt != "imagefolder":
            write_csv(_metadata(written), tmp / "metadata.csv")
    counts = written.groupby(["split", "source"]).size().to_dict()
    log.info("exported %d images of %s as %s to %s: %s", len(written), name, fmt, out, counts)
    return Path(out)


def _metadata(rows: pd.DataFrame) -> pd.DataFrame:
    """The metadata.csv columns, typed alike in every split (a CSV reader infers a column's type per
    file): real images have model_hash `none` and seed -1, and the boolean `copy` is written 0/1."""
    table = rows.reindex(columns=[*METADATA_COLUMNS, *SCORE_COLUMNS])
    table["model_hash"] = table["model_hash"].fillna("none")
    table["seed"] = table["seed"].fillna(-1).astype(np.int64)
    table["copy"] = table["copy"].astype(float)
    return table


def _segmentation(rows: pd.DataFrame, out: Path, classes: list[str], name: str) -> pd.DataFrame:
    """images/, masks/, <split>.txt and dataset.json; rows without a mask (GAN images) are left out."""
    masked = rows[rows["mask"].notna()].copy()
    if len(masked) < len(rows):
        log.warning(
            "%d image(s) without a label mask (GAN images) left out of the segmentation export", len(rows) - len(masked)
        )
    masked["file_name"] = "images/" + masked["name"] + ".png"
    for row in masked.itertuples(index=False):
        link_or_copy(row.image, out / row.file_name)
        link_or_copy(row.mask, out / "masks" / f"{row.name}.png")
    for split in SPLITS:
        names = masked.loc[masked["split"] == split, "name"]
        (out / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    dataset = {
        "name": name,
        "labels": {"background": 0, **{c: i for i, c in enumerate(classes, start=1)}},
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "file_ending": ".png",
        "numTraining": int((masked["split"] == "train").sum()),
        "splits": {s: int((masked["split"] == s).sum()) for s in SPLITS},
        "sources": {s: int((masked["source"] == s).sum()) for s in ("real", "synthetic")},
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return masked


def _imagefolder(rows: pd.DataFrame, out: Path) -> pd.DataFrame:
    """<split>/<label>/<name>.png and <split>/metadata.csv (file_name relative to the split folder:
    the Hugging Face builder reads a split's metadata from its own folder)."""
    rows = rows.copy()
    folder = rows["label"].astype(str).str.replace(r"[/\\]", "_", regex=True)
    rows["file_name"] = rows["split"] + "/" + folder + "/" + rows["name"] + ".png"
    for row in rows.itertuples(index=False):
        link_or_copy(row.image, out / row.file_name)
    for split, part in rows.groupby("split"):
        part = _metadata(part).assign(file_name=part["file_name"].str.removeprefix(f"{split}/"))
        write_csv(part, out / split / "metadata.csv")
    return rows


def _coco(rows: pd.DataFrame, out: Path, nuclei: NucleiReader) -> pd.DataFrame:
    """images/<split>/ and annotations/instances_<split>.json; rows without nuclei are left out."""
    categories = [{"id": i, "name": n, "supercategory": "nucleus"} for i, n in enumerate(NUCLEUS_CLASSES, start=1)]
    category = {c["name"]: c["id"] for c in categories}
    written, skipped = [], 0
    for split in SPLITS:
        images, annotations = [], []
        for row in rows[rows["split"] == split].itertuples(index=False):
            found = nuclei(pd.Series(row._asdict()))
            if found is None:
                skipped += 1
                continue
            instances, names = found
            file_name = f"{split}/{row.name}.png"
            link_or_copy(row.image, out / "images" / file_name)
            image_id = len(images) + 1
            height, width = instances.shape
            images.append(
                {
                    "id": image_id,
                    "file_name": f"{row.name}.png",
                    "height": height,
                    "width": width,
                    "source": row.source,
                    "generator": row.generator,
                }
            )
            for instance_id, name in enumerate(names, start=1):
                mask = instances == instance_id
                if not mask.any():
                    continue
                annotations.append(_coco_annotation(mask, len(annotations) + 1, image_id, category[name]))
            written.append({**row._asdict(), "file_name": f"images/{file_name}"})
        document = {
            "info": {"description": "histosynth export: nuclei instances"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        path = out / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document))
    if skipped:
        log.warning(
            "%d image(s) without nuclei (no nuclei masks or conditioning map) left out of the coco export", skipped
        )
    return pd.DataFrame(written, columns=[*rows.columns, "file_name"])


def _coco_annotation(mask: np.ndarray, annotation_id: int, image_id: int, category_id: int) -> dict:
    rows, cols = np.nonzero(mask)
    x0, y0 = int(cols.min()), int(rows.min())
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": 0,
        "segmentation": rle_encode(mask),
        "area": int(mask.sum()),
        "bbox": [x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1],
    }


def rle_encode(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a boolean mask: run lengths in column-major order, starting with
    a run of zeros (pycocotools.mask.frPyObjects reads it)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    bounds = np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1, flat.size]
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def nuclei_reader(nuclei: Mapping[str, tuple[str | Path, str | Path]]) -> NucleiReader:
    """The nuclei of a dataset row: a real patch's from rule nuclei_masks' outputs ({slide: (masks
    folder, nucleus table)}), a synthetic image's from its conditioning map (conditioning_instances)."""
    tables: dict[str, dict[tuple[str, int], str]] = {}

    def classes_of(slide: str) -> dict[tuple[str, int], str]:
        if slide not in tables:
            table = pd.read_parquet(nuclei[slide][1], columns=["patch_id", "instance_id", "class"])
            tables[slide] = {(p, int(i)): c for p, i, c in table.itertuples(index=False)}
        return tables[slide]

    def read(row: pd.Series):
        if row["source"] == "real":
            if row["slide"] not in nuclei:
                return None
            instances = read_instances(Path(nuclei[row["slide"]][0]) / f"{row['origin_id']}.png").astype(np.int64)
            found = classes_of(row["slide"])
            ids = np.unique(instances[instances > 0])
            lut = np.zeros(int(instances.max(initial=0)) + 1, np.int64)
            lut[ids] = np.arange(1, len(ids) + 1)
            return lut[instances], [found.get((row["origin_id"], int(i)), "other") for i in ids]
        if not isinstance(row.get("conditioning"), str):
            return None
        with Image.open(row["conditioning"]) as image:
            return conditioning_instances(np.asarray(image))

    return read


def conditioning_instances(encoded: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The nuclei a synthetic image was drawn to have, from its encoded conditioning map
    (histosynth.nuclei.conditioning: channel 1 nucleus class index, channel 2 the instances'
    inner boundary). Each core (a nucleus's pixels off its boundary, 8-connected: two nuclei's
    cores never touch even diagonally) floods its class's pixels (watershed); pixels no core
    reaches (a nucleus one or two pixels wide, all boundary) are nuclei of their own. Touching
    nuclei of one class whose cores a narrow neck splits cannot be told from two nuclei."""
    nucleus, boundary = encoded[..., 1].astype(np.int64), encoded[..., 2] > 0
    eight = np.ones((3, 3), bool)
    cores, n = ndimage.label((nucleus > 0) & ~boundary, structure=eight)
    instances = np.zeros(nucleus.shape, np.int64)
    for value in np.unique(nucleus[nucleus > 0]):
        region = nucleus == value
        instances += watershed(np.zeros(nucleus.shape), markers=cores * region, mask=region, connectivity=2)
    rest = (nucleus > 0) & (instances == 0)
    small, _ = ndimage.label(rest, structure=eight)
    instances[rest] = small[rest] + n
    ids = np.unique(instances[instances > 0])
    lut = np.zeros(int(instances.max(initial=0)) + 1, np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    classes = np.zeros(len(ids) + 1, np.int64)
    classes[lut[instances].ravel()] = nucleus.ravel()  # one class per instance: any of its pixels gives it
    return lut[instances], [NUCLEUS_CLASSES[int(c) - 1] for c in classes[1:]]


def finished_run(results: str | Path, ratio: str) -> dict:
    """What the export of `ratio` reads from a finished run's results folder (the workflow's file
    names): manifest, heldout (every patch index), curated ({mode: set} of the modes in the
    manifest) and nuclei ({slide: (masks folder, table)} where rule nuclei_masks ran)."""
    results = Path(results)
    manifest = results / "mixing" / f"{ratio}.parquet"
    if not manifest.is_file():
        made = sorted(p.stem for p in (results / "mixing").glob("*.parquet") if not p.stem.endswith(".share"))
        raise ExportError(
            f"{manifest}: no such manifest; the run's ratios are {made or 'none (run the workflow first)'}"
        )
    modes = pd.read_parquet(manifest, columns=["source", "mode"]).query("source == 'synthetic'")["mode"].unique()
    indexes = sorted(p for p in (results / "patches").glob("*.parquet"))
    nuclei = {
        p.stem: (p.with_suffix(""), p)
        for p in sorted((results / "nuclei").glob("*.parquet"))
        if p.with_suffix("").is_dir()
    }
    return {
        "manifest": manifest,
        "heldout": indexes,
        "nuclei": nuclei,
        "curated": {mode: results / "curated" / f"{mode}.parquet" for mode in modes},
    }


def sheet_labels(indexes: list[str | Path]) -> list[str]:
    """Each slide's sheet label ('' = none) as its patch index recorded it (for run_labels)."""
    labels = []
    for path in indexes:
        column = pd.read_parquet(path, columns=["label"])["label"]
        labels.append("" if column.empty or pd.isna(column.iloc[0]) else str(column.iloc[0]))
    return labels


def export_run(results: str | Path, ratio: str, fmt: str, out: str | Path, config: Mapping) -> pd.DataFrame:
    """`histosynth export`: the ratio of a finished run (results folder, its validated config)
    exported in format `fmt` to `out`; returns the dataset's rows."""
    run = finished_run(results, ratio)
    labels = run_labels(config, sheet_labels(run["heldout"]))
    rows = dataset_rows(run["manifest"], run["heldout"], run["curated"], labels)
    nuclei = nuclei_reader(run["nuclei"]) if fmt == "coco" else None
    export_dataset(rows, fmt, out, classes=config["classes"], name=ratio, nuclei=nuclei)
    return rows
