# histosynth: synthetic augmentation of histopathology datasets, end to end.
# Run: snakemake --cores 8 --resources gpu=1   (see README.md; config/README.md documents every key)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    slide="|".join(map(re.escape, SLIDES.index)),
    ratio="|".join(map(re.escape, RATIOS)),
    seed=r"\d+",
    fold=r"\d+",
    set=r"[A-Za-z0-9_-]+",


include: "workflow/rules/slides.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/nuclei.smk"
include: "workflow/rules/autoencoder.smk"
include: "workflow/rules/diffusion.smk"
include: "workflow/rules/synthesis.smk"
include: "workflow/rules/gan.smk"
include: "workflow/rules/lora.smk"
include: "workflow/rules/mixing.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/segmentation.smk"
include: "workflow/rules/classification.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
