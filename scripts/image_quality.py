"""Rule image_quality: FID/KID/IS, LPIPS diversity and mask consistency (histosynth.quality.image_quality_stage)."""

from pathlib import Path

from histosynth.logs import log_to
from histosynth.quality import image_quality_stage
from histosynth.synthesis import MANIFEST

log_to(snakemake.log[0])
image_quality_stage(
    snakemake.input.indexes,
    {Path(folder).name: Path(folder) / MANIFEST for folder in snakemake.input.synthetic},
    snakemake.output[0],
    config=snakemake.params.config,
    segmentation_model=snakemake.input.get("segmentation"),
)
