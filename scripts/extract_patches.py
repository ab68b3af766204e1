"""Rule extract_patches: cut one slide into patches, masks, an index and a QC thumbnail."""

from histosynth.data.patches import extract_slide
from histosynth.logs import log_to

log_to(snakemake.log[0])
extract_slide(
    snakemake.input.image,
    snakemake.input.annotations[0] if snakemake.input.annotations else None,
    snakemake.output.patches,
    snakemake.output.index,
    snakemake.output.qc,
    slide_name=snakemake.wildcards.slide,
    split=snakemake.params.split,
    config=snakemake.params.config,
    mpp=snakemake.params.mpp,
    label=snakemake.params.label,
    workers=snakemake.threads,
)
