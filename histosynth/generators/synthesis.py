"""Stages synthesize and inpaint: synthetic patches from a trained diffusion model, with provenance.

synthesize: n images generated from the conditioning maps of training patches (optionally only
patches containing a target class), with DDPM, DDIM or DPM-Solver++ through diffusion.sample.

inpaint: RePaint (Lugmayr et al. 2022; seed 002, 6.3.3 and 6.6.1.2). A target-class region is
taken from a donor patch's mask (a random training patch containing the class; the region keeps
its location) and pasted into a clean-tissue patch (no target class): into its label mask, and
into its conditioning map, where the region channel becomes the class inside the region and the
nucleus channels (class, boundary) are cleared there, so the model draws new nuclei for the new
tissue. Only the region is regenerated: at every step the known pixels come from the source
noised to that step, the unknown from the model, with resampling jumps (jump_length steps back
in time, jump_n_sample times) so both parts harmonise. In latent space the region is
downsampled to the latent grid (any covered pixel) and dilated by `latent_dilation` latent
pixels, so the seam lies inside the regenerated area; after decoding, the source pixels are
pasted back outside the pixel-space region. In both spaces the pixels outside the region are
the source's bytes.

Outputs in out_dir (histosynth.generators.set_files): images/<id>.png (RGB), masks/<id>.png
(uint8 region classes), conditioning/<id>.png (encoded map), manifest.parquet, grid_<class>.png.
Deterministic given the seed: image i uses its own generator seeded derive_seed(seed, mode, i).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.config import section_defaults
from histosynth.data.io import read_mask, read_rgb
from histosynth.data.labels import label_index, patch_labels
from histosynth.data.patches import fraction_column
from histosynth.device import autocast, pick_device
from histosynth.files import atomic_dir
from histosynth.generators.datasets import read_indexes
from histosynth.generators.diffusion import Diffusion, load_diffusion
from histosynth.generators.diffusion_runner import Runner, paint, seed_generators
from histosynth.generators.inpaint_regions import paste_region
from histosynth.generators.sampling import make_sampler, repaint_scheduler, sample
from histosynth.generators.set_files import SynthesisError, finish, manifest_row, model_record, to_model, write_images
from histosynth.generators.source_picks import check_sources, choose, class_index, image_classes, per_class_picks
from histosynth.nuclei.conditioning import read_conditioning
from histosynth.seeds import derive_seed
from histosynth.training.batches import balance_weights
from histosynth.training.grids import to_uint8

log = logging.getLogger("histosynth.generators.synthesis")

MODES = ("synth", "inpaint")  # the diffusion model's sets (run_stage)
DONORS = ("random",)


@contextmanager
def _output_dir(out_dir: str | Path) -> Iterator[Path]:
    """The synthetic set's folder, written atomically, with its images/, masks/ and conditioning/."""
    with atomic_dir(out_dir) as tmp:
        for folder in ("images", "masks", "conditioning"):
            (tmp / folder).mkdir()
        yield tmp


def _batches(n: int, batch_size: int, seed: int, mode: str) -> Iterator[tuple[slice, range, list[int]]]:
    """Per sampling batch: the slice of the n picks, the image numbers and their seeds."""
    for start in range(0, n, batch_size):
        ids = range(start, min(n, start + batch_size))
        yield slice(start, start + batch_size), ids, [derive_seed(seed, mode, i) for i in ids]


