"""Rule train_classifier: one timm classifier on one ratio's training set and fold
(histosynth.evaluation.classification_stage).

params.seed is the run seed: derived from the master seed and the seed index, not from the ratio
or fold, so same-seed runs of different ratios start from the same weights and the report can pair
them; params.fold is the cross-validation fold (0 with classification.folds 1)."""

from histosynth.evaluation.classification_stage import train_classifier
from histosynth.logs import log_to

log_to(snakemake.log[0])
train_classifier(
    snakemake.input.manifest,
    snakemake.input.indexes,
    snakemake.output[0],
    config=snakemake.params.config,
    seed=snakemake.params.seed,
    fold=snakemake.params.fold,
)
