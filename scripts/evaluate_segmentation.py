"""Rule evaluate_segmentation: score one run on the test slides (histosynth.evaluation.segmentation)."""

from histosynth.evaluation.segmentation_scores import evaluate_segmentation
from histosynth.logs import log_to

log_to(snakemake.log[0])
evaluate_segmentation(
    snakemake.input.run,
    snakemake.input.indexes,
    snakemake.output.metrics,
    snakemake.output.images,
    snakemake.output.overlays,
    config=snakemake.params.config,
    ratio=snakemake.wildcards.ratio,
    seed=int(snakemake.wildcards.seed),
)
