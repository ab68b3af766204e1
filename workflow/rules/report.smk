from histosynth.evaluation.verdict import primary_endpoint


rule summarize:
    """The verdict (each ratio vs the baseline, paired by seed, intervals over seeds and test images, a primary endpoint, adjusted p), one tidy table of every metric, plots across ratios, the memorisation audit."""
    input:
        evaluations=segmentation_runs("results/evaluation/{ratio}/seed{seed}.parquet"),
        images=segmentation_runs("results/evaluation/{ratio}/seed{seed}.images.parquet"),
        runs=segmentation_runs("results/segmentation/{ratio}/seed{seed}"),
        classification=classification_runs("results/classification_evaluation/{ratio}/fold{fold}/seed{seed}.parquet"),
        predictions=classification_runs("results/classification_evaluation/{ratio}/fold{fold}/seed{seed}.predictions.parquet"),
        classifiers=classification_runs("results/classification/{ratio}/fold{fold}/seed{seed}"),
        shares=expand("results/mixing/{ratio}.share.parquet", ratio=RATIOS),
        quality=expand("results/quality/{mode}{table}.parquet", mode=synthetic_sets(), table=("", ".consistency"))
        + (expand("results/quality/{mode}.realism.parquet", mode=synthetic_sets()) if config["realism"]["enabled"] else []),
        scores=expand("results/quality/{mode}.scores.parquet", mode=synthetic_sets()),
        generative_losses=list(generative_losses().values()),
        audits=expand("results/curated/{mode}.audit.parquet", mode=synthetic_sets()),
    output:
        verdict=report("results/report/verdict.csv", caption="../report/verdict.rst", category="1. Verdict", labels={"table": "verdict"}),
        verdict_plot=report("results/report/verdict.png", caption="../report/verdict.rst", category="1. Verdict", labels={"figure": "verdict"}),
        memorisation=report("results/report/memorisation.csv", caption="../report/memorisation.rst", category="5. Synthetic patches", subcategory="Curation and memorisation", labels={"table": "memorisation audit"}),
        table=report("results/report/metrics.csv", caption="../report/metrics_table.rst", category="8. Results", labels={"table": "all metrics"}),
        parquet="results/report/metrics.parquet",
        seed_summary=report("results/report/seed_summary.csv", caption="../report/seed_summary.rst", category="8. Results", labels={"table": "mean ± sd over seeds"}),
        class_share=report("results/report/class_share.csv", caption="../report/class_share.rst", category="6. Mixed datasets", labels={"table": "class-pixel share"}),
        class_share_plot=report("results/report/class_share.png", caption="../report/class_share.rst", category="6. Mixed datasets", labels={"figure": "class-pixel share"}),
        quality_plot=report("results/report/quality.png", caption="../report/quality.rst", category="8. Results", labels={"figure": "image quality"}),
        quality_per_class=report("results/report/quality_per_class.png", caption="../report/quality_per_class.rst", category="8. Results", labels={"figure": "image quality per class"}),
        **({"metrics_plot": report("results/report/metrics.png", caption="../report/metrics_plot.rst", category="8. Results", labels={"figure": "segmentation vs synthetic amount"})}
           if SEGMENTATION else {}),
        **({"classification_plot": report("results/report/classification.png", caption="../report/classification.rst", category="8. Results", labels={"figure": "classification vs synthetic amount"}),
            "confusion": report("results/report/confusion.png", caption="../report/confusion.rst", category="8. Results", labels={"figure": "confusion matrices"})}
           if CLASSIFICATION else {}),
        loss=report(
            directory("results/report/loss"),
            patterns=["{run}.png"],
            caption="../report/loss.rst",
            category="9. Training curves",
            labels={"run": "{run}"},
        ),
    log:
        "logs/summarize.log",
    benchmark:
        "results/benchmarks/summarize.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    params:
        ratios=[{**ratio, "sources": ratio_sources(name) if ratio["synthetic"] else []} for name, ratio in RATIOS.items()],
        seed=config["seed"],
        verdict=config["verdict"],
        primary=primary_endpoint(config),
        baseline=BASELINE,
        run_names=segmentation_runs("segmentation_{ratio}_seed{seed}")
        + classification_runs("classification_{ratio}_fold{fold}_seed{seed}") + list(generative_losses()),
        class_names=LABELS["classes"],
    script:
        "../../scripts/summarize.py"


rule rule_graph:
    """The workflow's rule graph as a PNG for the report (snakemake --rulegraph, drawn with networkx)."""
    output:
        dot="results/report/rulegraph.dot",
        png=report("results/report/rulegraph.png", caption="../report/rulegraph.rst", category="2. Workflow", labels={"figure": "rule graph"}),
    log:
        "logs/rule_graph.log",
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/rule_graph.py"


rule registry:
    """Upsert every model, set, image, dataset, run and metric the workflow made into the registry (the one writer)."""
    input:
        metrics="results/report/metrics.parquet",
        verdict="results/report/verdict.csv",
        models=[made.model for made in table.trained(config)],
        nuclei_model=[nuclei_model_path()] if nuclei_model_path() else [],
        sets=expand("results/synthetic/{mode}", mode=synthetic_sets()),
        curated=expand("results/curated/{mode}.parquet", mode=synthetic_sets()),
        datasets=expand("results/mixing/{ratio}.parquet", ratio=RATIOS),
        runs=[run["folder"] for run in task_runs()],
    output:
        counts="results/registry/registered.json",
        config="results/registry/config.yaml",
    log:
        "logs/registry.log",
    benchmark:
        "results/benchmarks/registry.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    params:
        url=config["registry"]["url"],
        generators=[made.name for made in table.trained(config)],  # the kinds of input.models
        sets=synthetic_sets(),  # the names of input.sets and input.curated
        ratios=list(RATIOS),  # of input.datasets
        runs=[{key: value for key, value in run.items() if key != "folder"} for run in task_runs()],  # of input.runs
    script:
        "../../scripts/registry.py"
