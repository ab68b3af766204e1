"""Rule train_nuclei: the nuclei model of nuclei.model: trained, from the train-split slides' nuclei ground truth."""

import json
from pathlib import Path

from histosynth.data.io import read_patch_index
from histosynth.logs import log_to
from histosynth.nuclei.learned import slide_training_samples, train_detector

log = log_to(snakemake.log[0])
train = snakemake.params.train
samples = []
for index, image, truth in zip(snakemake.input.index, snakemake.input.images, snakemake.input.truth, strict=True):
    patches = slide_training_samples(read_patch_index(index), image, json.loads(Path(truth).read_text()),
                                     train["mpp"])
    log.info("%s: %d patches with the nuclei of %s", Path(index).stem, len(patches), truth)
    samples += patches
out = Path(snakemake.output.model).parent
train_detector(samples, out, train, seed=snakemake.params.seed, min_area_um2=snakemake.params.min_area_um2,
               checkpoint_dir=Path("results/checkpoints/nuclei"),
               meta={"data": {"slides": [Path(p).stem for p in snakemake.input.index], "patches": len(samples)}})
