"""Rule train_segmentation: one U-Net on one ratio's training set (histosynth.evaluation.segmentation).

params.seed is the run seed: derived from the master seed and the seed index, not from the ratio,
so same-seed runs of different ratios start from the same weights and the report can pair them."""

from histosynth.evaluation.segmentation import train_segmentation
from histosynth.logs import log_to

log_to(snakemake.log[0])
train_segmentation(
    snakemake.input.manifest,
    snakemake.input.indexes,
    snakemake.output[0],
    config=snakemake.params.config,
    seed=snakemake.params.seed,
)
