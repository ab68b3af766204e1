"""Export of a mixed dataset (histosynth.export, `histosynth export`): a tiny finished run written
by hand, exported in each layout and loaded back with the loaders the layouts are meant for."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.draw import disk

from histosynth.cli import main
from histosynth.config import section_defaults
from histosynth.data.io import FILE_COLUMNS, write_relative
from histosynth.data.labels import resolve_labels
from histosynth.data.patches import fraction_column
from histosynth.evaluation.mixing import write_mix
from histosynth.export import ExportError, dataset_rows, export_dataset, finished_run, nuclei_reader, rle_encode
from histosynth.nuclei.conditioning import encode_conditioning
from histosynth.nuclei.instances import class_index

CLASSES = ["Tumor", "Stroma"]
SIZE = 24
SLIDES = {"s_train": "train", "s_val": "val", "s_test": "test"}


def nuclei_of(seed: int) -> np.ndarray:
    """An instance mask of three separate discs (ids 1..3), each at least 7 px across."""
    rng = np.random.default_rng(seed)
    instances = np.zeros((SIZE, SIZE), np.uint16)
    for k, (r, c) in enumerate([(6, 6), (6, 17), (17, 11)], start=1):
        instances[disk((r + rng.integers(-1, 2), c + rng.integers(-1, 2)), 3.5, shape=instances.shape)] = k
    return instances


def write_png(array, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def run(tmp_path):
    """results/ of a finished run: three slides' patches (2 each) with nuclei, one synthetic set of
    two images with conditioning maps and curation scores, and the manifest of ratio 'syn2'."""
    results = tmp_path / "results"
    rng = np.random.default_rng(0)
    real_rows = []
    for slide, split in SLIDES.items():
        index, table = [], []
        for k in range(2):
            patch_id = f"{slide}_x{k * SIZE}_y0"
            mask = np.full((SIZE, SIZE), k + 1, np.uint8)  # patch 0 all Tumor, patch 1 all Stroma
            instances = nuclei_of(len(real_rows) + k)
            index.append(
                {
                    "patch_id": patch_id,
                    "slide": slide,
                    "split": split,
                    "label": None,
                    "image": write_png(
                        rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8),
                        results / "patches" / slide / "images" / f"{patch_id}.png",
                    ),
                    "mask": write_png(mask, results / "patches" / slide / "masks" / f"{patch_id}.png"),
                    **{fraction_column(c): float(i == k) for i, c in enumerate(CLASSES)},
                }
            )
            write_png(instances, results / "nuclei" / slide / f"{patch_id}.png")
            table += [
                {"patch_id": patch_id, "instance_id": i, "class": ("tumor", "immune", "other")[i - 1]}
                for i in (1, 2, 3)
            ]
        write_relative(pd.DataFrame(index), results / "patches" / f"{slide}.parquet", ("image", "mask"))
        pd.DataFrame(table).to_parquet(results / "nuclei" / f"{slide}.parquet")
        real_rows += [r for r in index if split == "train"]
    curated = []
    for k in range(2):
        synthetic_id = f"synth-{k:06d}"
        instances = nuclei_of(10 + k)
        encoded = encode_conditioning(
            np.full((SIZE, SIZE), 2 - k, np.uint8),
            instances,
            {1: class_index("tumor"), 2: class_index("stromal"), 3: class_index("dead")},
        )
        folder = results / "synthetic" / "synth"
        curated.append(
            {
                "id": synthetic_id,
                "mode": "synth",
                "class": CLASSES[1 - k],
                "source_slide": "s_train",
                "keep": True,
                "image": write_png(
                    rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8), folder / "images" / f"{synthetic_id}.png"
                ),
                "mask": write_png(np.full((SIZE, SIZE), 2 - k, np.uint8), folder / "masks" / f"{synthetic_id}.png"),
                "conditioning": write_png(encoded, folder / "conditioning" / f"{synthetic_id}.png"),
                "model_hash": "abc123",
                "seed": 1000 + k,
                "consistency": 0.9 - k / 10,
                "similarity": 0.2,
                "copy": False,
            }
        )
    write_relative(pd.DataFrame(curated), results / "curated" / "synth.parquet", FILE_COLUMNS)
    manifest = pd.DataFrame(
        [
            {
                "source": "real",
                "mode": "real",
                "image": r["image"],
                "mask": r["mask"],
                "split": "train",
                "origin_id": r["patch_id"],
                "slide": r["slide"],
                "source_slide": r["slide"],
                "class": CLASSES[i],
            }
            for i, r in enumerate(real_rows)
        ]
        + [
            {
                "source": "synthetic",
                "mode": "synth",
                "image": c["image"],
                "mask": c["mask"],
                "split": "train",
                "origin_id": c["id"],
                "slide": None,
                "source_slide": "s_train",
                "class": c["class"],
            }
            for c in curated
        ]
    )
    write_mix(manifest, results / "mixing" / "syn2.parquet")
    config = {"labels": section_defaults("labels"), "classes": CLASSES}
    labels = resolve_labels(config, [""] * 3)
    return {"results": results, "labels": labels, "curated": curated, "tmp": tmp_path}


def rows_of(run):
    files = finished_run(run["results"], "syn2")
    return dataset_rows(files["manifest"], files["heldout"], files["curated"], run["labels"]), files


def test_dataset_rows_join_manifest_heldout_patches_and_curation(run):
    rows, _ = rows_of(run)
    assert rows.groupby(["split", "source"]).size().to_dict() == {
        ("test", "real"): 2,
        ("train", "real"): 2,
        ("train", "synthetic"): 2,
        ("val", "real"): 2,
    }
    synthetic = rows[rows["source"] == "synthetic"].set_index("name")
    assert synthetic.loc["synth-000001", "seed"] == 1001 and synthetic.loc["synth-000001", "model_hash"] == "abc123"
    assert synthetic.loc["synth-000001", "consistency"] == pytest.approx(0.8)
    heldout = rows[rows["split"] != "train"].set_index("name")["label"]
    assert heldout.loc["s_val_x0_y0"] == "Tumor" and heldout.loc["s_test_x24_y0"] == "Stroma"


def test_segmentation_export_links_images_and_masks_with_split_lists(run, tmp_path):
    rows, _ = rows_of(run)
    out = export_dataset(rows, "segmentation", tmp_path / "seg", classes=CLASSES, name="syn2")
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "Tumor": 1, "Stroma": 2} and dataset["numTraining"] == 4
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        names = (out / f"{split}.txt").read_text().split()
        assert len(names) == n == len(rows[rows["split"] == split])
    for row in rows.itertuples():
        image, mask = out / "images" / f"{row.name}.png", out / "masks" / f"{row.name}.png"
        assert os.path.samefile(image, row.image)  # a hard link (same file system), not a copy
        np.testing.assert_array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(row.mask)))
    metadata = pd.read_csv(out / "metadata.csv")
    assert len(metadata) == len(rows) and set(metadata["source"]) == {"real", "synthetic"}


def test_imagefolder_export_loads_with_torchvision_and_hugging_face(run, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from torchvision.datasets import ImageFolder

    rows, _ = rows_of(run)
    out = export_dataset(rows, "imagefolder", tmp_path / "folder", classes=CLASSES, name="syn2")
    train = ImageFolder(str(out / "train"))
    assert train.classes == ["Stroma", "Tumor"] and len(train) == 4
    expected = dict(zip(rows["name"], rows["label"], strict=True))
    assert {Path(p).stem: train.classes[c] for p, c in train.samples} == {
        n: label for n, label in expected.items() if n in set(rows.loc[rows["split"] == "train", "name"])
    }

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf"))
    assert {split: part.num_rows for split, part in loaded.items()} == {"train": 4, "validation": 2, "test": 2}
    records = {r["origin_id"]: r for part in loaded.values() for r in part.remove_columns("image")}
    assert {k: r["label"] for k, r in records.items()} == expected
    assert records["synth-000000"]["generator"] == "synth" and records["synth-000000"]["seed"] == 1000
    assert records["synth-000000"]["consistency"] == pytest.approx(0.9)
    assert records["s_val_x0_y0"]["source"] == "real" and records["s_val_x0_y0"]["model_hash"] == "none"
    assert loaded["train"][0]["image"].size == (SIZE, SIZE)


def test_coco_export_masks_equal_the_instance_masks(run, tmp_path):
    from pycocotools.coco import COCO

    rows, files = rows_of(run)
    out = export_dataset(
        rows, "coco", tmp_path / "coco", classes=CLASSES, name="syn2", nuclei=nuclei_reader(files["nuclei"])
    )
    total = 0
    for split in ("train", "val", "test"):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == len(rows[rows["split"] == split])
        for image in coco.loadImgs(coco.getImgIds()):
            name = Path(image["file_name"]).stem
            row = rows.set_index("name").loc[name]
            if row["source"] == "real":
                truth = np.asarray(Image.open(run["results"] / "nuclei" / row["slide"] / f"{name}.png"))
                classes = ["tumor", "immune", "other"]
            else:
                truth = nuclei_of(10 + int(name[-1]))
                classes = ["tumor", "stromal", "dead"]
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert len(annotations) == 3
            found = set()
            for annotation in annotations:
                mask = coco.annToMask(annotation).astype(bool)
                ids = np.unique(truth[mask])
                assert len(ids) == 1 and np.array_equal(mask, truth == ids[0])
                assert coco.loadCats(annotation["category_id"])[0]["name"] == classes[int(ids[0]) - 1]
                found.add(int(ids[0]))
                assert annotation["area"] == mask.sum()
            assert found == {1, 2, 3} and (out / "images" / split / image["file_name"]).is_file()
            total += 1
    assert total == len(rows)
    from torchvision.datasets import CocoDetection

    loaded = CocoDetection(str(out / "images" / "test"), str(out / "annotations" / "instances_test.json"))
    image, targets = loaded[0]
    assert len(loaded) == 2 and image.size == (SIZE, SIZE) and len(targets) == 3


def test_rle_round_trips_through_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(1)
    for shape in ((5, 7), (1, 1), (6, 3)):
        mask = rng.random(shape) > 0.5
        mask[0, 0] = True  # a run of ones first: the counts start with a zero-length run
        rle = mask_utils.frPyObjects(rle_encode(mask), *shape)
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_export_is_atomic_and_the_cli_exports_a_finished_run(run, tmp_path, capsys):
    rows, _ = rows_of(run)
    with pytest.raises(ExportError, match="coco export needs the nuclei"):
        export_dataset(rows, "coco", tmp_path / "coco", classes=CLASSES, name="syn2")
    assert not (tmp_path / "coco").exists()
    out = tmp_path / "seg"
    (out / "images").mkdir(parents=True)
    (out / "images" / "stale.png").write_bytes(b"old")
    config = tmp_path / "config.yaml"
    config.write_text("classes: [Tumor, Stroma]\n")
    assert (
        main(
            [
                "export",
                "syn2",
                "--format",
                "segmentation",
                "--out",
                str(out),
                "--results",
                str(run["results"]),
                "--config",
                str(config),
            ]
        )
        == 0
    )
    assert "train real 2, train synthetic 2" in capsys.readouterr().out
    assert not (out / "images" / "stale.png").exists() and len(list((out / "images").iterdir())) == 8
    assert (
        main(
            [
                "export",
                "nope",
                "--format",
                "coco",
                "--out",
                str(tmp_path / "x"),
                "--results",
                str(run["results"]),
                "--config",
                str(config),
            ]
        )
        == 2
    )
    assert "mixing/nope.parquet: no such manifest; the run's ratios are ['syn2']" in capsys.readouterr().err
    # without --config the run's own effective config (rule registry's) names the classes
    (run["results"] / "registry").mkdir(exist_ok=True)
    (run["results"] / "registry" / "config.yaml").write_text("classes: [Tumor, Stroma]\n")
    again = tmp_path / "again"
    assert (
        main(["export", "syn2", "--format", "segmentation", "--out", str(again), "--results", str(run["results"])]) == 0
    )
    assert "Tumor" in (again / "dataset.json").read_text()


def test_conditioning_map_gives_back_touching_and_tiny_nuclei():
    from histosynth.export import conditioning_instances

    truth = np.zeros((20, 30), np.int64)
    truth[2:9, 2:9] = 1
    truth[2:9, 9:16] = 2  # touches 1, same class
    truth[10:17, 5:12] = 3  # touches 1 and 2, another class
    truth[14:16, 20:22] = 4  # 2 x 2: all boundary, no core
    truth[3:8, 20:26] = 5
    classes = {
        1: class_index("tumor"),
        2: class_index("tumor"),
        3: class_index("immune"),
        4: class_index("other"),
        5: class_index("tumor"),
    }
    instances, names = conditioning_instances(encode_conditioning(None, truth, classes))
    pairs = {(int(t), int(i)) for t, i in zip(truth.ravel(), instances.ravel(), strict=True)}
    assert len(pairs) == 6 and len({t for t, _ in pairs}) == 6 and len({i for _, i in pairs}) == 6  # a bijection
    name_of = {t: names[i - 1] for t, i in pairs if t}
    assert name_of == {1: "tumor", 2: "tumor", 3: "immune", 4: "other", 5: "tumor"}
