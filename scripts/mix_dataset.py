"""Rule mix_dataset: one ratio's training manifest and class-pixel share (histosynth.evaluation.mixing.mix_dataset)."""

from histosynth.evaluation.mixing import mix_dataset
from histosynth.generators.synthesis import set_manifests
from histosynth.logs import log_to

log_to(snakemake.log[0])
config = snakemake.params.config
mix_dataset(
    snakemake.input.indexes,
    set_manifests(snakemake.input.get("synthetic", [])),
    snakemake.params.ratio,
    config["seed"],
    config["classes"],
    snakemake.output.manifest,
    snakemake.output.share,
)
