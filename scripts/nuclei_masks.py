"""Rule nuclei_masks: instance masks, per-nucleus table and GeoJSON for one slide's patches."""

from histosynth.data.io import read_patch_index, write_table
from histosynth.device import pick_device
from histosynth.logs import log_to
from histosynth.nuclei.geojson import write_geojson
from histosynth.nuclei.model import load_detector
from histosynth.nuclei.stage import segment_slide_patches

log_to(snakemake.log[0])
params = snakemake.params.nuclei
model = load_detector(snakemake.input.model, str(pick_device())) if "model" in snakemake.input.keys() else None
table, geojson = segment_slide_patches(
    read_patch_index(snakemake.input.index),
    snakemake.input.image,
    snakemake.output.masks,
    params,
    model,
    workers=snakemake.threads,
)
write_table(table, snakemake.output.table)
write_geojson(geojson, snakemake.output.geojson)
