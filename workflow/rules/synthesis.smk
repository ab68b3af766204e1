rule synthesize:
    """Generate synthetic patches from training conditioning maps with the trained diffusion model."""
    input:
        unpack(synthesis_inputs),
    output:
        report(
            directory("results/synthetic/synth"),
            patterns=["grid_{name}.png"],
            caption="../report/synthetic_grid.rst",
            category="4. Synthetic patches",
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
        config=config_params("synthesis", "classes", "conditioning", "seed"),
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
            category="4. Synthetic patches",
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
        config=config_params("synthesis", "classes", "conditioning", "seed"),
    script:
        "../../scripts/synthesis.py"
