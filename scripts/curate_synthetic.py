"""Rule curate_synthetic: one synthetic set scored and curated (histosynth.evaluation.curation.curate_stage)."""

from pathlib import Path

from histosynth.evaluation.curation import curate_stage
from histosynth.generators.table import MANIFEST
from histosynth.logs import log_to

log_to(snakemake.log[0])
curate_stage(
    Path(snakemake.input.synthetic) / MANIFEST,
    snakemake.input.scores,
    snakemake.input.indexes,
    mode=snakemake.wildcards.set,
    curated_out=snakemake.output.curated,
    audit_out=snakemake.output.audit,
    pairs_out=snakemake.output.pairs,
    config=snakemake.params.config,
    segmentation_model=snakemake.input.get("segmentation"),
    realism=snakemake.input.get("realism"),
)