def synthesize(
    diffusion: Diffusion,
    sources: pd.DataFrame,
    out_dir: str | Path,
    *,
    n: int,
    classes: Sequence[str],
    labels: Mapping,
    conditioning_cfg: Mapping,
    target_class: str | None = None,
    per_class: Mapping[str, int] | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 1.0,
    strength: float = 1.0,
    class_balance: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
    model_path: str | Path | None = None,
    grid_per_class: int = 8,
) -> pd.DataFrame:
    """Generate images from the conditioning maps of `sources` (conditioning index rows of the
    training split, absolute paths), each sampled with its source's class embedding (resolved
    `labels`, histosynth.data.labels). per_class {label: k}: k images from maps of patches of
    each label (class-conditioned synthesis for classification); else n images, only from maps
    containing `target_class` when given, drawn by label with weights 1 / count^class_balance
    (1: every class equally often), with replacement (and a warning) when n exceeds them.
    strength < 1 starts each image from its source patch noised to that level instead of pure
    noise. Writes out_dir (atomically) and returns the manifest (`class`: the image's label)."""
    if not 0 < strength <= 1:
        raise SynthesisError(f"synthesize.strength must be in (0, 1], got {strength}")
    check_sources(sources, classes)
    runner = Runner(diffusion, classes, conditioning_cfg)
    pool = sources.reset_index(drop=True)
    rng = np.random.default_rng(derive_seed(seed, "synth", "sources"))
    if per_class:
        picks = per_class_picks(rng, patch_labels(pool, labels), per_class, labels)
    else:
        if target_class is not None:
            class_index(pool, classes, target_class)
            pool = pool[pool[fraction_column(target_class)] > 0].reset_index(drop=True)
        weights = (
            balance_weights(label_index(patch_labels(pool, labels), labels), class_balance).numpy()
            if class_balance
            else None
        )
        picks = choose(
            rng, n, len(pool), "source maps" + (f" containing {target_class!r}" if target_class else ""), weights
        )
    n = len(picks)
    scheduler = make_sampler(sampler, diffusion.scheduler.config)
    record = model_record(model_path)
    rows = []
    with _output_dir(out_dir) as tmp:
        for chunk, ids, seeds in _batches(n, batch_size, seed, "synth"):
            batch = pool.iloc[picks[chunk]]
            encoded = [read_conditioning(p) for p in batch["conditioning"]]
            masks = [read_mask(p).astype(np.uint8) for p in batch["mask"]]
            names = image_classes(masks, batch, labels)
            init = to_model(np.stack([read_rgb(p) for p in batch["image"]]), runner.device) if strength < 1 else None
            with autocast(runner.device):
                images = sample(
                    runner.model,
                    scheduler,
                    runner.cond(encoded),
                    runner.labels(label_index(names, labels)),
                    steps=steps,
                    guidance=guidance,
                    generator=seed_generators(seeds),
                    autoencoder=runner.autoencoder,
                    init=init,
                    strength=strength,
                )
            for i, s, (_, source), image, mask, enc, name in zip(
                ids, seeds, batch.iterrows(), to_uint8(images), masks, encoded, names
            ):
                image_id = f"synth-{i:06d}"
                paths = write_images(tmp, image_id, image, mask, enc)
                rows.append(
                    manifest_row(
                        image_id,
                        "synth",
                        paths,
                        record,
                        runner,
                        sampler,
                        steps,
                        guidance,
                        strength,
                        s,
                        source,
                        None,
                        target_class,
                        (None, None),
                        mask,
                        classes,
                        name,
                    )
                )
            log.info("synthesize: %d/%d images", len(rows), n)
        return finish(tmp, rows, labels, sources, grid_per_class)


