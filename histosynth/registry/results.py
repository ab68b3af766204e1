"""Registering one workflow run (rule registry): the files the rule names as its inputs, not a
search of results/ (the rule owns the layout), upserted in one transaction."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine

from histosynth.files import MODEL_INFO, content_hash, file_hash
from histosynth.generators.table import MANIFEST
from histosynth.registry.schema import images, runs
from histosynth.registry.writes import (
    register_curation,
    register_dataset,
    register_metrics,
    register_model,
    register_set,
    upsert,
)


@dataclass(frozen=True)
class Run:
    """One task model of the workflow: its task, ratio, fold (classification) and seed, and its run folder."""

    task: str  # segmentation | classification
    ratio: str
    fold: int | None
    seed: int
    folder: str

    @property
    def kind(self) -> str:
        """Its registry model kind."""
        return "classifier" if self.task == "classification" else self.task

    @property
    def key(self) -> tuple:
        return self.task, self.ratio, self.fold, self.seed

    @property
    def name(self) -> str:
        return "/".join(
            [self.task, self.ratio, *([f"fold{self.fold}"] if self.fold is not None else []), f"seed{self.seed}"]
        )


def _model_info(folder: Path) -> dict:
    path = folder / MODEL_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _verdict_rows(path: Path) -> pd.DataFrame:
    decided = pd.read_csv(path)
    return pd.DataFrame(
        {
            "kind": "verdict",
            "ratio": decided["ratio"],
            "class": decided["class"],
            "metric": decided["task"] + "/" + decided["metric"],
            "value": decided["mean_diff"],
            "status": decided["verdict"],
            "note": [
                f"{r.verdict}: {r.mean_diff:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}] vs {r.baseline}, "
                f"paired by {r.paired_by}, n={r.n}"
                for r in decided.itertuples()
            ],
        }
    )


def register_results(
    engine: Engine,
    root: str | Path = ".",
    *,
    models: Mapping[str, str | Path],
    sets: Mapping[str, str | Path],
    curated: Mapping[str, str | Path] | None = None,
    datasets: Mapping[str, str | Path] | None = None,
    runs_made: Sequence[Run] = (),
    nuclei_model: str | Path | None = None,
    metrics: str | Path | None = None,
    verdict: str | Path | None = None,
) -> dict:
    """Upsert one run's outputs: generator models ({kind: model folder}; a latent diffusion model's
    parent is the autoencoder), the learned nuclei model file, synthetic sets ({name: folder}) with
    their images and curated tables ({name: parquet}), mixed datasets ({ratio: manifest}), task
    runs, the report's metrics and verdict rows. Paths relative to `root` (the working directory).
    Returns the counts registered."""
    from histosynth.data.io import read_file_table

    root = Path(root)
    counts: dict[str, int] = {}
    with engine.begin() as db:
        ids: dict[str, int] = {}  # content hash -> model id
        for kind, folder in models.items():
            path = Path(folder)
            info, digest = _model_info(path), content_hash(path)
            parent = (
                ids.get(content_hash(models["autoencoder"]))
                if kind == "diffusion" and info.get("space") == "latent" and "autoencoder" in models
                else None
            )
            ids[digest] = register_model(
                db,
                kind,
                kind,
                path,
                root=root,
                content_hash=digest,
                config=info.get("training", info),
                data=(info.get("training") or {}).get("data"),
                parent_id=parent,
                steps=info.get("steps"),
            )
        if nuclei_model:
            ids[file_hash(nuclei_model)] = register_model(
                db, "nuclei", "nuclei", nuclei_model, root=root, content_hash=file_hash(nuclei_model)
            )
        task_models = {}
        for run in runs_made:
            folder = Path(run.folder)
            summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
            task_models[run.key] = register_model(
                db,
                run.kind,
                run.name,
                folder / "model",
                root=root,
                content_hash=content_hash(folder / "model"),
                config=summary,
                steps=summary.get("epochs_run"),
            )
        counts["models"] = len(ids) + len(task_models)

        set_ids, image_ids = {}, {}
        for name, folder in sets.items():
            manifest_path = Path(folder) / MANIFEST
            set_ids[name] = register_set(
                db, name, "synthetic", read_file_table(manifest_path), manifest_path, root=root, model_ids=ids
            )
        for name, set_id in set_ids.items():
            for row in db.execute(select(images.c.id, images.c.path).where(images.c.set_id == set_id)):
                image_ids[(name, row.path)] = row.id
            if name in (curated or {}):
                register_curation(db, name, read_file_table(curated[name]), curated[name], root=root, set_id=set_id)
        counts["sets"], counts["images"] = len(set_ids), len(image_ids)

        dataset_ids = {
            ratio: register_dataset(db, ratio, read_file_table(path), path, root=root, image_ids=image_ids)
            for ratio, path in (datasets or {}).items()
        }
        counts["datasets"] = len(dataset_ids)

        run_ids = {}
        for (task, ratio, fold, seed), model_id in task_models.items():
            run_id = upsert(
                db,
                runs,
                {"model_id": model_id},
                {
                    "task": task,
                    "ratio": ratio,
                    "fold": fold,
                    "seed": seed,
                    "dataset_id": dataset_ids.get(ratio),
                    "current": True,
                },
            )
            db.execute(
                runs.update()
                .where(
                    runs.c.task == task,
                    runs.c.ratio == ratio,
                    runs.c.seed == seed,
                    (runs.c.fold == fold) if fold is not None else runs.c.fold.is_(None),
                    runs.c.id != run_id,
                )
                .values(current=False)
            )
            run_ids[(task, ratio, fold, seed)] = run_id
        counts["runs"] = len(run_ids)

        tidy = pd.read_parquet(metrics) if metrics else pd.DataFrame(columns=["kind", "metric"])
        if verdict:
            tidy = pd.concat([tidy, _verdict_rows(Path(verdict))], ignore_index=True)
        counts["metrics"] = register_metrics(db, tidy, run_ids=run_ids, set_ids=set_ids)
    return counts
