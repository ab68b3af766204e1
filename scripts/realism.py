"""Rule realism: one synthetic set's two-sample test, sharpness and spectrum against the real training patches (histosynth.evaluation.realism.realism_stage)."""

from pathlib import Path

from histosynth.evaluation.realism import realism_stage
from histosynth.generators.table import MANIFEST
from histosynth.logs import log_to

log_to(snakemake.log[0])
realism_stage(
    snakemake.input.indexes,
    Path(snakemake.input.synthetic) / MANIFEST,
    mode=snakemake.wildcards.set,
    table_out=snakemake.output.table,
    images_out=snakemake.output.images,
    figure_out=snakemake.output.figure,
    config=snakemake.params.config,
)
