"""Rule fetch_weights (a localrule, the only one needing network): download the pretrained weights
the metrics, the segmentation encoder and the classifier use into weights_dir (histosynth.weights),
where later jobs find them offline."""

from histosynth.logs import log_to
from histosynth.weights import WEIGHTS, classifier_spec, encoder_spec, fetch

log = log_to(snakemake.log[0])
config = snakemake.params.config
specs = list(WEIGHTS.values())
segmentation = config["segmentation"]
if segmentation["encoder_weights"] == "imagenet" and not segmentation["encoder_weights_path"]:
    spec = encoder_spec(segmentation["encoder"])
    if spec is None:
        log.info(
            "encoder %s: smp has no ImageNet file for it; its training starts from random weights",
            segmentation["encoder"],
        )
    else:
        specs.append(spec)
classification = config.get("classification")  # in params when the rule passes the section
if classification and classification["enabled"] and classification["pretrained"] and not classification["weights_path"]:
    spec = classifier_spec(classification["model"])
    if spec is None:
        log.info(
            "classifier %s: timm has no ImageNet file for it on the Hugging Face Hub; its training starts from "
            "random weights",
            classification["model"],
        )
    else:
        specs.append(spec)
for spec in specs:
    log.info("present: %s (%s)", fetch(spec, config["weights_dir"], progress=False), spec.use)
