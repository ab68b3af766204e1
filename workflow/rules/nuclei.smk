rule nuclei_masks:
    """Segment nuclei in every patch of a slide: instance masks, a per-nucleus table and a QuPath GeoJSON."""
    input:
        unpack(nuclei_inputs),
    output:
        masks=directory("results/nuclei/{slide}"),
        table="results/nuclei/{slide}.parquet",
        geojson="results/nuclei/{slide}.geojson",
    log:
        "logs/nuclei_masks/{slide}.log",
    benchmark:
        "results/benchmarks/nuclei_masks/{slide}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1 if config["nuclei"]["model"] else 0,
        mem_mb=4000,
        runtime=120,
    params:
        nuclei=config_params("nuclei")["nuclei"],
    script:
        "../../scripts/nuclei_masks.py"


rule train_nuclei:
    """Train the nuclei model (nuclei.model: trained) on the train-split slides' nuclei ground truth."""
    input:
        unpack(nuclei_training_inputs),
    output:
        model=TRAINED_NUCLEI_MODEL,
        loss="results/nuclei_model/loss.csv",
    log:
        "logs/train_nuclei.log",
    benchmark:
        "results/benchmarks/train_nuclei.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        seed=config["seed"],
        min_area_um2=config["nuclei"]["min_area_um2"],  # the exported decoder's smallest nucleus
        train=json.loads(json.dumps(config["nuclei"]["train"], sort_keys=True)),
        aperio_class=config["annotations"]["aperio_class"],  # how the sheet's nuclei files are read
        mask_downsample=config["annotations"]["mask_downsample"],
    script:
        "../../scripts/train_nuclei.py"


rule nuclei_quality:
    """Score the nuclei stage against a slide's ground-truth nuclei (sheet column nuclei; demo slides know where they drew them)."""
    input:
        index="results/patches/{slide}.parquet",
        masks="results/nuclei/{slide}",
        truth=lambda wildcards: nuclei_truth(wildcards.slide),
        image=slide_image,  # an instance mask of nuclei is checked against its size
    output:
        "results/nuclei/{slide}.quality.csv",
    log:
        "logs/nuclei_quality/{slide}.log",
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    params:
        aperio_class=config["annotations"]["aperio_class"],  # how the sheet's nuclei files are read
        mask_downsample=config["annotations"]["mask_downsample"],
    script:
        "../../scripts/nuclei_quality.py"


rule conditioning_maps:
    """Combine each patch's region labels and nuclei into the encoded conditioning map for synthesis."""
    input:
        index="results/patches/{slide}.parquet",
        patches="results/patches/{slide}",
        nuclei="results/nuclei/{slide}",
        table="results/nuclei/{slide}.parquet",
    output:
        maps=directory("results/conditioning/{slide}"),
        index="results/conditioning/{slide}.parquet",
    log:
        "logs/conditioning_maps/{slide}.log",
    benchmark:
        "results/benchmarks/conditioning_maps/{slide}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    params:
        conditioning=config_params("conditioning")["conditioning"],
    script:
        "../../scripts/conditioning_maps.py"
