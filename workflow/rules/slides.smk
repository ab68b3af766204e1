rule demo_slides:
    """Render one procedural H&E-like demo slide (pyramidal JPEG TIFF) with its region and nuclei GeoJSON."""
    output:
        image=f"{DEMO_DIR}/{{slide}}.tiff",
        regions=f"{DEMO_DIR}/{{slide}}.geojson",
        nuclei=f"{DEMO_DIR}/{{slide}}.nuclei.geojson",
    log:
        "logs/demo_slides/{slide}.log",
    benchmark:
        "results/benchmarks/demo_slides/{slide}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    params:
        demo=config_params("demo")["demo"],
        seed=lambda wc: derive_seed(config["seed"], "demo", wc.slide),
    script:
        "../../scripts/demo_slides.py"
