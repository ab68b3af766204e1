"""Writing to the registry: upserts keyed by content (registering the same content again updates its
row), older rows at a path whose content changed kept as history (current = false)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from sqlalchemy import Table, select

from histosynth.files import file_hash
from histosynth.registry.schema import (
    MODEL_KINDS,
    RegistryError,
    dataset_images,
    datasets,
    images,
    metrics,
    models,
    now,
    sets,
)


def upsert(db, table: Table, key: Mapping, values: Mapping) -> int:
    """The id of the row matching `key`, updated with `values`, or of a new row with both."""
    where = [table.c[k] == v for k, v in key.items()]
    found = db.execute(select(table.c.id).where(*where)).scalar()
    if found is None:
        return db.execute(table.insert().values(**key, **values)).inserted_primary_key[0]
    if values:
        db.execute(table.update().where(table.c.id == found).values(**values))
    return found


def _supersede(db, table: Table, path: str, keep: int) -> None:
    """Older rows at `path` (content since replaced) stay as history, current = false."""
    db.execute(table.update().where(table.c.path == path, table.c.id != keep).values(current=False))


def _json(value):
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def _int(value):
    return None if value is None or pd.isna(value) else int(value)


def _float(value):
    return None if value is None or pd.isna(value) else float(value)


def _text(value):
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def register_model(
    db,
    kind: str,
    name: str,
    path: str | Path,
    *,
    root: Path,
    content_hash: str,
    config=None,
    data=None,
    parent_id: int | None = None,
    steps: int | None = None,
) -> int:
    if kind not in MODEL_KINDS:
        raise RegistryError(f"model kind {kind!r} is not one of {MODEL_KINDS}")
    rel = _relative(path, root)
    model_id = upsert(
        db,
        models,
        {"content_hash": content_hash},
        {
            "kind": kind,
            "name": name,
            "path": rel,
            "config": _json(config),
            "data": _json(data),
            "parent_id": parent_id,
            "steps": steps,
            "current": True,
            "registered_at": now(),
        },
    )
    _supersede(db, models, rel, model_id)
    return model_id


def _relative(path: str | Path, root: Path) -> str:
    """`path` (absolute, or relative to the working directory as read_file_table gives it, '..'
    and all) relative to `root`, normalised; outside root, absolute."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def register_set(
    db,
    name: str,
    kind: str,
    manifest: pd.DataFrame,
    manifest_path: str | Path,
    *,
    root: Path,
    model_ids: Mapping[str, int],
) -> int:
    """A synthetic set (its manifest rows, image paths absolute) and its images; model_ids maps
    a model content hash to its registry id (the manifest's model_hash). Curation's verdicts
    arrive later (register_curation)."""
    rel = _relative(manifest_path, root)
    model_hash = manifest["model_hash"].dropna().iloc[0] if "model_hash" in manifest and len(manifest) else None
    set_id = upsert(
        db,
        sets,
        {"kind": kind, "content_hash": file_hash(manifest_path)},
        {
            "name": name,
            "path": rel,
            "model_id": model_ids.get(model_hash),
            "n_images": len(manifest),
            "current": True,
            "registered_at": now(),
        },
    )
    _supersede(db, sets, rel, set_id)
    for row in manifest.to_dict("records"):
        upsert(
            db,
            images,
            {"set_id": set_id, "image_id": str(row["id"])},
            {
                "path": _relative(row["image"], root),
                "sha256": file_hash(row["image"]),
                "model_id": model_ids.get(row.get("model_hash")),
                "class": _text(row.get("class")),
                "seed": _int(row.get("seed")),
                "sampler": _text(row.get("sampler")),
                "steps": _int(row.get("steps")),
                "guidance": _float(row.get("guidance")),
                "source_patch_id": _text(row.get("source_patch_id")),
                "donor_patch_id": _text(row.get("donor_patch_id")),
                "source_slide": _text(row.get("source_slide")),
            },
        )
    return set_id


def register_dataset(
    db,
    ratio: str,
    manifest: pd.DataFrame,
    manifest_path: str | Path,
    *,
    root: Path,
    image_ids: Mapping[tuple[str, str], int],
) -> int:
    """A ratio's mixed manifest; image_ids maps (mode, image path relative to root) to an image id."""
    rel = _relative(manifest_path, root)
    synthetic = manifest[manifest["source"] == "synthetic"]
    dataset_id = upsert(
        db,
        datasets,
        {"content_hash": file_hash(manifest_path)},
        {
            "ratio": ratio,
            "path": rel,
            "n_real": int((manifest["source"] == "real").sum()),
            "n_synthetic": len(synthetic),
            "current": True,
            "registered_at": now(),
        },
    )
    _supersede(db, datasets, rel, dataset_id)
    db.execute(dataset_images.delete().where(dataset_images.c.dataset_id == dataset_id))
    held = {image_ids.get((row.mode, _relative(row.image, root))) for row in synthetic.itertuples()} - {None}
    if held:
        db.execute(dataset_images.insert(), [{"dataset_id": dataset_id, "image_id": i} for i in sorted(held)])
    return dataset_id


def register_metrics(db, table: pd.DataFrame, *, run_ids: Mapping[tuple, int], set_ids: Mapping[str, int]) -> int:
    """Replace the metric rows with the tidy `table` (the report's metrics plus verdict rows)."""
    db.execute(metrics.delete())
    rows = []
    for row in table.to_dict("records"):
        key = (row.get("kind"), row.get("ratio"), _int(row.get("fold")), _int(row.get("seed")))
        rows.append(
            {
                "kind": row["kind"],
                "run_id": run_ids.get(key),
                "set_id": set_ids.get(_text(row.get("set"))),
                "ratio": _text(row.get("ratio")),
                "fold": _int(row.get("fold")),
                "seed": _int(row.get("seed")),
                "set": _text(row.get("set")),
                "class": _text(row.get("class")),
                "metric": row["metric"],
                "value": _float(row.get("value")),
                "status": _text(row.get("status")),
                "note": _text(row.get("note")),
            }
        )
    if rows:
        db.execute(metrics.insert(), rows)
    return len(rows)


def register_curation(db, name: str, curated: pd.DataFrame, path: str | Path, *, root: Path, set_id: int) -> int:
    """A curated set (the set's rows with keep and reason) and each image's verdict on its synthetic row."""
    rel = _relative(path, root)
    curated_id = upsert(
        db,
        sets,
        {"kind": "curated", "content_hash": file_hash(path)},
        {
            "name": name,
            "path": rel,
            "model_id": db.execute(select(sets.c.model_id).where(sets.c.id == set_id)).scalar(),
            "n_images": len(curated),
            "n_kept": int(curated["keep"].sum()),
            "current": True,
            "registered_at": now(),
        },
    )
    _supersede(db, sets, rel, curated_id)
    for row in curated[["id", "keep", "reason"]].itertuples():
        db.execute(
            images.update()
            .where(images.c.set_id == set_id, images.c.image_id == str(row.id))
            .values(kept=bool(row.keep), reason=_text(row.reason))
        )
    return curated_id
