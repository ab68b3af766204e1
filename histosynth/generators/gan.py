"""Stage train_gan: the class-conditional GAN of seeds 000 and 001 (Berezsky et al.): cell-based
generator and discriminator with self-attention, hinge loss, spectral norm, TTUR, trained on the
shared loop (histosynth.training.loop.fit) with one optimiser each.

    python -m histosynth.generators.gan train --config CONFIG --out DIR --dataset MODULE:FUNC --index ...

Outputs in DIR: model/ (save_pretrained of the EMA generator with the trained discriminator, plus
histosynth.json with num_classes, size, z_dim, labels and the training config), loss.csv (d_loss,
g_loss, d_real, d_fake; fd/kd and fid/kid every gan.train.eval_every steps, histosynth.generators.monitor),
samples/step-<n>.png (one row per class, fixed noise).

The networks (seed 000's Tables 1-4) are in histosynth.generators.gan_networks.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from histosynth.config import section_defaults
from histosynth.device import autocast
from histosynth.files import MODEL_INFO, atomic_dir
from histosynth.generators.gan_networks import GAN, build_gan, parameter_count
from histosynth.generators.launch import cli
from histosynth.generators.monitor import COLUMNS as MONITOR_COLUMNS
from histosynth.generators.monitor import FeatureSpace, FidelityMonitor
from histosynth.seeds import derive_seed, seed_everything
from histosynth.training.batches import batch_draw, check_dataset, dataset_labels, random_dihedral
from histosynth.training.checkpoints import load_weights
from histosynth.training.errors import TrainingError
from histosynth.training.grids import save_grid, to_uint8
from histosynth.training.loop import Update, fit, make_accelerator

log = logging.getLogger("histosynth.generators.gan")  # not __main__ under python -m
DIFFAUGMENT = ("colour", "translation", "cutout")


# ----------------------------------------------------------------------------- losses and augmentation


def hinge_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def hinge_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """The generator's hinge loss: -mean(D(G(z)))."""
    return -d_fake.mean()


