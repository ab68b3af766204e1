"""Rule gan_synthesize: the GAN's synthetic set, its manifest and grids (histosynth.generators.synthesis.gan_stage)."""

from histosynth.generators.synthesis import gan_stage
from histosynth.logs import log_to

log_to(snakemake.log[0])
config = snakemake.params.config
gan_stage(snakemake.input.model, snakemake.input.indexes, snakemake.output[0], settings=config["synthesis"],
          labels=config["labels"], size=snakemake.params.size, seed=config["seed"])
