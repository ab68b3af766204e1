"""Rule registry: the workflow's outputs into the registry database (histosynth.registry.register_results)."""

import json
from pathlib import Path

import yaml

from histosynth.config import config_path
from histosynth.files import atomic_file
from histosynth.logs import log_to
from histosynth.registry import Run, connect, register_results

log = log_to(snakemake.log[0])
engine = connect(snakemake.params.url)
inputs, params = snakemake.input, snakemake.params
counts = register_results(
    engine,
    ".",
    models=dict(zip(params.generators, inputs.models, strict=True)),
    nuclei_model=inputs.nuclei_model[0] if inputs.nuclei_model else None,
    sets=dict(zip(params.sets, inputs.sets, strict=True)),
    curated=dict(zip(params.sets, inputs.curated, strict=True)),
    datasets=dict(zip(params.ratios, inputs.datasets, strict=True)),
    runs_made=[Run(**run, folder=folder) for run, folder in zip(params.runs, inputs.runs, strict=True)],
    metrics=inputs.metrics,
    verdict=inputs.verdict,
)
log.info("registered in %s: %s", snakemake.params.url, counts)
with atomic_file(snakemake.output.config) as tmp:  # the effective config, for `histosynth generate`
    effective = json.loads(json.dumps(dict(snakemake.config), default=str))
    # the sheet as the workflow resolves it (the working directory, else the workflow's), absolute
    effective["slides"] = str(config_path(effective["slides"], ".", Path(snakemake.scriptdir).parent).resolve())
    tmp.write_text(yaml.safe_dump(effective, sort_keys=False))
with atomic_file(snakemake.output.counts) as tmp:
    tmp.write_text(json.dumps({"url": snakemake.params.url, **counts}, indent=1))
