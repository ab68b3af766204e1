# Config validation, the slide sheet and the input functions the rules share.
import json
import re
import sys

sys.path.insert(0, workflow.basedir)  # the histosynth package, also when it is not pip-installed

from histosynth import params as rule_params
from histosynth.config import ConfigError, baseline_ratio, config_path, read_slide_sheet, validated
from histosynth.data.annotations import AnnotationError, check_sheet_files
from histosynth.data.labels import LabelError, resolve_labels
from histosynth.generators import table
from histosynth.generators.base_model import LoraError, check_base_model, require_extra
from histosynth.seeds import derive_seed


try:
    config.update(validated(config, " + ".join(map(str, workflow.configfiles)) or "config"))
    SLIDES = read_slide_sheet(config_path(config["slides"], ".", workflow.basedir))
    check_sheet_files(SLIDES, config["slides"], config["annotations"]["mask_values"])  # wrong kinds fail before any job
    LABELS = resolve_labels(config, list(SLIDES["label"]), config["slides"])  # every job numbers the classes alike
except (ConfigError, LabelError, AnnotationError) as err:
    raise WorkflowError(str(err)) from None
if config["lora"]["enabled"]:  # a missing base model fails now, not hours later in train_lora
    try:
        require_extra()
        check_base_model(config_path(config["lora"]["base_model"], ".", workflow.basedir))
    except LoraError as err:
        raise WorkflowError(str(err)) from None

if config["diffusion"]["num_classes"] not in (0, len(LABELS["classes"])):
    raise WorkflowError(f"diffusion.num_classes is {config['diffusion']['num_classes']} but the labels "
                        f"({LABELS['source']}) are {len(LABELS['classes'])}: {LABELS['classes']}; set diffusion.num_classes: "
                        f"{len(LABELS['classes'])} (or 0 for no class embedding)")

for _split in ("train", "val", "test"):
    if not (SLIDES["split"] == _split).any():
        raise WorkflowError(f"{config['slides']}: no slide has split '{_split}'; every run needs train, val and test "
                            "slides (val: early stopping, and the held-out real patches curation calibrates copies on).")

DEMO_DIR = "results/demo"


def slide_row(wildcards):
    return SLIDES.loc[wildcards.slide]


def slide_image(wildcards):
    return slide_row(wildcards)["image"]


def slide_annotations(wildcards):
    """The slide's GeoJSON, or nothing when the sheet leaves it empty."""
    path = slide_row(wildcards)["annotations"]
    return [path] if path else []


def slide_mpp(wildcards):
    mpp = slide_row(wildcards)["mpp"]
    return float(mpp) if mpp else None


TRAINED_NUCLEI_MODEL = "results/nuclei_model/model.pt"


def nuclei_model_path():
    """The learned nuclei detector's file (`trained`: the one rule train_nuclei makes), or None."""
    model = config["nuclei"]["model"]
    return TRAINED_NUCLEI_MODEL if model == "trained" else model


def nuclei_inputs(wildcards):
    """The patch index, the slide, and the learned detector when one is configured."""
    inputs = {"index": f"results/patches/{wildcards.slide}.parquet", "image": slide_image(wildcards)}
    if nuclei_model_path():
        inputs["model"] = nuclei_model_path()
    return inputs


def nuclei_truth(slide):
    """The slide's hand-drawn nuclei (sheet column nuclei, any format histosynth.nuclei.annotations reads), or a demo slide's own; None if neither."""
    if SLIDES.loc[slide, "nuclei"]:
        return SLIDES.loc[slide, "nuclei"]
    return f"{DEMO_DIR}/{slide}.nuclei.geojson" if slide in demo_slides() else None


def nuclei_truth_slides(splits=("train", "val", "test")):
    """Slides of those splits with nuclei ground truth."""
    return [s for s in SLIDES.index if SLIDES.loc[s, "split"] in splits and nuclei_truth(s)]


def nuclei_training_inputs(wildcards):
    """Rule train_nuclei's data: each train-split slide with nuclei ground truth, its patch index and its nuclei."""
    slides = nuclei_truth_slides(("train",))
    if not slides:
        raise WorkflowError("nuclei.model is 'trained' but no train-split slide has nuclei ground truth; fill the "
                            "sheet's nuclei column (GeoJSON detections, MoNuSeg/Aperio or ASAP XML, or an instance mask) for some train slides")
    return {"index": [f"results/patches/{s}.parquet" for s in slides],
            "images": [SLIDES.loc[s, "image"] for s in slides],
            "truth": [nuclei_truth(s) for s in slides]}


def training_slides():
    """Slides whose patches may train models: the train and val splits, never test."""
    return list(SLIDES.index[SLIDES["split"].isin(["train", "val"])])


