"""The registry: one database of what the workflow made (seed 001's model and image database).

Tables (SQLAlchemy Core, so SQLite and PostgreSQL alike; `registry.url`, default an embedded
SQLite file results/registry.sqlite):

- models: trained networks (kind autoencoder | diffusion | gan | lora | segmentation | classifier |
  nuclei), path, content hash, config, training data, parent (a latent diffusion model's
  autoencoder), steps.
- sets: synthetic sets (a generator's manifest) and curated sets, with their model.
- images: every synthetic image: path, sha256, set, model, class, seed, sampler, steps, guidance,
  source and donor patch and slide, kept or rejected by curation and why.
- datasets: the mixed training manifests per ratio, and dataset_images: which synthetic images
  each holds (real patches are counted).
- runs: each task model (task x ratio x fold x seed) with its dataset.
- metrics: the report's tidy metric rows and verdict rows, linked to their run or set.

Rows are keyed by content (a model's, set's or dataset's hash; an image's set and id): registering
the same content again updates its row, never duplicates it. A path whose content changed gets a
new row, and the older rows at that path are kept as history with current = false. Paths are
relative to the workflow's working directory. One writer (rule registry) at a time; SQLite runs
in WAL mode, so readers (the CLI) see the last committed state while it writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, OperationalError

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
MODEL_KINDS = ("autoencoder", "diffusion", "gan", "lora", "segmentation", "classifier", "nuclei")
metadata = MetaData()

info = Table("histosynth_registry", metadata, Column("key", String(64), primary_key=True), Column("value", String(256)))
models = Table(
    "models", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("name", String(256), nullable=False),        # diffusion, segmentation/real/seed0, ...
    Column("path", Text, nullable=False),
    Column("content_hash", String(64), nullable=False, unique=True),
    Column("config", JSON),
    Column("data", JSON),                               # what it was trained on
    Column("parent_id", Integer, ForeignKey("models.id")),
    Column("steps", Integer),
    Column("current", Boolean, nullable=False, default=True),
    Column("registered_at", String(32), nullable=False),
)
sets = Table(
    "sets", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),         # synth, inpaint, gan, lora100, ...
    Column("kind", String(16), nullable=False),         # synthetic | curated
    Column("path", Text, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("model_id", Integer, ForeignKey("models.id")),
    Column("n_images", Integer),
    Column("n_kept", Integer),
    Column("current", Boolean, nullable=False, default=True),
    Column("registered_at", String(32), nullable=False),
)
images = Table(
    "images", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("set_id", Integer, ForeignKey("sets.id"), nullable=False),
    Column("image_id", String(128), nullable=False),    # the manifest's id
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("model_id", Integer, ForeignKey("models.id")),
    Column("class", String(128)),
    Column("seed", Integer),
    Column("sampler", String(32)),
    Column("steps", Integer),
    Column("guidance", Float),
    Column("source_patch_id", String(256)),
    Column("donor_patch_id", String(256)),
    Column("source_slide", String(256)),
    Column("kept", Boolean),
    Column("reason", Text),
)
datasets = Table(
    "datasets", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ratio", String(128), nullable=False),
    Column("path", Text, nullable=False),
    Column("content_hash", String(64), nullable=False, unique=True),
    Column("n_real", Integer),
    Column("n_synthetic", Integer),
    Column("current", Boolean, nullable=False, default=True),
    Column("registered_at", String(32), nullable=False),
)
dataset_images = Table(
    "dataset_images", metadata,
    Column("dataset_id", Integer, ForeignKey("datasets.id"), primary_key=True),
    Column("image_id", Integer, ForeignKey("images.id"), primary_key=True),
)
runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task", String(32), nullable=False),         # segmentation | classification
    Column("ratio", String(128), nullable=False),
    Column("fold", Integer),
    Column("seed", Integer, nullable=False),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False, unique=True),
    Column("dataset_id", Integer, ForeignKey("datasets.id")),
    Column("current", Boolean, nullable=False, default=True),
)
metrics = Table(
    "metrics", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),         # segmentation | classification | quality | verdict
    Column("run_id", Integer, ForeignKey("runs.id")),
    Column("set_id", Integer, ForeignKey("sets.id")),
    Column("ratio", String(128)),
    Column("fold", Integer),
    Column("seed", Integer),
    Column("set", String(64)),
    Column("class", String(128)),
    Column("metric", String(64), nullable=False),
    Column("value", Float),
    Column("status", String(16)),
    Column("note", Text),
)


class RegistryError(RuntimeError):
    """A registry database that cannot be opened or is not histosynth's."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def connect(url: str, create: bool = True) -> Engine:
    """An engine on the registry at `url` (a SQLAlchemy URL), its tables created when `create`.
    A file that is not a database, or a database with tables but no histosynth registry in it,
    is an error: nothing in it is changed."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists() and not create:
            raise RegistryError(f"no registry at {path}: run the workflow (rule registry) first, or pass --url")
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        tables = set(inspect(engine).get_table_names())
        if tables and info.name not in tables:
            raise RegistryError(f"{url} holds a database that is not a histosynth registry (tables {sorted(tables)[:5]}); "
                                "point registry.url at another file or database")
        if create:
            if engine.dialect.name == "sqlite":  # readers do not block the writer, nor it them (a property of the file)
                with engine.connect() as db:
                    db.exec_driver_sql("PRAGMA journal_mode=WAL")
            metadata.create_all(engine)
            with engine.begin() as db:
                found = db.execute(select(info.c.value).where(info.c.key == "schema_version")).scalar()
                if found is None:
                    db.execute(info.insert().values(key="schema_version", value=SCHEMA_VERSION))
                elif found != SCHEMA_VERSION:
                    raise RegistryError(f"{url} is a histosynth registry of schema version {found}, this histosynth "
                                        f"writes {SCHEMA_VERSION}; export it and start a new one")
    except (DatabaseError, OperationalError) as err:
        engine.dispose()
        raise RegistryError(f"{url} cannot be opened as a registry database ({err.orig}); it was left unchanged: move it "
                            "away or point registry.url elsewhere") from None
    return engine


def _upsert(db, table: Table, key: Mapping, values: Mapping) -> int:
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


# ----------------------------------------------------------------------------- writing

def register_model(db, kind: str, name: str, path: str | Path, *, root: Path, content_hash: str, config=None,
                   data=None, parent_id: int | None = None, steps: int | None = None) -> int:
    if kind not in MODEL_KINDS:
        raise RegistryError(f"model kind {kind!r} is not one of {MODEL_KINDS}")
    rel = _relative(path, root)
    model_id = _upsert(db, models, {"content_hash": content_hash},
                       {"kind": kind, "name": name, "path": rel, "config": _json(config), "data": _json(data),
                        "parent_id": parent_id, "steps": steps, "current": True, "registered_at": now()})
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


def register_set(db, name: str, kind: str, manifest: pd.DataFrame, manifest_path: str | Path, *, root: Path,
                 model_ids: Mapping[str, int]) -> int:
    """A synthetic set (its manifest rows, image paths absolute) and its images; model_ids maps
    a model content hash to its registry id (the manifest's model_hash). Curation's verdicts
    arrive later (register_curation)."""
    rel = _relative(manifest_path, root)
    model_hash = manifest["model_hash"].dropna().iloc[0] if "model_hash" in manifest and len(manifest) else None
    set_id = _upsert(db, sets, {"kind": kind, "content_hash": file_hash(manifest_path)},
                     {"name": name, "path": rel, "model_id": model_ids.get(model_hash), "n_images": len(manifest),
                      "current": True, "registered_at": now()})
    _supersede(db, sets, rel, set_id)
    for row in manifest.to_dict("records"):
        _upsert(db, images, {"set_id": set_id, "image_id": str(row["id"])}, {
            "path": _relative(row["image"], root), "sha256": file_hash(row["image"]),
            "model_id": model_ids.get(row.get("model_hash")), "class": _text(row.get("class")), "seed": _int(row.get("seed")),
            "sampler": _text(row.get("sampler")), "steps": _int(row.get("steps")), "guidance": _float(row.get("guidance")),
            "source_patch_id": _text(row.get("source_patch_id")), "donor_patch_id": _text(row.get("donor_patch_id")),
            "source_slide": _text(row.get("source_slide"))})
    return set_id


def register_dataset(db, ratio: str, manifest: pd.DataFrame, manifest_path: str | Path, *, root: Path,
                     image_ids: Mapping[tuple[str, str], int]) -> int:
    """A ratio's mixed manifest; image_ids maps (mode, image path relative to root) to an image id."""
    rel = _relative(manifest_path, root)
    synthetic = manifest[manifest["source"] == "synthetic"]
    dataset_id = _upsert(db, datasets, {"content_hash": file_hash(manifest_path)},
                         {"ratio": ratio, "path": rel, "n_real": int((manifest["source"] == "real").sum()),
                          "n_synthetic": len(synthetic), "current": True, "registered_at": now()})
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
        rows.append({"kind": row["kind"], "run_id": run_ids.get(key), "set_id": set_ids.get(_text(row.get("set"))),
                     "ratio": _text(row.get("ratio")), "fold": _int(row.get("fold")), "seed": _int(row.get("seed")),
                     "set": _text(row.get("set")), "class": _text(row.get("class")), "metric": row["metric"],
                     "value": _float(row.get("value")), "status": _text(row.get("status")), "note": _text(row.get("note"))})
    if rows:
        db.execute(metrics.insert(), rows)
    return len(rows)


# ----------------------------------------------------------------------------- reading

def table_rows(engine: Engine, name: str, *, kind: str | None = None, label: str | None = None,
               history: bool = False) -> pd.DataFrame:
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
        return pd.DataFrame(db.execute(query.order_by(table.c[next(iter(table.primary_key)).name])).mappings().all(),
                            columns=[c.name for c in table.c])


def lineage(engine: Engine, model_id: int) -> dict:
    """A model's record with its parent, the sets it made (with their quality rows), the datasets
    holding their images, the task runs trained on those and the verdict rows of their ratios."""
    with engine.connect() as db:
        model = db.execute(select(models).where(models.c.id == model_id)).mappings().first()
        if model is None:
            raise RegistryError(f"no model with id {model_id}; `histosynth registry models` lists them")
        parent = db.execute(select(models).where(models.c.id == model["parent_id"])).mappings().first() \
            if model["parent_id"] else None
        made = db.execute(select(sets).where(sets.c.model_id == model_id, sets.c.kind == "synthetic",
                                             sets.c.current.is_(True))).mappings().all()
        set_names = [s["name"] for s in made]
        curated = db.execute(select(sets).where(sets.c.kind == "curated", sets.c.name.in_(set_names),
                                                sets.c.current.is_(True))).mappings().all()
        quality = db.execute(select(metrics).where(metrics.c.kind == "quality", metrics.c.set.in_(set_names),
                                                   metrics.c["class"] == "all", metrics.c.status == "ok")).mappings().all()
        image_ids = select(images.c.id).where(images.c.set_id.in_([s["id"] for s in [*made, *curated]]))
        held = db.execute(select(datasets).where(datasets.c.current.is_(True), datasets.c.id.in_(
            select(dataset_images.c.dataset_id).where(dataset_images.c.image_id.in_(image_ids))))).mappings().all()
        ratios = [d["ratio"] for d in held]
        trained = db.execute(select(runs).where(runs.c.ratio.in_(ratios), runs.c.current.is_(True))).mappings().all()
        verdicts = db.execute(select(metrics).where(metrics.c.kind == "verdict", metrics.c.ratio.in_(ratios))).mappings().all()
    return {"model": dict(model), "parent": dict(parent) if parent else None, "sets": [dict(s) for s in made],
            "curated": [dict(s) for s in curated], "quality": [dict(q) for q in quality], "datasets": [dict(d) for d in held],
            "runs": [dict(r) for r in trained], "verdicts": [dict(v) for v in verdicts]}


def newest_model(engine: Engine, kinds: Sequence[str]) -> dict:
    """The most recently registered current model of one of `kinds`."""
    with engine.connect() as db:
        found = db.execute(select(models).where(models.c.kind.in_(kinds), models.c.current.is_(True))
                           .order_by(models.c.registered_at.desc(), models.c.id.desc())).mappings().first()
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
            table = pd.DataFrame(db.execute(select(metadata.tables[name])).mappings().all(),
                                 columns=[c.name for c in metadata.tables[name].c])
        path = out / f"{name}.{fmt}"
        for column in ("config", "data"):
            if column in table:
                table[column] = table[column].map(lambda v: json.dumps(v) if v is not None else None)
        table.to_csv(path, index=False) if fmt == "csv" else table.to_parquet(path, index=False)
        written.append(path)
    return written


def iter_sets(results: Path) -> Iterable[tuple[str, Path]]:
    """(set name, manifest path) of every synthetic set folder under results/synthetic."""
    for manifest in sorted((results / "synthetic").glob("*/manifest.parquet")):
        yield manifest.parent.name, manifest


# ----------------------------------------------------------------------------- the workflow's outputs

MODEL_FOLDERS = {"autoencoder": "autoencoder/model", "diffusion": "diffusion/model", "gan": "gan/model", "lora": "lora/adapter"}


def _meta(folder: Path) -> dict:
    path = folder / "histosynth.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def register_results(engine: Engine, root: str | Path = ".", *, nuclei_model: str | Path | None = None) -> dict:
    """Upsert everything the workflow made under root/results (rule registry) in one transaction:
    models, synthetic and curated sets with their images, mixed datasets, task runs, the report's
    metrics and verdict rows. Returns the counts registered."""
    from histosynth.data.io import read_file_table
    from histosynth.files import content_hash

    root = Path(root)
    results = root / "results"
    counts: dict[str, int] = {}
    with engine.begin() as db:
        ids: dict[str, int] = {}  # content hash -> model id
        for kind, folder in MODEL_FOLDERS.items():
            path = results / folder
            if not path.is_dir():
                continue
            meta, digest = _meta(path), content_hash(path)
            parent = ids.get(content_hash(results / MODEL_FOLDERS["autoencoder"])) \
                if kind == "diffusion" and meta.get("space") == "latent" and (results / MODEL_FOLDERS["autoencoder"]).is_dir() else None
            ids[digest] = register_model(db, kind, kind, path, root=root, content_hash=digest, config=meta.get("training", meta),
                                         data=(meta.get("training") or {}).get("data"), parent_id=parent, steps=meta.get("steps"))
        if nuclei_model:
            ids[file_hash(nuclei_model)] = register_model(db, "nuclei", "nuclei", nuclei_model, root=root,
                                                          content_hash=file_hash(nuclei_model))
        task_models = {}
        for task, kind, pattern in (("segmentation", "segmentation", "segmentation/*/seed*/model"),
                                    ("classification", "classifier", "classification/*/fold*/seed*/model")):
            for path in sorted(results.glob(pattern)):
                run = path.parent
                parts = run.relative_to(results / task).parts
                ratio, fold = parts[0], int(parts[1].removeprefix("fold")) if task == "classification" else None
                seed = int(parts[-1].removeprefix("seed"))
                summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
                digest = content_hash(path)
                task_models[(task, ratio, fold, seed)] = register_model(
                    db, kind, f"{task}/{'/'.join(parts)}", path, root=root, content_hash=digest, config=summary,
                    steps=summary.get("epochs_run"))
        counts["models"] = len(ids) + len(task_models)

        set_ids, image_ids = {}, {}
        for name, manifest_path in iter_sets(results):
            manifest = read_file_table(manifest_path)
            set_ids[name] = register_set(db, name, "synthetic", manifest, manifest_path, root=root, model_ids=ids)
        for name, set_id in set_ids.items():
            for row in db.execute(select(images.c.id, images.c.path).where(images.c.set_id == set_id)):
                image_ids[(name, row.path)] = row.id
            curated = results / "curated" / f"{name}.parquet"
            if curated.is_file():
                register_curation(db, name, read_file_table(curated), curated, root=root, set_id=set_id)
        counts["sets"], counts["images"] = len(set_ids), len(image_ids)

        dataset_ids = {}
        for manifest_path in sorted((results / "mixing").glob("*.parquet")):
            if manifest_path.name.endswith(".share.parquet"):
                continue
            ratio = manifest_path.stem
            dataset_ids[ratio] = register_dataset(db, ratio, read_file_table(manifest_path), manifest_path, root=root,
                                                  image_ids=image_ids)
        counts["datasets"] = len(dataset_ids)

        run_ids = {}
        for (task, ratio, fold, seed), model_id in task_models.items():
            run_id = _upsert(db, runs, {"model_id": model_id}, {"task": task, "ratio": ratio, "fold": fold, "seed": seed,
                                                                "dataset_id": dataset_ids.get(ratio), "current": True})
            db.execute(runs.update().where(runs.c.task == task, runs.c.ratio == ratio, runs.c.seed == seed,
                                           (runs.c.fold == fold) if fold is not None else runs.c.fold.is_(None),
                                           runs.c.id != run_id).values(current=False))
            run_ids[(task, ratio, fold, seed)] = run_id
        counts["runs"] = len(run_ids)

        tidy = pd.read_parquet(results / "report" / "metrics.parquet") if (results / "report" / "metrics.parquet").is_file() \
            else pd.DataFrame(columns=["kind", "metric"])
        verdict_path = results / "report" / "verdict.csv"
        if verdict_path.is_file():
            decided = pd.read_csv(verdict_path)
            tidy = pd.concat([tidy, pd.DataFrame({
                "kind": "verdict", "ratio": decided["ratio"], "class": decided["class"],
                "metric": decided["task"] + "/" + decided["metric"], "value": decided["mean_diff"], "status": decided["verdict"],
                "note": [f"{r.verdict}: {r.mean_diff:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}] vs {r.baseline}, paired by "
                         f"{r.paired_by}, n={r.n}" for r in decided.itertuples()]})], ignore_index=True)
        counts["metrics"] = register_metrics(db, tidy, run_ids=run_ids, set_ids=set_ids)
    return counts


def register_curation(db, name: str, curated: pd.DataFrame, path: str | Path, *, root: Path, set_id: int) -> int:
    """A curated set (the set's rows with keep and reason) and each image's verdict on its synthetic row."""
    rel = _relative(path, root)
    curated_id = _upsert(db, sets, {"kind": "curated", "content_hash": file_hash(path)},
                         {"name": name, "path": rel, "model_id": db.execute(select(sets.c.model_id).where(sets.c.id == set_id)).scalar(),
                          "n_images": len(curated), "n_kept": int(curated["keep"].sum()), "current": True, "registered_at": now()})
    _supersede(db, sets, rel, curated_id)
    for row in curated[["id", "keep", "reason"]].itertuples():
        db.execute(images.update().where(images.c.set_id == set_id, images.c.image_id == str(row.id))
                   .values(kept=bool(row.keep), reason=_text(row.reason)))
    return curated_id
