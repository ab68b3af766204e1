"""Rule gan_synthesize: the GAN's synthetic set, its manifest and grids (histosynth.generators.label_sets.gan_stage)."""

from histosynth.generators.label_sets import gan_stage
from histosynth.logs import log_to

log_to(snakemake.log[0])
config = snakemake.params.config
gan_stage(
    snakemake.input.model,
    snakemake.input.indexes,
    snakemake.output[0],
    settings=config["synthesis"],
    labels=config["labels"],
    size=snakemake.params.size,
    seed=config["seed"],
)