def config_params(*keys):
    """The config sections a job reads, as its params (histosynth.params.config_params)."""
    return rule_params.config_params(config, LABELS, *keys, nuclei_model=nuclei_model_path())


def synthesis_config(mode, *keys):
    """What one synthetic set's job reads (histosynth.params.synthesis_params)."""
    return rule_params.synthesis_params(config, LABELS, mode, *keys)


def training_config(stage):
    """What a generator's training reads (histosynth.params.training_params)."""
    return rule_params.training_params(config, LABELS, stage)


def task_config(task):
    """What a segmentation or classification job reads (histosynth.params.task_params)."""
    return rule_params.task_params(config, LABELS, task)


def checkpoint_folder(stage):
    """Where a training's checkpoints live, outside its outputs so a rerun can resume: one folder
    per resume key (histosynth.params.checkpoint_key), so a changed model starts fresh and an
    unchanged one resumes."""
    return f"results/checkpoints/{stage}/{rule_params.checkpoint_key(config, LABELS, stage)}"


def uses_autoencoder():
    """Whether the diffusion model works in latent space: only then is the autoencoder trained."""
    return table.enabled(config, "autoencoder")


def generative_losses():
    """{training name: loss CSV} of the generative models this config trains, for the report."""
    return {made.name: made.losses for made in table.trained(config)}


def diffusion_inputs(wildcards):
    """Conditioning indexes (and maps) of the training slides; the autoencoder in latent space."""
    inputs = {
        "indexes": expand("results/conditioning/{slide}.parquet", slide=training_slides()),
        "maps": expand("results/conditioning/{slide}", slide=training_slides()),
    }
    if uses_autoencoder():
        inputs["autoencoder"] = "results/autoencoder/model"
    return inputs


def synthesis_inputs(wildcards):
    """The diffusion model, the training slides' conditioning indexes (and maps), and the
    autoencoder in latent space; synthesis draws from the train split only."""
    inputs = diffusion_inputs(wildcards)
    inputs["model"] = "results/diffusion/model"
    return inputs


def split_slides(split):
    return list(SLIDES.index[SLIDES["split"] == split])


def patch_indexes(split):
    return expand("results/patches/{slide}.parquet", slide=split_slides(split))


RATIOS = {ratio["name"]: ratio for ratio in config["mixing"]["ratios"]}
BASELINE = baseline_ratio(config["mixing"]["ratios"], config["report"]["baseline"])
SEGMENTATION_SEEDS = config["segmentation"]["seeds"]


def synthetic_sets():
    """The synthetic sets this config makes (histosynth.generators.table.synthetic_sets)."""
    return table.synthetic_sets(config)


def ratio_sources(ratio):
    """The synthetic sets a ratio draws from: its own `sources`, else mixing.sources (pooled)."""
    return RATIOS[ratio].get("sources") or config["mixing"]["sources"]


def mixing_inputs(wildcards):
    """The train slides' patch indexes, and the curated synthetic sets only when the ratio draws from them."""
    inputs = {"indexes": patch_indexes("train")}
    if RATIOS[wildcards.ratio]["synthetic"] > 0:
        inputs["curated"] = expand("results/curated/{mode}.parquet", mode=ratio_sources(wildcards.ratio))
    return inputs


def gan_training_inputs(wildcards):
    """The training slides' patches (the GAN's FD/KD during training needs no downstream model:
    histosynth.generators.monitor)."""
    return {"indexes": expand("results/patches/{slide}.parquet", slide=training_slides()),
            "patches": expand("results/patches/{slide}", slide=training_slides())}


def curation_inputs(wildcards):
    """One synthetic set, its per-image consistency scores, the train and val patches it is
    checked against, and the baseline's first model when it is the feature space."""
    inputs = {"synthetic": f"results/synthetic/{wildcards.set}", "scores": f"results/quality/{wildcards.set}.scores.parquet",
              "indexes": patch_indexes("train") + patch_indexes("val"),
              "patches": expand("results/patches/{slide}", slide=training_slides())}
    if config["quality"]["extractor"] == "segmentation":
        inputs["segmentation"] = f"results/segmentation/{BASELINE}/seed{SEGMENTATION_SEEDS[0]}"
    if config["curation"]["max_synthetic_probability"] is not None:  # read only when it rejects: realism settings rerun no task model
        inputs["realism"] = f"results/quality/{wildcards.set}.realism_images.parquet"
    if config["curation"]["descriptor_weights"]:  # a replaced weights file reruns curation
        inputs["descriptor_weights"] = config["curation"]["descriptor_weights"]
    return inputs


