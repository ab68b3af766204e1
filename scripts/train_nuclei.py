"""Rule train_nuclei: the nuclei model of nuclei.model: trained, from the train-split slides' nuclei ground truth."""

from pathlib import Path

from histosynth.data.io import read_patch_index
from histosynth.logs import log_to
from histosynth.nuclei.annotations import read_nuclei
from histosynth.nuclei.learned import slide_training_samples, train_detector

log = log_to(snakemake.log[0])
train = snakemake.params.train
samples = []
for index, image, truth in zip(snakemake.input.index, snakemake.input.images, snakemake.input.truth, strict=True):
    nuclei = read_nuclei(
        truth, aperio_class=snakemake.params.aperio_class, mask_downsample=snakemake.params.mask_downsample, slide=image
    )
    patches = slide_training_samples(read_patch_index(index), image, nuclei, train["mpp"], source=truth)
    log.info("%s: %d patches with the nuclei of %s", Path(index).stem, len(patches), truth)
    samples += patches
out = Path(snakemake.output.model).parent
train_detector(
    samples,
    out,
    train,
    seed=snakemake.params.seed,
    min_area_um2=snakemake.params.min_area_um2,
    checkpoint_dir=Path("results/checkpoints/nuclei"),
    meta={"data": {"slides": [Path(p).stem for p in snakemake.input.index], "patches": len(samples)}},
)
