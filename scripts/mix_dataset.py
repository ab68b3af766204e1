"""Rule mix_dataset: one ratio's training manifest and class-pixel share (histosynth.mixing.mix_dataset)."""

from pathlib import Path

from histosynth.logs import log_to
from histosynth.mixing import mix_dataset
from histosynth.synthesis import MANIFEST

log_to(snakemake.log[0])
config = snakemake.params.config
mix_dataset(
    snakemake.input.indexes,
    {Path(folder).name: Path(folder) / MANIFEST for folder in snakemake.input.get("synthetic", [])},
    snakemake.params.ratio,
    config["seed"],
    config["classes"],
    snakemake.output.manifest,
    snakemake.output.share,
)
