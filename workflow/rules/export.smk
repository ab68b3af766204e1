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
