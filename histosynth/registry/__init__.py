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

Modules: `schema` (tables, connect), `writes` (upserts), `queries` (rows, lineage, export),
`results` (one workflow run from rule registry's inputs).
"""

from histosynth.registry.queries import export, lineage, model_by_id, newest_model, table_rows
from histosynth.registry.results import Run, register_results
from histosynth.registry.schema import RegistryError, connect, models, now
from histosynth.registry.writes import register_set

__all__ = [
    "RegistryError",
    "Run",
    "connect",
    "export",
    "lineage",
    "model_by_id",
    "models",
    "newest_model",
    "now",
    "register_results",
    "register_set",
    "table_rows",
]
