"""Rule summarize: the verdict, the tidy metrics table, plots and the memorisation audit (histosynth.evaluation.report.summarize)."""

from pathlib import Path

from histosynth.evaluation.report import summarize
from histosynth.logs import log_to

log_to(snakemake.log[0])
runs = [Path(run) / "loss.csv" for run in [*snakemake.input.runs, *snakemake.input.classifiers]]
summarize(
    snakemake.input.evaluations,
    dict(snakemake.output.items()),
    ratios=snakemake.params.ratios,
    seed=snakemake.params.seed,
    quality_paths=snakemake.input.quality,
    scores_paths=snakemake.input.scores,
    share_paths=snakemake.input.shares,
    audit_paths=snakemake.input.audits,
    loss_csvs=[*runs, *snakemake.input.generative_losses],
    loss_names=snakemake.params.run_names,
    baseline=snakemake.params.baseline,
    classification_paths=snakemake.input.classification,
    prediction_paths=snakemake.input.predictions,
    class_names=snakemake.params.class_names,
    image_paths=snakemake.input.images,
    verdict_settings=snakemake.params.verdict,
    primary=snakemake.params.primary,
)
