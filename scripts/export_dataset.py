"""Rule export_dataset: one ratio's mixed dataset written as files (histosynth.export)."""

from pathlib import Path

from histosynth.export import dataset_rows, export_dataset, nuclei_reader
from histosynth.logs import log_to

log_to(snakemake.log[0])
config = snakemake.params.config
inputs = snakemake.input
rows = dataset_rows(
    inputs.manifest, inputs.heldout, {Path(p).stem: p for p in inputs.get("curated", [])}, config["labels"]
)
nuclei = None
if snakemake.wildcards.format == "coco":
    nuclei = nuclei_reader(
        {
            Path(table).stem: (masks, table)
            for masks, table in zip(inputs.nuclei_masks, inputs.nuclei_tables, strict=True)
        }
    )
export_dataset(
    rows,
    snakemake.wildcards.format,
    snakemake.output[0],
    classes=config["classes"],
    name=snakemake.wildcards.ratio,
    nuclei=nuclei,
)
