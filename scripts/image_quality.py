"""Rule image_quality: FID/KID/IS, LPIPS diversity and mask consistency (histosynth.quality.image_quality_stage)."""

from histosynth.logs import log_to
from histosynth.quality import image_quality_stage
from histosynth.synthesis import set_manifests

log_to(snakemake.log[0])
image_quality_stage(
    snakemake.input.indexes,
    set_manifests(snakemake.input.synthetic),
    snakemake.output[0],
    config=snakemake.params.config,
    segmentation_model=snakemake.input.get("segmentation"),
)
