"""The registry (histosynth.registry): what the workflow made, upserted idempotently, with history
when content changes, lineage from a task run back to slide patches, readers beside the writer,
and refusal of files that are not a histosynth registry. A small results/ tree written here."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histosynth.data.io import write_relative, write_table
from histosynth.files import content_hash
from histosynth.registry import RegistryError, Run, connect, export, lineage, models, now, register_results, table_rows


def write_model(folder: Path, payload: bytes, meta: dict | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(payload)
    if meta is not None:
        (folder / "histosynth.json").write_text(json.dumps(meta))
    return content_hash(folder)


def write_set(results: Path, digest: str, seed: int) -> pd.DataFrame:
    """A 3-image synthetic set of the model with content hash `digest` and its curation."""
    synth = results / "synthetic/synth"
    (synth / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i + seed, np.uint8)).save(synth / "images" / f"synth-{i:06d}.png")
        rows.append(
            {
                "id": f"synth-{i:06d}",
                "image": f"images/synth-{i:06d}.png",
                "mode": "synth",
                "class": "Fat",
                "model_hash": digest,
                "sampler": "ddim",
                "steps": 5,
                "guidance": 1.0,
                "seed": seed + i,
                "source_patch_id": f"s1_x{i}_y0",
                "donor_patch_id": None,
                "source_slide": "s1",
            }
        )
    manifest = pd.DataFrame(rows)
    write_table(manifest, synth / "manifest.parquet")
    curated = manifest.assign(
        image="../synthetic/synth/" + manifest["image"], keep=[True, True, False], reason=["", "", "copy of s1_x0_y0"]
    )
    write_relative(curated, results / "curated/synth.parquet", ("image",))
    return manifest


def write_results(root: Path) -> Path:
    """results/ as the workflow leaves it: a diffusion model, a 3-image synthetic set and its
    curation, two ratios' manifests, a segmentation run per ratio, the report's tables."""
    results = root / "results"
    digest = write_model(
        results / "diffusion/model", b"weights", {"space": "pixel", "steps": 10, "training": {"data": {"items": 4}}}
    )
    write_set(results, digest, seed=7)
    for ratio, n in (("real", 0), ("syn2", 2)):
        real = [{"source": "real", "mode": "real", "image": "../patches/s1/images/p.png", "origin_id": "s1_x0_y0"}]
        syn = [
            {
                "source": "synthetic",
                "mode": "synth",
                "image": f"../synthetic/synth/images/synth-{i:06d}.png",
                "origin_id": f"synth-{i:06d}",
            }
            for i in range(n)
        ]
        write_table(pd.DataFrame(real + syn), results / f"mixing/{ratio}.parquet")
        run = results / f"segmentation/{ratio}/seed0"
        write_model(run / "model", f"unet {ratio}".encode())
        (run / "summary.json").write_text(json.dumps({"epochs_run": 3}))
    report = results / "report"
    report.mkdir()
    write_table(
        pd.DataFrame(
            {
                "kind": ["segmentation", "segmentation", "quality"],
                "ratio": ["real", "syn2", None],
                "seed": [0, 0, None],
                "set": [None, None, "synth"],
                "class": ["Fat", "Fat", "all"],
                "metric": ["dice", "dice", "fd"],
                "value": [0.5, 0.6, 12.0],
                "status": "ok",
                "note": "",
            }
        ),
        report / "metrics.parquet",
    )
    pd.DataFrame(
        [
            {
                "task": "segmentation",
                "ratio": "syn2",
                "baseline": "real",
                "class": "Fat",
                "metric": "dice",
                "paired_by": "seed",
                "n": 1,
                "mean_diff": 0.1,
                "ci_low": -0.2,
                "ci_high": 0.4,
                "verdict": "no evidence",
            }
        ]
    ).to_csv(report / "verdict.csv", index=False)
    return results


def rule_inputs(root: Path) -> dict:
    """What rule registry names as its inputs for the tree write_results leaves (paths under `root`)."""
    results = root / "results"
    return {
        "models": {"diffusion": results / "diffusion/model"},
        "sets": {"synth": results / "synthetic/synth"},
        "curated": {"synth": results / "curated/synth.parquet"},
        "datasets": {ratio: results / f"mixing/{ratio}.parquet" for ratio in ("real", "syn2")},
        "runs_made": [
            Run("segmentation", ratio, None, 0, str(results / f"segmentation/{ratio}/seed0"))
            for ratio in ("real", "syn2")
        ],
        "metrics": results / "report/metrics.parquet",
        "verdict": results / "report/verdict.csv",
    }


def test_registering_twice_changes_nothing_and_new_content_keeps_history(tmp_path):
    write_results(tmp_path)
    engine = connect(f"sqlite:///{tmp_path}/registry.sqlite")
    first = register_results(engine, tmp_path, **rule_inputs(tmp_path))
    assert first == {"models": 3, "sets": 1, "images": 3, "datasets": 2, "runs": 2, "metrics": 4}
    sizes = {
        name: len(table_rows(engine, name, history=True)) for name in ("models", "sets", "images", "datasets", "runs")
    }
    assert register_results(engine, tmp_path, **rule_inputs(tmp_path)) == first
    assert {name: len(table_rows(engine, name, history=True)) for name in sizes} == sizes
    # a resampled set (new images, a new manifest) is a new set row; the old one stays as history
    write_set(tmp_path / "results", content_hash(tmp_path / "results/diffusion/model"), seed=9)
    register_results(engine, tmp_path, **rule_inputs(tmp_path))
    history = table_rows(engine, "sets", kind="synthetic", history=True)
    assert history["current"].tolist() == [False, True]
    assert len(table_rows(engine, "sets", kind="synthetic")) == 1
    assert table_rows(engine, "images")["seed"].tolist() == [7, 8, 9, 9, 10, 11]


def test_lineage_of_a_run_back_to_slide_patches(tmp_path, monkeypatch):
    write_results(tmp_path)
    monkeypatch.chdir(tmp_path)  # as rule registry runs: root "." and paths relative to it, '..' and all
    engine = connect("sqlite:///registry.sqlite")
    register_results(engine, ".", **rule_inputs(Path(".")))
    [diffusion] = table_rows(engine, "models", kind="diffusion").to_dict("records")
    assert (
        diffusion["path"] == "results/diffusion/model"
        and diffusion["data"] == {"items": 4}
        and diffusion["steps"] == 10
    )
    found = lineage(engine, diffusion["id"])
    assert [s["name"] for s in found["sets"]] == ["synth"] and found["curated"][0]["n_kept"] == 2
    assert [q["metric"] for q in found["quality"]] == ["fd"]
    [dataset] = found["datasets"]
    assert dataset["ratio"] == "syn2" and (dataset["n_real"], dataset["n_synthetic"]) == (1, 2)
    assert [(r["task"], r["ratio"], r["seed"]) for r in found["runs"]] == [("segmentation", "syn2", 0)]
    assert found["verdicts"][0]["note"].startswith("no evidence: +0.1000 [-0.2000, +0.4000] vs real")
    images = table_rows(engine, "images").set_index("image_id")
    assert (
        images.loc["synth-000000", "source_patch_id"] == "s1_x0_y0"
        and images.loc["synth-000000", "source_slide"] == "s1"
    )
    assert images["kept"].tolist() == [True, True, False] and images.loc["synth-000002", "reason"] == "copy of s1_x0_y0"
    assert (images["model_id"] == diffusion["id"]).all()
    runs = table_rows(engine, "runs")
    metrics = table_rows(engine, "metrics")
    dice = metrics[(metrics["metric"] == "dice")].set_index("ratio")
    assert dice.loc["syn2", "run_id"] == runs.set_index("ratio").loc["syn2", "id"]
    assert images.loc["synth-000000", "path"] == "results/synthetic/synth/images/synth-000000.png"
    written = export(engine, tmp_path / "export", "parquet")
    assert len(pd.read_parquet(tmp_path / "export/images.parquet")) == 3 and len(written) == 7


def test_readers_see_the_last_commit_while_the_writer_runs(tmp_path):
    url = f"sqlite:///{tmp_path}/registry.sqlite"
    writer, reader = connect(url), connect(url, create=False)
    with writer.begin() as db:
        db.execute(
            models.insert().values(
                kind="gan", name="old", path="a", content_hash="1", current=True, registered_at=now()
            )
        )
    with writer.connect() as db:
        transaction = db.begin()
        db.execute(
            models.insert().values(
                kind="gan", name="new", path="b", content_hash="2", current=True, registered_at=now()
            )
        )
        assert table_rows(reader, "models")["name"].tolist() == ["old"]  # no lock error, the committed state
        transaction.commit()
    assert table_rows(reader, "models")["name"].tolist() == ["old", "new"]


def test_a_corrupt_or_foreign_file_is_refused_and_left_alone(tmp_path):
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="cannot be opened as a registry database.*left unchanged"):
        connect(f"sqlite:///{corrupt}")
    assert corrupt.read_bytes() == b"this is not a database" * 100
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE patients (id INTEGER)")
    before = foreign.read_bytes()
    with pytest.raises(RegistryError, match=r"not a histosynth registry \(tables \['patients'\]\)"):
        connect(f"sqlite:///{foreign}")
    assert foreign.read_bytes() == before
    with pytest.raises(RegistryError, match="no registry at"):
        connect(f"sqlite:///{tmp_path}/absent.sqlite", create=False)


def test_only_what_the_rule_names_is_registered(tmp_path):
    """The registry takes the rule's inputs, not whatever lies under results/: a set left from an
    earlier configuration, or a run of a ratio no longer configured, is not registered."""
    results = write_results(tmp_path)
    stale = results / "synthetic/old"
    stale.mkdir(parents=True)
    (stale / "manifest.parquet").write_bytes((results / "synthetic/synth/manifest.parquet").read_bytes())
    write_model(results / "segmentation/gone/seed0/model", b"unet gone")
    engine = connect(f"sqlite:///{tmp_path}/registry.sqlite")
    counts = register_results(engine, tmp_path, **rule_inputs(tmp_path))
    assert counts["sets"] == 1 and counts["runs"] == 2
    assert table_rows(engine, "sets", kind="synthetic")["name"].tolist() == ["synth"]
    assert sorted(table_rows(engine, "runs")["ratio"]) == ["real", "syn2"]
