rule mix_dataset:
    """One ratio's training set: the train slides' real patches plus synthetic ones, as a manifest (no copies)."""
    input:
        unpack(mixing_inputs),
    output:
        manifest="results/mixing/{ratio}.parquet",
        share="results/mixing/{ratio}.share.parquet",
    log:
        "logs/mix_dataset/{ratio}.log",
    benchmark:
        "results/benchmarks/mix_dataset/{ratio}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    params:
        ratio=lambda wc: RATIOS[wc.ratio],
        config=config_params("classes", "seed", "labels"),
        on_shortfall=config["mixing"]["on_shortfall"],
    script:
        "../../scripts/mix_dataset.py"
