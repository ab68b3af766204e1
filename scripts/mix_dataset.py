"""Rule mix_dataset: one ratio's training manifest and class-pixel share from the curated synthetic sets
(histosynth.evaluation.mixing.mix_dataset)."""

from pathlib import Path

from histosynth.evaluation.mixing import mix_dataset
from histosynth.logs import log_to

log_to(snakemake.log[0])
config = snakemake.params.config
mix_dataset(
    snakemake.input.indexes,
    {Path(path).stem: path for path in snakemake.input.get("curated", [])},
    snakemake.params.ratio,
    config["seed"],
    config["classes"],
    config["labels"],
    snakemake.output.manifest,
    snakemake.output.share,
    on_shortfall=snakemake.params.on_shortfall,
)
