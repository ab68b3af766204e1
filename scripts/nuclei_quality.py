"""Rule nuclei_quality: detection F1 at IoU 0.5, AJI and pixel Dice against ground-truth nuclei."""

import pandas as pd

from histosynth.data.io import read_patch_index, write_csv
from histosynth.logs import log_to
from histosynth.nuclei.annotations import read_nuclei
from histosynth.nuclei.metrics import score_nuclei_stage

log = log_to(snakemake.log[0])
truth = read_nuclei(
    snakemake.input.truth,
    aperio_class=snakemake.params.aperio_class,
    mask_downsample=snakemake.params.mask_downsample,
    slide=snakemake.input.image,
)
scores = score_nuclei_stage(read_patch_index(snakemake.input.index), snakemake.input.masks, truth)
log.info("%s: %s", snakemake.wildcards.slide, scores)
table = pd.DataFrame({"slide": snakemake.wildcards.slide, "metric": list(scores), "value": list(scores.values())})
write_csv(table, snakemake.output[0])
