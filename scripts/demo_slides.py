"""Rule demo_slides: render one procedural demo slide."""

from histosynth.demo import generate_demo_slide
from histosynth.logs import log_to

log = log_to(snakemake.log[0])
demo = snakemake.params.demo
summary = generate_demo_slide(
    snakemake.output.image,
    snakemake.output.regions,
    snakemake.output.nuclei,
    size=demo["size"],
    mpp=demo["mpp"],
    tile_size=demo["tile_size"],
    levels=demo["levels"],
    seed=snakemake.params.seed,
    jpeg_quality=demo["jpeg_quality"],
)
log.info("%s: %s", snakemake.wildcards.slide, summary)
