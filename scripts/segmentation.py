"""Rules train_segmentation and evaluate_segmentation (histosynth.evaluation.segmentation)."""

from histosynth.device import derive_seed
from histosynth.logs import log_to
from histosynth.evaluation.segmentation import evaluate_segmentation, train_segmentation

log_to(snakemake.log[0])
config = snakemake.params.config
ratio, seed = snakemake.wildcards.ratio, int(snakemake.wildcards.seed)
if snakemake.rule == "train_segmentation":
    # The run seed depends on the master seed and the seed index, not on the ratio: same-seed runs
    # of different ratios start from the same weights, so the report can pair them.
    train_segmentation(snakemake.input.manifest, snakemake.input.indexes, snakemake.output[0],
                       config=config, seed=derive_seed(config["seed"], "segmentation", seed))
else:
    evaluate_segmentation(snakemake.input.run, snakemake.input.indexes, snakemake.output.metrics,
                          snakemake.output.overlays, config=config, ratio=ratio, seed=seed)
