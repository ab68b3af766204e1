def export_inputs(wildcards):
    """Rule export_dataset's data: the ratio's manifest and what it reads (mixing_inputs), the
    val/test patch indexes, the patch and synthetic folders holding the files, and for coco the nuclei."""
    inputs = mixing_inputs(wildcards)
    inputs.pop("indexes")
    inputs["manifest"] = f"results/mixing/{wildcards.ratio}.parquet"
    inputs["heldout"] = patch_indexes("val") + patch_indexes("test")
    inputs["patches"] = expand("results/patches/{slide}", slide=SLIDES.index)
    if "curated" in inputs:
        inputs["synthetic"] = expand("results/synthetic/{mode}", mode=ratio_sources(wildcards.ratio))
    if wildcards.format == "coco":
        inputs["nuclei_masks"] = expand("results/nuclei/{slide}", slide=SLIDES.index)
        inputs["nuclei_tables"] = expand("results/nuclei/{slide}.parquet", slide=SLIDES.index)
    return inputs


def export_targets():
    """Every ratio in every layout of export.formats (none by default)."""
    return expand("results/export/{ratio}/{format}", ratio=RATIOS, format=config["export"]["formats"])


rule export_dataset:
    """One ratio's mixed training set plus the val/test real patches as files in one layout (export.formats)."""
    input:
        unpack(export_inputs),
    output:
        directory("results/export/{ratio}/{format}"),
    log:
        "logs/export_dataset/{ratio}.{format}.log",
    wildcard_constraints:
        format="segmentation|imagefolder|coco",
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=60,
    params:
        config=config_params("classes", "labels"),
    script:
        "../../scripts/export_dataset.py"
