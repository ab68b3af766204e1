"""Rule fetch_weights: download the pretrained weights the metrics and the segmentation encoder use
into the torch hub / Hugging Face caches, where later jobs find them offline. Needs network."""

from histosynth.logs import log_to
from histosynth.evaluation.quality import fetch_weights
from histosynth.evaluation.segmentation import fetch_encoder_weights, settings_from

log = log_to(snakemake.log[0])
for path in fetch_weights(progress=False):
    log.info("present: %s", path)
settings = settings_from(snakemake.params.config["segmentation"])
if settings["encoder_weights"] == "imagenet":
    path = fetch_encoder_weights(settings)
    log.info("encoder %s: %s", settings["encoder"], path or "smp has no ImageNet file for it; random init")
