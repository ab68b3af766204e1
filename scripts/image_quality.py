"""Rule image_quality: one synthetic set's mask consistency, offline FD/KD, FID/KID/IS and diversity (histosynth.evaluation.quality.image_quality_stage)."""

from histosynth.evaluation.quality import image_quality_stage
from histosynth.generators.synthesis import set_manifests
from histosynth.logs import log_to

log_to(snakemake.log[0])
image_quality_stage(
    snakemake.input.indexes,
    set_manifests([snakemake.input.synthetic]),
    snakemake.output.table,
    scores_out=snakemake.output.scores,
    config=snakemake.params.config,
    segmentation_model=snakemake.input.get("segmentation"),
)
