# Config validation, the slide sheet and the input functions the rules share.
import re
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)  # the histosynth package, also when it is not pip-installed

from histosynth.config import ConfigError, read_slide_sheet, validated
from histosynth.device import derive_seed


def _resolve(path):
    """A config path relative to the working directory, else relative to the workflow."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    return str(Path(workflow.basedir) / candidate)


try:
    config.update(validated(config, " + ".join(map(str, workflow.configfiles)) or "config"))
    SLIDES = read_slide_sheet(_resolve(config["slides"]))
except ConfigError as err:
    raise WorkflowError(str(err)) from None

for _split in ("train", "test"):
    if not (SLIDES["split"] == _split).any():
        raise WorkflowError(f"{config['slides']}: no slide has split '{_split}'; every run needs train and test slides.")

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


def nuclei_inputs(wildcards):
    """The patch index, the slide, and the learned detector when one is configured."""
    inputs = {"index": f"results/patches/{wildcards.slide}.parquet", "image": slide_image(wildcards)}
    if config["nuclei"]["model"]:
        inputs["model"] = config["nuclei"]["model"]
    return inputs


def demo_slides():
    """Slides rendered by rule demo_slides (their sheet row points at results/demo/<slide>.tiff)."""
    return [name for name in SLIDES.index if SLIDES.loc[name, "image"] == f"{DEMO_DIR}/{name}.tiff"]


def all_outputs():
    """The final targets of the workflow: one entry per stage that exists."""
    return [
        *expand("results/conditioning/{slide}.parquet", slide=SLIDES.index),
        *expand("results/nuclei/{slide}.geojson", slide=SLIDES.index),
        *expand("results/nuclei/{slide}.quality.csv", slide=demo_slides()),
    ]
