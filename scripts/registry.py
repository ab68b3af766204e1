"""Rule registry: the workflow's outputs into the registry database (histosynth.registry.register_results)."""

import json
from pathlib import Path

import yaml

from histosynth.data.io import atomic_file
from histosynth.logs import log_to
from histosynth.registry import connect, register_results

log = log_to(snakemake.log[0])
engine = connect(snakemake.params.url)
counts = register_results(engine, ".", nuclei_model=snakemake.params.nuclei_model)
log.info("registered in %s: %s", snakemake.params.url, counts)
with atomic_file(snakemake.output.config) as tmp:  # the effective config, for `histosynth generate`
    effective = json.loads(json.dumps(dict(snakemake.config), default=str))
    slides = Path(effective["slides"])  # as the workflow resolves it: the working directory, else the workflow's
    if not slides.is_absolute() and not slides.exists():
        effective["slides"] = str((Path(snakemake.scriptdir).parent / slides).resolve())
    tmp.write_text(yaml.safe_dump(effective, sort_keys=False))
with atomic_file(snakemake.output.counts) as tmp:
    tmp.write_text(json.dumps({"url": snakemake.params.url, **counts}, indent=1))
