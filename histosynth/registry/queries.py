"""Reading the registry: table rows, a model's lineage (its sets, their datasets, the task runs
trained on those and their verdicts), the newest model of a kind, and an export of every table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine

from histosynth.registry.schema import (
    RegistryError,
    dataset_images,
    datasets,
    images,
    metadata,
    metrics,
    models,
    runs,
    sets,
)


def table_rows(
    engine: Engine, name: str, *, kind: str | None = None, label: str | None = None, history: bool = False
) -> pd.DataFrame:
    """The rows of table `name` (models | sets | images | runs | datasets | metrics), current ones
    unless `history`, filtered by kind and (images) class."""
    table = metadata.tables[name]
    query = select(table)
    if "current" in table.c and not history:
        query = query.where(table.c.current.is_(True))
    if kind is not None and "kind" in table.c:
        query = query.where(table.c.kind == kind)
    if label is not None and "class" in table.c:
        query = query.where(table.c["class"] == label)
    with engine.connect() as db:
        return pd.DataFrame(
            db.execute(query.order_by(table.c[next(iter(table.primary_key)).name])).mappings().all(),
            columns=[c.name for c in table.c],
        )


def lineage(engine: Engine, model_id: int) -> dict:
    """A model's record with its parent, the sets it made (with their quality rows), the datasets
    holding their images, the task runs trained on those and the verdict rows of their ratios."""
    with engine.connect() as db:
        model = db.execute(select(models).where(models.c.id == model_id)).mappings().first()
        if model is None:
            raise RegistryError(f"no model with id {model_id}; `histosynth registry models` lists them")
        parent = (
            db.execute(select(models).where(models.c.id == model["parent_id"])).mappings().first()
            if model["parent_id"]
            else None
        )
        made = (
            db.execute(
                select(sets).where(sets.c.model_id == model_id, sets.c.kind == "synthetic", sets.c.current.is_(True))
            )
            .mappings()
            .all()
        )
        set_names = [s["name"] for s in made]
        curated = (
            db.execute(
                select(sets).where(sets.c.kind == "curated", sets.c.name.in_(set_names), sets.c.current.is_(True))
            )
            .mappings()
            .all()
        )
        quality = (
            db.execute(
                select(metrics).where(
                    metrics.c.kind == "quality",
                    metrics.c.set.in_(set_names),
                    metrics.c["class"] == "all",
                    metrics.c.status == "ok",
                )
            )
            .mappings()
            .all()
        )
        image_ids = select(images.c.id).where(images.c.set_id.in_([s["id"] for s in [*made, *curated]]))
        held = (
            db.execute(
                select(datasets).where(
                    datasets.c.current.is_(True),
                    datasets.c.id.in_(
                        select(dataset_images.c.dataset_id).where(dataset_images.c.image_id.in_(image_ids))
                    ),
                )
            )
            .mappings()
            .all()
        )
        ratios = [d["ratio"] for d in held]
        trained = db.execute(select(runs).where(runs.c.ratio.in_(ratios), runs.c.current.is_(True))).mappings().all()
        verdicts = (
            db.execute(select(metrics).where(metrics.c.kind == "verdict", metrics.c.ratio.in_(ratios))).mappings().all()
        )
    return {
        "model": dict(model),
        "parent": dict(parent) if parent else None,
        "sets": [dict(s) for s in made],
        "curated": [dict(s) for s in curated],
        "quality": [dict(q) for q in quality],
        "datasets": [dict(d) for d in held],
        "runs": [dict(r) for r in trained],
        "verdicts": [dict(v) for v in verdicts],
    }


def newest_model(engine: Engine, kinds: Sequence[str]) -> dict:
    """The most recently registered current model of one of `kinds`."""
    with engine.connect() as db:
        found = (
            db.execute(
                select(models)
                .where(models.c.kind.in_(kinds), models.c.current.is_(True))
                .order_by(models.c.registered_at.desc(), models.c.id.desc())
            )
            .mappings()
            .first()
        )
    if found is None:
        raise RegistryError(f"no {' or '.join(kinds)} model in the registry; run the workflow first")
    return dict(found)


def model_by_id(engine: Engine, model_id: int) -> dict:
    with engine.connect() as db:
        found = db.execute(select(models).where(models.c.id == model_id)).mappings().first()
    if found is None:
        raise RegistryError(f"no model with id {model_id}; `histosynth registry models` lists them")
    return dict(found)


def export(engine: Engine, out: str | Path, fmt: str = "csv") -> list[Path]:
    """Every table (history included) as one CSV or parquet file each in `out`."""
    if fmt not in ("csv", "parquet"):
        raise RegistryError(f"export format must be csv or parquet, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("models", "sets", "images", "datasets", "dataset_images", "runs", "metrics"):
        with engine.connect() as db:
            table = pd.DataFrame(
                db.execute(select(metadata.tables[name])).mappings().all(),
                columns=[c.name for c in metadata.tables[name].c],
            )
        path = out / f"{name}.{fmt}"
        for column in ("config", "data"):
            if column in table:
                table[column] = table[column].map(lambda v: json.dumps(v) if v is not None else None)
        table.to_csv(path, index=False) if fmt == "csv" else table.to_parquet(path, index=False)
        written.append(path)
    return written
