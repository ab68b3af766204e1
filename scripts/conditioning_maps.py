"""Rule conditioning_maps: encoded conditioning maps and their index for one slide."""

import pandas as pd

from histosynth.data.io import read_patch_index
from histosynth.logs import log_to
from histosynth.nuclei.conditioning import build_slide_conditioning, write_conditioning_index

log_to(snakemake.log[0])
index = read_patch_index(snakemake.input.index)
build_slide_conditioning(
    index,
    snakemake.input.nuclei,
    pd.read_parquet(snakemake.input.table),
    snakemake.output.maps,
    use_regions=snakemake.params.conditioning["regions"],
    workers=snakemake.threads,
)
write_conditioning_index(index, snakemake.output.maps, snakemake.output.index)
