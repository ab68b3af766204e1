"""Rule mask_consistency: one synthetic set's images against their masks and nuclei, per image (what
curation reads) and pooled (the report) (histosynth.evaluation.mask_consistency.consistency_stage)."""

from pathlib import Path

from histosynth.evaluation.mask_consistency import consistency_stage
from histosynth.generators.table import MANIFEST
from histosynth.logs import log_to

log_to(snakemake.log[0])
consistency_stage(
    snakemake.input.indexes,
    {snakemake.wildcards.set: Path(snakemake.input.synthetic) / MANIFEST},
    snakemake.output.table,
    snakemake.output.scores,
    config=snakemake.params.config,
    segmentation_model=snakemake.input.get("segmentation"),
)
