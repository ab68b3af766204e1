"""What each rule's job reads from the config, as its Snakemake params (torch-free: the DAG parse
builds them). Snakemake reruns a job when the text of its params changes, so a job's params hold
exactly the keys its code reads, with keys sorted at every level (a reordered file reruns
nothing), and nothing else: a setting that only the report reads reruns the report, not curation,
mixing and every task model.

`config` is the validated workflow config, `labels` the resolved labels (histosynth.data.labels:
every job numbers the classes alike), `nuclei_model` the learned nuclei detector's file or None.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from histosynth.generators.table import FAMILIES, family, generator
from histosynth.nuclei.stage import detector_settings
from histosynth.training.resume import resume_key

# The quality keys each reader takes (histosynth.evaluation.features.configured_extractor: the
# offline feature space; histosynth.generators.monitor: the GAN's fidelity during training).
EXTRACTOR_KEYS = ("extractor", "extractor_weights", "device")
CURATION_QUALITY_KEYS = (*EXTRACTOR_KEYS, "batch_size")
CONSISTENCY_QUALITY_KEYS = ("consistency", "max_images", "seed", "device")
MONITOR_QUALITY_KEYS = (
    *EXTRACTOR_KEYS,
    "inception_weights",
    "feature",
    "batch_size",
    "kid_subsets",
    "kid_subset_size",
    "seed",
)
# Subsections of `synthesis`, one per set family; the other keys are shared by every sampler.
_SAMPLERS = tuple(kind.settings for kind in FAMILIES)


def _sorted(value):
    """`value` as JSON gives it back, keys sorted at every level."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _only(section: Mapping, keys) -> dict:
    return {key: section[key] for key in keys}


def config_params(config: Mapping, labels: Mapping, *keys: str, nuclei_model: str | None = None) -> dict:
    """The named top-level config keys, sorted. `labels` is the resolved one; `nuclei` holds only
    the configured detector's settings (detector_settings: a changed classical setting reruns
    nothing while a model detects) and names the model's file; `patches` leaves out its workers
    (how many cores cut them is the rule's threads, not what the patches hold)."""
    sections = {key: labels if key == "labels" else config[key] for key in keys}
    if "nuclei" in sections:
        sections["nuclei"] = detector_settings(sections["nuclei"]) | {"model": nuclei_model}
    sections = _sorted(sections)
    if "patches" in sections:
        del sections["patches"]["workers"]
    return sections


def synthesis_params(config: Mapping, labels: Mapping, set_name: str, *keys: str) -> dict:
    """What one synthetic set's job reads: the shared synthesis settings and its own family's
    subsection, not the other samplers' (enabling the GAN reruns no diffusion sampling), plus `keys`."""
    params = config_params(config, labels, "synthesis", *keys)
    own = family(set_name).settings
    for other in set(_SAMPLERS) - {own}:
        del params["synthesis"][other]
    return params


def task_params(config: Mapping, labels: Mapping, task: str) -> dict:
    """What a segmentation or classification job reads: its section without the seed list, which
    only names the runs (adding a seed reruns no other), plus its data keys and the weights folder."""
    data = ("classes",) if task == "segmentation" else ("labels",)
    params = config_params(config, labels, task, *data, "seed", "weights_dir")
    del params[task]["seeds"]
    return params


def training_params(config: Mapping, labels: Mapping, stage: str) -> dict:
    """What a generator's training reads (histosynth.generators.table: its section and data keys);
    a monitoring one (the GAN) also its fidelity monitor's quality keys and weights folder while
    <stage>.train.eval_every measures; a previewing one (LoRA) the sampling settings of its grids."""
    made = generator(stage)
    params = config_params(config, labels, stage, *made.reads)
    if made.monitors and config[stage]["train"]["eval_every"]:
        params |= _sorted(
            {"quality": _only(config["quality"], MONITOR_QUALITY_KEYS), "weights_dir": config["weights_dir"]}
        )
    if made.previews:
        params["synthesis"] = synthesis_params(config, labels, made.previews)["synthesis"]
    return params


def checkpoint_key(config: Mapping, labels: Mapping, stage: str) -> str:
    """The resume key of a training (histosynth.training.resume.resume_key): its section and the
    data keys it trains on, nothing that only monitors or previews it, so an unchanged model resumes."""
    params = config_params(config, labels, stage, *generator(stage).reads)
    return resume_key(params[stage], *(params[key] for key in generator(stage).reads))


def curation_params(config: Mapping, labels: Mapping) -> dict:
    """What curation reads: its section, the quality keys of the feature space it searches for
    copies in (CURATION_QUALITY_KEYS), the region classes and labels."""
    params = config_params(config, labels, "curation", "classes", "labels")
    return params | _sorted({"quality": _only(config["quality"], CURATION_QUALITY_KEYS)})


def consistency_params(config: Mapping, labels: Mapping, nuclei_model: str | None) -> dict:
    """What the per-image mask consistency (rule mask_consistency, which curation reads) reads: the
    consistency keys of `quality`, the region classes, the nuclei detector and the patches' mpp."""
    params = config_params(config, labels, "classes", "labels", "nuclei", nuclei_model=nuclei_model)
    return params | _sorted(
        {"quality": _only(config["quality"], CONSISTENCY_QUALITY_KEYS), "patches": {"mpp": config["patches"]["mpp"]}}
    )


def quality_params(config: Mapping, labels: Mapping) -> dict:
    """What the report's distribution scores (rule image_quality) read: `quality` but its
    consistency switch (rule mask_consistency's), the labels and the weights folder."""
    params = config_params(config, labels, "quality", "classes", "labels", "weights_dir")
    del params["quality"]["consistency"]
    return params
