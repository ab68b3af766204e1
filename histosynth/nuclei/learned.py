"""A nuclei detector trained here (HD-YOLO's job, HoVer-Net's decoding idea): an smp U-Net
predicts, per pixel, nucleus foreground, instance boundary, the distance to the nucleus border
(normalised per nucleus to 0..1) and the nucleus class; a watershed by flooding of the distance
map from seeds (high distance, no boundary) decodes instances. Trained with the shared loop
(histosynth.training.loop.fit: checkpoints, bit-identical resume, loss CSV) and exported as
one TorchScript file (histosynth.nuclei.learned_export) following histosynth's own detector
contract (histosynth.nuclei.model), so `nuclei.model` and `histosynth nuclei --model` take it like
any other detector."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries
from torch import nn

from histosynth.nets import IMAGENET_MEAN, IMAGENET_STD, dihedral, unet
from histosynth.nuclei.instances import NUCLEUS_CLASSES, NucleiError
from histosynth.nuclei.learned_export import export_detector
from histosynth.seeds import derive_seed
from histosynth.training.loop import fit

log = logging.getLogger(__name__)

HEADS = ("foreground", "boundary", "distance")  # output channels before the class logits
CROP_POOL = 100_000  # seeded crops one training epoch draws from (more than any run uses)
LOSS_COLUMNS = ("foreground", "boundary", "distance", "class")


# ----------------------------------------------------------------------------- data


def training_targets(instances: np.ndarray, classes: Mapping[int, int] | None = None) -> np.ndarray:
    """Per-pixel targets of an instance mask, float32 (4, H, W): foreground, boundary (each
    nucleus' outer pixel ring, where touching nuclei meet), distance to the nucleus' border
    divided by its largest (0..1, 0 off nuclei) and the class index (classes: instance id ->
    index; 0 where absent, -1 off nuclei)."""
    instances = np.asarray(instances)
    foreground = instances > 0
    boundary = find_boundaries(instances, mode="inner") & foreground
    distance = ndi.distance_transform_edt(foreground & ~boundary) + foreground  # 1 on the ring, rising inwards
    peak = ndi.maximum(distance, instances, np.arange(int(instances.max()) + 1)) if instances.any() else np.zeros(1)
    distance = np.where(foreground, distance / np.maximum(np.asarray(peak)[instances], 1e-6), 0)
    lut = np.zeros(int(instances.max()) + 1, np.float32)
    for instance_id, index in (classes or {}).items():
        if instance_id < len(lut):
            lut[instance_id] = index
    class_map = np.where(foreground, lut[instances], -1)
    return np.stack([foreground, boundary, distance, class_map]).astype(np.float32)


class CropDataset(torch.utils.data.Dataset):
    """Random square crops of annotated images (each already at the model's mpp), one per item,
    the crop, its dihedral flip/rotation and a mild stain jitter all drawn from the item's index
    and the seed, so every draw is reproducible and a resumed run sees the same data. A crop may
    hang over an image edge by up to a quarter of its side, white and background there: inference
    pads images with white (histosynth.nuclei.model.detect_with_model), and a model that never saw
    such an edge finds nuclei along it."""

    def __init__(
        self,
        images: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        crop: int,
        length: int,
        seed: int,
        augment: bool = True,
    ):
        small = [i for i, image in enumerate(images) if min(image.shape[:2]) < crop]
        if small:
            raise NucleiError(
                f"training image(s) {small} are smaller than nuclei.train.crop={crop} px at the model's mpp"
            )
        self.images, self.targets, self.crop, self.length, self.seed, self.augment = (
            images,
            targets,
            crop,
            length,
            seed,
            augment,
        )
        areas = np.array([image.shape[0] * image.shape[1] for image in images], float)
        self.weights = areas / areas.sum()  # larger images are drawn more often

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng(derive_seed(self.seed, "nuclei-crop", i))
        k = int(rng.choice(len(self.images), p=self.weights))
        image, target = self.images[k], self.targets[k]
        image, target = self._crop(image, target, rng)
        if self.augment:
            op = int(rng.integers(8))
            image, target = dihedral(image[None], [op], (1, 2))[0], dihedral(target[None], [op], (2, 3))[0]
            # stain jitter: per-channel gain and offset, as between scanners and staining runs
            image = np.clip(image * rng.uniform(0.9, 1.1, 3) + rng.uniform(-0.05, 0.05, 3), 0, 1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(target)),
        }

    def _crop(self, image: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A crop (float RGB in [0, 1], targets) at a random position, up to crop // 4 beyond the edges."""
        margin, (h, w) = self.crop // 4, image.shape[:2]
        y = int(rng.integers(-margin, h - self.crop + margin + 1))
        x = int(rng.integers(-margin, w - self.crop + margin + 1))
        crop = np.ones((self.crop, self.crop, 3), np.float32)
        crop_target = np.zeros((target.shape[0], self.crop, self.crop), np.float32)
        crop_target[len(HEADS)] = -1  # the class channel: none, as off nuclei in training_targets
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + self.crop, h), min(x + self.crop, w)
        crop[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1] / 255
        crop_target[:, y0 - y : y1 - y, x0 - x : x1 - x] = target[:, y0:y1, x0:x1]
        return crop, crop_target


# ----------------------------------------------------------------------------- network


class NucleiNet(nn.Module):
    """smp U-Net with 3 + len(classes) output channels (HEADS, then class logits); input RGB in
    [0, 1], normalised inside."""

    def __init__(
        self,
        encoder: str = "resnet18",
        encoder_depth: int = 4,
        decoder_channels: Sequence[int] = (64, 32, 16, 16),
        classes: Sequence[str] = ("other",),
    ):
        super().__init__()
        if len(decoder_channels) != encoder_depth:
            raise NucleiError(
                f"nuclei.train.decoder_channels needs encoder_depth={encoder_depth} entries, got {list(decoder_channels)}"
            )
        self.classes = list(classes)
        self.unet = unet(encoder, encoder_depth, decoder_channels, len(HEADS) + len(classes))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet((x - self.mean) / self.std)


def training_loss(net: nn.Module, batch: dict, weights: Mapping) -> tuple[torch.Tensor, dict]:
    """Foreground BCE + soft Dice, boundary BCE, distance MSE on nuclei and class cross-entropy
    on nuclei, weighted by nuclei.train's *_weight keys."""
    out = net(batch["image"]).float()
    target = batch["target"]
    fg, boundary, distance, classes = target[:, 0], target[:, 1], target[:, 2], target[:, 3]
    fg_logit = out[:, 0]
    prob = torch.sigmoid(fg_logit)
    dice = 1 - (2 * (prob * fg).sum() + 1) / (prob.sum() + fg.sum() + 1)
    fg_loss = F.binary_cross_entropy_with_logits(fg_logit, fg) + dice
    boundary_loss = F.binary_cross_entropy_with_logits(out[:, 1], boundary)
    inside = fg > 0.5
    distance_loss = F.mse_loss(torch.sigmoid(out[:, 2])[inside], distance[inside]) if inside.any() else out.sum() * 0
    class_loss = (
        F.cross_entropy(out[:, 3:].permute(0, 2, 3, 1)[inside], classes[inside].long())
        if inside.any() and out.shape[1] > 4
        else out.sum() * 0
    )
    loss = (
        fg_loss
        + weights["boundary_weight"] * boundary_loss
        + weights["distance_weight"] * distance_loss
        + weights["class_weight"] * class_loss
    )
    parts = {"foreground": fg_loss, "boundary": boundary_loss, "distance": distance_loss, "class": class_loss}
    return loss, {name: part.detach().item() for name, part in parts.items()}


def slide_training_samples(index, slide_path: str | Path, truth: Mapping, mpp: float, source: str = "") -> list:
    """Training samples (rgb, instances, class names) of a slide's patches (a patch index), each
    window read at `mpp` with the ground-truth nuclei (a GeoJSON FeatureCollection in level-0
    coordinates, read from the file `source`) rasterised on the same grid; unclassified nuclei are
    `other`. A class name outside NUCLEUS_CLASSES is an error naming `source`."""
    from histosynth.data.slides import Slide
    from histosynth.nuclei.geojson import NucleusRasterizer

    rasterizer = NucleusRasterizer(truth)
    slide_mpp = float(index["slide_mpp"].iloc[0])
    samples = []
    with Slide(slide_path, mpp=slide_mpp) as slide:
        for row in index.itertuples(index=False):
            extent = row.size * row.mpp / slide_mpp
            side = max(1, round(row.size * row.mpp / mpp))
            rgb = slide.read(row.x, row.y, extent, extent, (side, side))
            instances, names = rasterizer.rasterize(row.x, row.y, extent, extent, (side, side))
            # a window shows the nuclei it overlaps: renumber them 1..N in the order of `names`
            present = np.unique(instances[instances > 0])
            lut = np.zeros(len(names) + 1, np.int64)
            lut[present] = np.arange(1, len(present) + 1)
            samples.append((rgb, lut[instances], [names[i - 1] for i in present]))
    try:
        class_names([names for _, _, names in samples])
    except NucleiError as error:
        raise NucleiError(f"{source or slide_path}: {error}") from None
    return samples


def train_detector(
    samples: Sequence[tuple[np.ndarray, np.ndarray, Sequence[str]]],
    out_dir: str | Path,
    settings: Mapping,
    *,
    seed: int,
    min_area_um2: float,
    meta: Mapping | None = None,
    checkpoint_dir: str | Path | None = None,
) -> Path:
    """Train a detector on (rgb, instances, class name per instance id 1..N) samples, each at
    settings["mpp"] (nuclei.train), and write out_dir/model.pt (the TorchScript detector) and
    out_dir/loss.csv, with checkpoints in checkpoint_dir (default out_dir/checkpoints), which a
    rerun resumes from; returns the model path."""
    if not samples:
        raise NucleiError("no annotated images to train the nuclei model on")
    s = dict(settings)
    classes = class_names([names for _, _, names in samples])
    index = {name: i for i, name in enumerate(classes)}
    images = [rgb for rgb, _, _ in samples]
    targets = [
        training_targets(inst, {k + 1: index[name] for k, name in enumerate(names)}) for _, inst, names in samples
    ]
    n_nuclei = sum(int(len(names)) for _, _, names in samples)
    log.info(
        "training the nuclei model on %d image(s) with %d nuclei at %.3g mpp; classes %s",
        len(samples),
        n_nuclei,
        s["mpp"],
        classes,
    )
    dataset = CropDataset(images, targets, s["crop"], CROP_POOL, seed, s["augment"])
    torch.manual_seed(derive_seed(seed, "nuclei", "init"))
    net = NucleiNet(s["encoder"], s["encoder_depth"], list(s["decoder_channels"]), classes)
    # fixed for this trainer: crops carry no image label to balance, and no weight average
    fit_settings = {**s, "class_balance": 0, "ema_decay": None, "ema_warmup": False}
    run_config = {"train": s, "classes": classes, "data": meta.get("data") if meta else None}
    result = fit(
        net,
        lambda model, batch: training_loss(model, batch, s),
        dataset,
        out_dir,
        settings=fit_settings,
        run_config=run_config,
        seed=seed,
        extra_columns=LOSS_COLUMNS,
        desc="nuclei",
        checkpoint_dir=checkpoint_dir,
    )
    return export_detector(
        result.model,
        Path(out_dir) / "model.pt",
        mpp=s["mpp"],
        seed_level=s["seed_level"],
        min_area_um2=min_area_um2,
        meta={"seed": seed, "steps": result.step, "nuclei": n_nuclei, **(meta or {})},
    )


def class_names(tables: Sequence[Sequence[str]]) -> list[str]:
    """The nucleus classes present in the training annotations, in NUCLEUS_CLASSES order (at
    least `other`); unknown names are an error listing them."""
    present = {name for names in tables for name in names}
    unknown = sorted(present - set(NUCLEUS_CLASSES))
    if unknown:
        raise NucleiError(
            f"nucleus classes {unknown} are not among {list(NUCLEUS_CLASSES)}; rename them in the annotations"
        )
    return [c for c in NUCLEUS_CLASSES if c in present] or ["other"]


def train_on_folder(
    images_dir: str | Path,
    annotations_dir: str | Path,
    mpp: float,
    out_dir: str | Path,
    params: Mapping,
    *,
    seed: int,
    holdout: Sequence[str] = (),
) -> pd.DataFrame:
    """`histosynth nuclei-train`: train on a folder of images at `mpp` with instance annotations
    (any format histosynth.nuclei.annotations reads; every nucleus class `other`), leaving the `holdout` stems out, then
    score the exported model on the training and held-out images (out_dir/scores.csv: split,
    image and histosynth.nuclei.metrics' scores per image). Returns that table."""
    from histosynth.data.io import write_csv
    from histosynth.nuclei.annotations import read_annotated_folder
    from histosynth.nuclei.metrics import score_instances
    from histosynth.nuclei.model import load_detector
    from histosynth.nuclei.stage import rescale, resize_instances, segment_patch

    data = read_annotated_folder(images_dir, annotations_dir)
    unknown = sorted(set(holdout) - {stem for stem, _, _ in data})
    if unknown:
        raise NucleiError(f"--holdout names {unknown}, which are not images in {images_dir}")
    train = [(stem, rgb, inst) for stem, rgb, inst in data if stem not in holdout]
    if not train:
        raise NucleiError("every image is held out; keep at least one for training")
    s = params["train"]
    samples = []
    for _, rgb, inst in train:
        image = rescale(rgb, mpp, s["mpp"])
        samples.append((image, resize_instances(inst, image.shape[:2]), ["other"] * int(inst.max())))
    meta = {
        "data": {
            "images": str(images_dir),
            "annotations": str(annotations_dir),
            "mpp": mpp,
            "train": [stem for stem, _, _ in train],
            "holdout": list(holdout),
        }
    }
    path = train_detector(samples, out_dir, s, seed=seed, min_area_um2=params["min_area_um2"], meta=meta)
    model = load_detector(path)
    rows = []
    for stem, rgb, truth in data:
        pred, _ = segment_patch(rgb, mpp, truth.shape, params, model)
        scores = score_instances([(truth, pred)])
        rows.append(
            {
                "split": "holdout" if stem in holdout else "train",
                "image": stem,
                **{k: v for k, v in scores.items() if k != "images"},
            }
        )
    table = pd.DataFrame(rows)
    write_csv(table, Path(out_dir) / "scores.csv")
    return table