def _colour(x: torch.Tensor) -> torch.Tensor:
    n = len(x)

    def rand(m):
        return torch.rand(m, 1, 1, 1, device=x.device, dtype=x.dtype)

    x = x + (batch_draw(rand, n) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (batch_draw(rand, n) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (batch_draw(rand, n) + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    dy, dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = batch_draw(lambda m: torch.randint(-dy, dy + 1, (m, 1, 1), device=x.device), n)
    tx = batch_draw(lambda m: torch.randint(-dx, dx + 1, (m, 1, 1), device=x.device), n)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy, gx = (gy + ty + 1).clamp(0, h + 1), (gx + tx + 1).clamp(0, w + 1)  # into the 1-pixel zero padding
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[torch.arange(n, device=x.device).view(n, 1, 1), gy, gx].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = batch_draw(lambda m: torch.randint(0, h + (1 - ch % 2), (m, 1, 1), device=x.device), n)
    ox = batch_draw(lambda m: torch.randint(0, w + (1 - cw % 2), (m, 1, 1), device=x.device), n)
    gy, gx = torch.meshgrid(torch.arange(ch, device=x.device), torch.arange(cw, device=x.device), indexing="ij")
    gy, gx = (gy + oy - ch // 2).clamp(0, h - 1), (gx + ox - cw // 2).clamp(0, w - 1)
    mask = torch.ones(n, h, w, device=x.device, dtype=x.dtype)
    mask[torch.arange(n, device=x.device).view(n, 1, 1), gy, gx] = 0
    return x * mask.unsqueeze(1)


_AUGMENTS = {"colour": _colour, "translation": _translation, "cutout": _cutout}


def diffaugment_policy(setting) -> tuple[str, ...]:
    """train.diffaugment as a tuple of transforms: true = all (colour, translation, cutout), false
    or [] = none, or a list of them (applied in DIFFAUGMENT's order)."""
    if setting is True:
        return DIFFAUGMENT
    if not setting:
        return ()
    unknown = sorted(set(setting) - set(DIFFAUGMENT))
    if unknown:
        raise TrainingError(f"gan.train.diffaugment: unknown transforms {unknown}; use any of {list(DIFFAUGMENT)}")
    return tuple(t for t in DIFFAUGMENT if t in setting)


def diff_augment(images: torch.Tensor, policy: Sequence[str]) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020): random colour (brightness, saturation, contrast), translation
    by up to 1/8 of the size (zero fill) and cutout of a half-size square, each drawn per image
    from the global RNG (training.batch_draw); differentiable, so D sees augmented reals and fakes alike and G's
    gradient passes through the same transforms."""
    for name in policy:
        images = _AUGMENTS[name](images)
    return images


# ----------------------------------------------------------------------------- sampling


def noise(z_dim: int, seed: int, truncation: float | None = None) -> torch.Tensor:
    """The latent of one image: N(0, I) from its own seed; with `truncation` t, entries with
    |z| > t are redrawn until none is (the truncation trick)."""
    if truncation is not None and truncation <= 0:
        raise TrainingError(f"truncation must be > 0 (or None for none), got {truncation}")
    generator = torch.Generator().manual_seed(int(seed))
    z = torch.randn(z_dim, generator=generator)
    while truncation is not None and bool((outside := z.abs() > truncation).any()):
        z[outside] = torch.randn(int(outside.sum()), generator=generator)
    return z


@torch.no_grad()
def generate(
    model, labels: torch.Tensor, seeds: Sequence[int], truncation: float | None = None, batch_size: int = 64
) -> np.ndarray:
    """Images (N, size, size, 3) uint8 of class labels[i] from noise(seeds[i], truncation), by the
    generator in eval mode (BatchNorm with its running statistics, so that image i depends on its
    seed and label alone, not on the rest of the batch). model: a GAN or its Generator."""
    generator = getattr(model, "generator", model)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != len(seeds):
        raise TrainingError(f"generate: {len(labels)} labels for {len(seeds)} seeds")
    device = next(generator.parameters()).device
    z = (
        torch.stack([noise(generator.z_dim, s, truncation) for s in seeds])
        if len(seeds)
        else torch.zeros(0, generator.z_dim)
    )
    was_training = generator.training
    generator.eval()
    images = []
    for start in range(0, len(z), batch_size):
        with autocast(device):
            batch = generator(z[start : start + batch_size].to(device), labels[start : start + batch_size].to(device))
        images.append(to_uint8(batch.float()))
    generator.train(was_training)
    return np.concatenate(images) if images else np.zeros((0, generator.size, generator.size, 3), np.uint8)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, h, w, 3) images resized to size x size (Lanczos), as the synthetic set stores a GAN
    drawing another size than the patches; unchanged when they already are."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack(
        [np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS)) for image in images]
    )


def load_gan(folder: str | Path, device=None) -> GAN:
    """The GAN saved by `train` in `folder` (model/), in eval mode; model.config has num_classes,
    size, z_dim and labels (also in histosynth.json)."""
    folder = Path(folder)
    if not (folder / MODEL_INFO).is_file() or not (folder / "config.json").is_file():
        raise TrainingError(
            f"{folder} is not a histosynth GAN (no {MODEL_INFO} or config.json); train it first (rule train_gan)"
        )
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if name != GAN.__name__:
        raise TrainingError(f"{folder} holds a {name}, not a {GAN.__name__}")
    # Built from its config, then the weights copied in (rather than from_pretrained, which keeps the
    # file's unaligned tensors): outputs then equal the saved model's bit for bit. The random
    # initialisation leaves the caller's RNG as it was.
    with torch.random.fork_rng(devices=[]):
        model = GAN.from_config(GAN.load_config(folder))
    load_weights(model, folder)
    model = model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


# ----------------------------------------------------------------------------- training


def _monitor(dataset, spaces, count: int, quality: Mapping | None, seed: int) -> tuple[FidelityMonitor, np.ndarray]:
    """The fidelity monitor on a fixed sample of `count` training images, and their labels (the
    fakes it is shown take the same labels, so class frequencies match)."""
    q = section_defaults("quality", quality)
    n = min(len(dataset), count)
    picked = np.sort(np.random.default_rng(derive_seed(seed, "monitor")).choice(len(dataset), n, replace=False))
    items = [dataset[int(i)] for i in picked]
    real = torch.stack([((item["image"].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for item in items])
    monitor = FidelityMonitor(
        real,
        spaces,
        batch_size=q["batch_size"],
        kid_subsets=q["kid_subsets"],
        kid_subset_size=q["kid_subset_size"],
        seed=q["seed"],
    )
    return monitor, np.array([int(item["label"]) for item in items])


def train(
    dataset,
    out: str | Path,
    settings: Mapping | None = None,
    *,
    seed: int = 0,
    val_dataset=None,
    checkpoint_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    accelerator=None,
    feature_spaces: Sequence[FeatureSpace] = (),
    quality: Mapping | None = None,
) -> dict:
    """Train the `gan` config section's GAN on `dataset` (items: 'image' (3, H, W) in [-1, 1],
    resized to gan.size, and 'label', the class index); writes out/model, out/loss.csv and
    out/samples/step-<n>.png. labels: the class names in index order (histosynth.json; default
    their indices); num_classes 0 takes their number, else the dataset's largest label + 1.
    feature_spaces (histosynth.generators.monitor.feature_spaces) give the loss table FD/KID (and
    FID/KID) of the EMA generator's images every gan.train.eval_every steps, with the `quality`
    section's KID settings. val_dataset is accepted for the shared command line and unused: a GAN
    has no validation loss."""
    c = section_defaults("gan", settings)
    t = c["train"]
    out = Path(out)
    shapes = check_dataset(dataset)
    if "label" not in dataset[0]:
        raise TrainingError("GAN training items need a 'label' (the class index)")
    if shapes["image"][0] != 3:
        raise TrainingError(f"GAN training images must be RGB (3, H, W); got {shapes['image']}")
    item_labels = dataset_labels(dataset) if not c["num_classes"] and labels is None else None
    num_classes = c["num_classes"] or (len(labels) if labels is not None else int(item_labels.max()) + 1)
    if labels is not None and len(labels) != num_classes:
        raise TrainingError(
            f"gan.num_classes={num_classes} but the run has {len(labels)} classes {list(labels)}; "
            f"set gan.num_classes: 0 (their number) or {len(labels)}"
        )
    names = [str(name) for name in labels] if labels is not None else [str(i) for i in range(num_classes)]
    size, z_dim, policy = c["size"], c["z_dim"], diffaugment_policy(t["diffaugment"])

    seed_everything(seed)
    model = build_gan(c, num_classes, names)
    log.info(
        "GAN %dx%d, %d classes: generator %.2fM, discriminator %.2fM parameters; DiffAugment %s, real-image "
        "flips/rotations %s",
        size,
        size,
        num_classes,
        parameter_count(model.generator) / 1e6,
        parameter_count(model.discriminator) / 1e6,
        list(policy) or "off",
        "on" if t["augment"] else "off",
    )
    accelerator = accelerator or make_accelerator(t, find_unused_parameters=True)
    device = accelerator.device
    transform = (lambda x: diff_augment(x, policy)) if policy else None

    def class_labels(batch) -> torch.Tensor:
        y = batch["label"].long().reshape(-1)
        if bool(((y < 0) | (y >= num_classes)).any()):
            raise TrainingError(
                f"training labels {sorted(set(y.tolist()))} outside 0..{num_classes - 1} "
                f"(gan.num_classes={c['num_classes']}, classes {names})"
            )
        return y

    def d_loss(model, batch):
        real, y = batch["image"].float(), class_labels(batch)
        if real.shape[-2:] != (size, size):  # the seed resized its images to 64x64 (seed 000, 8.1)
            real = F.interpolate(real, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if t["augment"]:
            real = random_dihedral(real)
        z = batch_draw(lambda m: torch.randn(m, z_dim, device=real.device), len(y))
        d_real, d_fake = model(z, y, real=real, transform=transform)
        d_real, d_fake = d_real.float(), d_fake.float()
        return hinge_d_loss(d_real, d_fake), {"d_real": d_real.mean().item(), "d_fake": d_fake.mean().item()}

    def g_loss(model, batch):
        y = class_labels(batch)  # the fakes take the real batch's classes: the data's (or balanced) frequencies
        z = batch_draw(lambda m: torch.randn(m, z_dim, device=y.device), len(y))
        return hinge_g_loss(model(z, y, transform=transform).float()), {}

    updates = [
        Update("d", d_loss, params=lambda m: m.discriminator.parameters(), lr=t["lr_d"]),
        Update("g", g_loss, params=lambda m: m.generator.parameters(), lr=t["lr_g"], every=t["n_critic"]),
    ]

    preview_z = torch.randn(
        t["sample_count"], z_dim, generator=torch.Generator().manual_seed(derive_seed(seed, "preview"))
    )

    monitor = None
    if t["eval_every"] and feature_spaces and accelerator.is_main_process:
        monitor, monitor_labels = _monitor(dataset, feature_spaces, t["eval_images"], quality, seed)
        monitor_seeds = [derive_seed(seed, "monitor", i) for i in range(len(monitor_labels))]
        patch_size = shapes["image"][-1]

    def on_step(step, eval_model):
        if t["sample_every"] and (step % t["sample_every"] == 0 or step == t["steps"]):
            preview(step, eval_model)
        if monitor is not None and (step % t["eval_every"] == 0 or step == t["steps"]):
            images = resize_images(generate(eval_model, torch.as_tensor(monitor_labels), monitor_seeds), patch_size)
            return monitor(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        return None

    def preview(step, eval_model):
        generator, n = eval_model.generator, len(preview_z)
        was_training = generator.training
        generator.eval()
        with torch.no_grad(), autocast(device):
            rows = [
                generator(preview_z.to(device), torch.full((n,), k, device=device)).float().cpu()
                for k in range(num_classes)
            ]
        generator.train(was_training)
        save_grid(rows, out / "samples" / f"step-{step}.png")

    run_config = {**c, "seed": seed, "classes": names, "data": {"items": len(dataset), "image": list(shapes["image"])}}
    result = fit(
        model,
        updates,
        dataset,
        out,
        settings=t,
        run_config=run_config,
        seed=seed,
        accelerator=accelerator,
        checkpoint_dir=checkpoint_dir,
        extra_columns=["d_loss", "g_loss", "d_real", "d_fake", *MONITOR_COLUMNS],
        on_step=on_step,
        desc="gan",
    )
    if not accelerator.is_main_process:
        return {}

    trained = result.model
    if result.ema is not None:  # the EMA generator beside the discriminator it was trained against
        trained = result.ema.model
        trained.discriminator.load_state_dict(result.model.discriminator.state_dict())
    counts = {"generator": parameter_count(trained.generator), "discriminator": parameter_count(trained.discriminator)}
    meta = {
        "num_classes": num_classes,
        "size": size,
        "z_dim": z_dim,
        "labels": names,
        "steps": result.step,
        "generator_weights": "ema" if result.ema is not None else "raw",
        "parameters": counts,
        "training": json.loads(json.dumps(run_config, default=str)),
    }
    with atomic_dir(out / "model") as tmp:
        trained.save_pretrained(tmp)
        (tmp / MODEL_INFO).write_text(json.dumps(meta, indent=2))
    return {"model": str(out / "model"), "loss_csv": str(result.loss_csv), "steps": result.step, "parameters": counts}


def main(argv: list[str] | None = None) -> int:
    return cli("gan", train, argv)


if __name__ == "__main__":
    sys.exit(main())
