rule synthesize:
    """Generate synthetic patches from training conditioning maps with the trained diffusion model."""
    input:
        unpack(synthesis_inputs),
    output:
        directory("results/synthetic/synth"),
    log:
        "logs/synthesize.log",
    benchmark:
        "results/benchmarks/synthesize.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    params:
        config=config_params("synthesis", "classes", "conditioning", "seed"),
    script:
        "../../scripts/synthesis.py"


rule inpaint:
    """RePaint: paint a target-class region into clean-tissue training patches, leaving the rest unchanged."""
    input:
        unpack(synthesis_inputs),
    output:
        directory("results/synthetic/inpaint"),
    log:
        "logs/inpaint.log",
    benchmark:
        "results/benchmarks/inpaint.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    params:
        config=config_params("synthesis", "classes", "conditioning", "seed"),
    script:
        "../../scripts/synthesis.py"
