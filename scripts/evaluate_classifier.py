"""Rule evaluate_classifier: score one classifier on the test slides (histosynth.evaluation.classification_stage)."""

from histosynth.evaluation.classification_stage import evaluate_classifier
from histosynth.logs import log_to

log_to(snakemake.log[0])
evaluate_classifier(
    snakemake.input.run,
    snakemake.input.indexes,
    snakemake.output.metrics,
    snakemake.output.predictions,
    config=snakemake.params.config,
    ratio=snakemake.wildcards.ratio,
    fold=int(snakemake.wildcards.fold),
    seed=int(snakemake.wildcards.seed),
)