if config["curation"]["max_synthetic_probability"] is not None and not config["realism"]["enabled"]:
    raise WorkflowError("curation.max_synthetic_probability rejects on each image's p_synthetic from rule realism, "
                        "but realism.enabled is false; enable realism or set curation.max_synthetic_probability: null")


SEGMENTATION = config["segmentation"]["enabled"]
CLASSIFICATION = config["classification"]["enabled"]
if not (SEGMENTATION or CLASSIFICATION):
    raise WorkflowError("segmentation.enabled and classification.enabled are both false: no task would measure the "
                        "synthetic data; enable at least one")
if not SEGMENTATION and (config["quality"]["consistency"] or config["quality"]["extractor"] == "segmentation"):
    raise WorkflowError("segmentation.enabled is false, but quality.consistency and quality.extractor: segmentation use "
                        "the baseline's segmentation model; set quality.consistency: false and quality.extractor to a "
                        "timm model with local weights (quality.extractor_weights), or enable segmentation")


def segmentation_ratios():
    """The ratios the segmentation task trains on (none when it is off): those whose synthetic images
    all have masks (the GAN set has none: its ratios feed classification only)."""
    if not SEGMENTATION:
        return []
    return [name for name in RATIOS if RATIOS[name]["synthetic"] == 0 or all(map(table.has_masks, ratio_sources(name)))]


def segmentation_runs(pattern):
    """One path per ratio x seed of the segmentation task."""
    return expand(pattern, ratio=segmentation_ratios(), seed=SEGMENTATION_SEEDS)


def classification_runs(pattern):
    """One path per ratio x fold x seed of the classification task (none when it is off)."""
    if not CLASSIFICATION:
        return []
    return expand(pattern, ratio=RATIOS, fold=range(config["classification"]["folds"]),
                  seed=config["classification"]["seeds"])


def task_runs():
    """Each task run of this config, as rule registry records it (task, ratio, fold, seed) with the run
    folder its training rule writes."""
    runs = [{"task": "segmentation", "ratio": ratio, "fold": None, "seed": seed, "folder": f"results/segmentation/{ratio}/seed{seed}"}
            for ratio in segmentation_ratios() for seed in SEGMENTATION_SEEDS]
    if CLASSIFICATION:
        runs += [{"task": "classification", "ratio": ratio, "fold": fold, "seed": seed,
                  "folder": f"results/classification/{ratio}/fold{fold}/seed{seed}"}
                 for ratio in RATIOS for fold in range(config["classification"]["folds"]) for seed in config["classification"]["seeds"]]
    return runs


def quality_inputs(wildcards):
    """Real training patches, one synthetic set, and the baseline's first model when it is the
    offline feature space (quality.extractor 'segmentation')."""
    inputs = {"indexes": patch_indexes("train"), "synthetic": f"results/synthetic/{wildcards.set}"}
    if config["quality"]["extractor"] == "segmentation":
        inputs["segmentation"] = f"results/segmentation/{BASELINE}/seed{SEGMENTATION_SEEDS[0]}"
    return inputs


def consistency_inputs(wildcards):
    """Real training patches (the reference: their own masks re-segmented), one synthetic set, and
    while quality.consistency measures, the baseline's first model and the learned nuclei detector."""
    inputs = {"indexes": patch_indexes("train"), "synthetic": f"results/synthetic/{wildcards.set}"}
    if config["quality"]["consistency"]:
        inputs["segmentation"] = f"results/segmentation/{BASELINE}/seed{SEGMENTATION_SEEDS[0]}"
        if nuclei_model_path():
            inputs["nuclei_model"] = nuclei_model_path()
    return inputs


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


def demo_slides():
    """Slides rendered by rule demo_slides (their sheet row points at results/demo/<slide>.tiff)."""
    return [name for name in SLIDES.index if SLIDES.loc[name, "image"] == f"{DEMO_DIR}/{name}.tiff"]


def all_outputs():
    """The final targets of the workflow: one entry per stage that exists."""
    return [
        *expand("results/conditioning/{slide}.parquet", slide=SLIDES.index),
        *expand("results/nuclei/{slide}.geojson", slide=SLIDES.index),
        *expand("results/nuclei/{slide}.quality.csv", slide=nuclei_truth_slides()),
        *(["results/autoencoder/metrics.json"] if uses_autoencoder() else []),
        "results/diffusion/model",
        *expand("results/synthetic/{mode}", mode=synthetic_sets()),
        "results/report/metrics.csv",
        *(["results/registry/registered.json"] if config["registry"]["enabled"] else []),
        *export_targets(),  # rule export_dataset (workflow/rules/export.smk)
        "results/report/rulegraph.png",
    ]
