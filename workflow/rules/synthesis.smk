rule synthesize:
    """Generate synthetic patches from training conditioning maps with the trained diffusion model."""
    input:
        unpack(synthesis_inputs),
    output:
        report(
            directory("results/synthetic/synth"),
            patterns=["grid_{name}.png"],
            caption="../report/synthetic_grid.rst",
            category="5. Synthetic patches",
            labels={"set": "synth", "class": "{name}"},
        ),
    log:
        "logs/synthesize.log",
    benchmark:
        "results/benchmarks/synthesize.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    params:
        mode="synth",
        config=synthesis_config("synth", "classes", "conditioning", "seed", "labels"),
    script:
        "../../scripts/synthesis.py"


rule inpaint:
    """RePaint: paint a target-class region into clean-tissue training patches, leaving the rest unchanged."""
    input:
        unpack(synthesis_inputs),
    output:
        report(
            directory("results/synthetic/inpaint"),
            patterns=["grid_{name}.png"],
            caption="../report/synthetic_grid.rst",
            category="5. Synthetic patches",
            labels={"set": "inpaint", "class": "{name}"},
        ),
    log:
        "logs/inpaint.log",
    benchmark:
        "results/benchmarks/inpaint.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    params:
        mode="inpaint",
        config=synthesis_config("inpaint", "classes", "conditioning", "seed", "labels"),
    script:
        "../../scripts/synthesis.py"


rule curate_synthetic:
    """Keep the synthetic images that agree with their mask and copy no training patch (judged on the image, calibrated per class on held-out real patches); score every image, audit memorisation."""
    input:
        unpack(curation_inputs),
    output:
        curated="results/curated/{set}.parquet",
        audit="results/curated/{set}.audit.parquet",
        pairs=report(
            "results/curated/{set}.pairs.png",
            caption="../report/memorisation.rst",
            category="5. Synthetic patches",
            subcategory="Curation and memorisation",
            labels={"set": "{set}", "figure": "copies and closest synthetic-training matches"},
        ),
    log:
        "logs/curate_synthetic/{set}.log",
    benchmark:
        "results/benchmarks/curate_synthetic/{set}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        config=rule_params.curation_params(config, LABELS),
    script:
        "../../scripts/curate_synthetic.py"