def inpaint(
    diffusion: Diffusion,
    sources: pd.DataFrame,
    out_dir: str | Path,
    *,
    n: int,
    target_class: str,
    classes: Sequence[str],
    labels: Mapping,
    conditioning_cfg: Mapping,
    steps: int = 50,
    jump_length: int = 10,
    jump_n_sample: int = 5,
    eta: float = 1.0,
    guidance: float = 1.0,
    donor: str = "random",
    donor_min_fraction: float = 0.0,
    grow: int = 0,
    latent_dilation: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    model_path: str | Path | None = None,
    grid_per_class: int = 8,
) -> pd.DataFrame:
    """Paint a donor's target_class region into n clean-tissue patches (frac_<target_class> == 0)
    with RePaint, in the model's space; pixels outside the region keep the source's bytes.
    Writes out_dir (atomically) and returns the manifest."""
    if target_class is None:
        raise SynthesisError(f"inpainting needs a target class (one of {list(classes)})")
    if donor not in DONORS:
        raise SynthesisError(f"donor must be one of {DONORS}, got {donor!r}")
    if jump_length < 1 or jump_n_sample < 1 or steps < 1:
        raise SynthesisError(
            f"steps, jump_length and jump_n_sample must be >= 1, got {steps}, {jump_length}, {jump_n_sample}"
        )
    check_sources(sources, classes)
    runner = Runner(diffusion, classes, conditioning_cfg)
    if not runner.channels["use_regions"]:
        log.warning(
            "conditioning.regions is off: the model cannot see the pasted %r region; it is only redrawn", target_class
        )
    target = class_index(sources, classes, target_class)
    column = fraction_column(target_class)
    clean = sources[sources[column] == 0].reset_index(drop=True)
    donors = sources[sources[column] > donor_min_fraction].reset_index(drop=True)
    if donors.empty:
        raise SynthesisError(
            f"no donor patch has {column} > {donor_min_fraction} (max {sources[column].max():.3f}); "
            "lower donor_min_fraction"
        )
    if clean.empty:
        raise SynthesisError(f"every training patch contains {target_class!r}: no clean-tissue patch to paint into")
    rng = np.random.default_rng(derive_seed(seed, "inpaint", "sources"))
    picks = choose(rng, n, len(clean), f"clean-tissue patches (without {target_class!r})")
    donor_picks = rng.integers(len(donors), size=n)
    scheduler = repaint_scheduler(diffusion.scheduler.config, eta)
    record = model_record(model_path)
    rows = []
    with _output_dir(out_dir) as tmp:
        for chunk, ids, seeds in _batches(n, batch_size, seed, "inpaint"):
            batch, donor_rows = clean.iloc[picks[chunk]], donors.iloc[donor_picks[chunk]]
            pixels = np.stack([read_rgb(p) for p in batch["image"]])
            edits = [
                paste_region(read_mask(m).astype(np.uint8), read_conditioning(c), read_mask(d), target)
                for m, c, d in zip(batch["mask"], batch["conditioning"], donor_rows["mask"])
            ]
            masks, encoded, regions = map(list, zip(*edits))
            names = image_classes(masks, batch, labels)
            images = paint(
                runner,
                scheduler,
                pixels,
                regions,
                encoded,
                label_index(names, labels),
                seed_generators(seeds),
                steps=steps,
                jump_length=jump_length,
                jump_n_sample=jump_n_sample,
                guidance=guidance,
                grow=grow,
                latent_dilation=latent_dilation,
            )
            for i, s, (_, source), (_, d), image, mask, enc, name in zip(
                ids, seeds, batch.iterrows(), donor_rows.iterrows(), images, masks, encoded, names
            ):
                image_id = f"inpaint-{i:06d}"
                paths = write_images(tmp, image_id, image, mask, enc)
                rows.append(
                    manifest_row(
                        image_id,
                        "inpaint",
                        paths,
                        record,
                        runner,
                        "repaint",
                        steps,
                        guidance,
                        1.0,
                        s,
                        source,
                        str(d["patch_id"]),
                        target_class,
                        (jump_length, jump_n_sample),
                        mask,
                        classes,
                        name,
                    )
                )
            log.info("inpaint: %d/%d images", len(rows), n)
        return finish(tmp, rows, labels, sources, grid_per_class)


def run_stage(
    mode: str,
    model_path: str | Path,
    indexes: Sequence[str | Path],
    out_dir: str | Path,
    *,
    settings: Mapping,
    classes: Sequence[str],
    labels: Mapping,
    conditioning_cfg: Mapping,
    seed: int,
    autoencoder: str | Path | None = None,
    device: str = "auto",
    split: str = "train",
) -> pd.DataFrame:
    """The rules' entry: load the model, read the `split` rows of the conditioning indexes and run
    `mode` ('synth' | 'inpaint') with the `synthesis` config section `settings` and the resolved
    `labels` (histosynth.data.labels.resolve_labels)."""
    if mode not in MODES:
        raise SynthesisError(f"mode must be one of {MODES}, got {mode!r}")
    s = section_defaults("synthesis", settings)
    diffusion = load_diffusion(model_path, autoencoder=autoencoder, device=pick_device(device))
    sources = read_indexes(indexes, split)
    if sources.empty:
        raise SynthesisError(f"no {split!r} patches in the conditioning indexes {[str(p) for p in indexes]}")
    common = dict(
        classes=classes,
        labels=labels,
        conditioning_cfg=conditioning_cfg,
        batch_size=s["batch_size"],
        seed=seed,
        model_path=model_path,
        grid_per_class=s["grid_per_class"],
    )
    if mode == "synth":
        return synthesize(diffusion, sources, out_dir, **s["synthesize"], **common)
    return inpaint(diffusion, sources, out_dir, **s["inpaint"], **common)
