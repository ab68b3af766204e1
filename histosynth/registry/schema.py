"""The registry's tables (SQLAlchemy Core, so SQLite and PostgreSQL alike) and opening a database
as a registry: a file that is not one, or a database of another application, is refused unchanged."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

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

from histosynth.generators.table import GENERATORS

SCHEMA_VERSION = "1"
MODEL_KINDS = (*(made.name for made in GENERATORS), "segmentation", "classifier", "nuclei")
metadata = MetaData()

info = Table("histosynth_registry", metadata, Column("key", String(64), primary_key=True), Column("value", String(256)))
models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("name", String(256), nullable=False),  # diffusion, segmentation/real/seed0, ...
    Column("path", Text, nullable=False),
    Column("content_hash", String(64), nullable=False, unique=True),
    Column("config", JSON),
    Column("data", JSON),  # what it was trained on
    Column("parent_id", Integer, ForeignKey("models.id")),
    Column("steps", Integer),
    Column("current", Boolean, nullable=False, default=True),
    Column("registered_at", String(32), nullable=False),
)
sets = Table(
    "sets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),  # synth, inpaint, gan, lora100, ...
    Column("kind", String(16), nullable=False),  # synthetic | curated
    Column("path", Text, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("model_id", Integer, ForeignKey("models.id")),
    Column("n_images", Integer),
    Column("n_kept", Integer),
    Column("current", Boolean, nullable=False, default=True),
    Column("registered_at", String(32), nullable=False),
)
images = Table(
    "images",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("set_id", Integer, ForeignKey("sets.id"), nullable=False),
    Column("image_id", String(128), nullable=False),  # the manifest's id
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
    "datasets",
    metadata,
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
    "dataset_images",
    metadata,
    Column("dataset_id", Integer, ForeignKey("datasets.id"), primary_key=True),
    Column("image_id", Integer, ForeignKey("images.id"), primary_key=True),
)
runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task", String(32), nullable=False),  # segmentation | classification
    Column("ratio", String(128), nullable=False),
    Column("fold", Integer),
    Column("seed", Integer, nullable=False),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False, unique=True),
    Column("dataset_id", Integer, ForeignKey("datasets.id")),
    Column("current", Boolean, nullable=False, default=True),
)
metrics = Table(
    "metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),  # segmentation | classification | quality | verdict
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
    return datetime.now(UTC).isoformat(timespec="seconds")


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
            raise RegistryError(
                f"{url} holds a database that is not a histosynth registry (tables {sorted(tables)[:5]}); "
                "point registry.url at another file or database"
            )
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
                    raise RegistryError(
                        f"{url} is a histosynth registry of schema version {found}, this histosynth "
                        f"writes {SCHEMA_VERSION}; export it and start a new one"
                    )
    except (DatabaseError, OperationalError) as err:
        engine.dispose()
        raise RegistryError(
            f"{url} cannot be opened as a registry database ({err.orig}); it was left unchanged: move it "
            "away or point registry.url elsewhere"
        ) from None
    return engine
