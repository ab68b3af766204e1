"""Rule image_quality: one synthetic set's offline FD/KD, FID/KID/IS and diversity, for the report
(histosynth.evaluation.quality.image_quality_stage)."""

from pathlib import Path

from histosynth.evaluation.quality import image_quality_stage
from histosynth.generators.table import MANIFEST
from histosynth.logs import log_to

log_to(snakemake.log[0])
image_quality_stage(
    snakemake.input.indexes,
    {snakemake.wildcards.set: Path(snakemake.input.synthetic) / MANIFEST},
    snakemake.output.table,
    config=snakemake.params.config,
    segmentation_model=snakemake.input.get("segmentation"),
)
