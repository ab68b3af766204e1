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

Outputs in out_dir: images/<id>.png (RGB), masks/<id>.png (uint8 region classes),
conditioning/<id>.png (encoded map), manifest.parquet (one row per image; paths relative to it;
`class` the image's label and `label` its class index, histosynth.data.labels),
grid_<class>.png (rows: real patch, conditioning preview, synthetic patch).
Deterministic given the seed: image i uses its own generator seeded derive_seed(seed, mode, i).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from histosynth.config import lora_set, section_defaults
from histosynth.data.io import atomic_dir, read_mask, read_rgb, write_png, write_table
from histosynth.data.labels import label_index, patch_labels
from histosynth.data.patches import (
    class_indices,
    fraction_column,
    fraction_columns,
)
from histosynth.device import autocast
from histosynth.seeds import derive_seed
from histosynth.files import content_hash
from histosynth.generators.autoencoder import (
    decode,
    encode,
    latent_factor,
)
from histosynth.generators.conditioning import (
    conditioning_channels,
    preview,
    read_conditioning,
    write_conditioning,
)
from histosynth.generators.diffusion import Diffusion, num_classes
from histosynth.generators.sampling import (
    make_sampler,
    repaint,
    repaint_scheduler,
    resize_cond,
    sample,
)
from histosynth.training.batches import balance_weights
from histosynth.training.grids import save_grid, to_uint8

log = logging.getLogger("histosynth.generators.synthesis")

MODE_RULES = {"synth": "synthesize", "inpaint": "inpaint", "gan": "gan_synthesize"}  # synthetic set (mode) -> its rule
MASKED_MODES = ("synth", "inpaint")  # the sets with label masks, which segmentation can train on
MODES = ("synth", "inpaint")  # the diffusion model's modes (run_stage)


def set_rule(mode: str) -> str:
    """The rule that makes synthetic set `mode`."""
    return "lora_synthesize" if mode.startswith("lora") else MODE_RULES.get(mode, mode)
MANIFEST = "manifest.parquet"
SPLIT = "synthetic"
DONORS = ("random",)


def set_manifests(folders) -> dict[str, Path]:
    """{mode: manifest path} of synthetic-set folders, which are named after their mode
    (results/synthetic/synth, results/synthetic/inpaint)."""
    return {Path(folder).name: Path(folder) / MANIFEST for folder in folders}


class SynthesisError(ValueError):
    """Sources, classes or model that cannot produce the requested synthetic set."""


# ----------------------------------------------------------------------------- sources

def classes_present(sources: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    """The classes with pixels in at least one source mask."""
    return [name for name in classes if fraction_column(name) in sources and (sources[fraction_column(name)] > 0).any()]


def _class_index(sources: pd.DataFrame, classes: Sequence[str], target_class: str) -> int:
    """1 + the position of target_class; an error when it is not configured or in no source mask."""
    if target_class not in classes:
        raise SynthesisError(f"target class {target_class!r} is not one of the configured classes {list(classes)}")
    if not classes_present(sources, [target_class]):
        raise SynthesisError(f"target class {target_class!r} is absent from all {len(sources)} training masks; "
                             f"classes present: {classes_present(sources, classes) or 'none'}")
    return list(classes).index(target_class) + 1


def _choose(rng: np.random.Generator, n: int, available: int, what: str, weights: np.ndarray | None = None) -> np.ndarray:
    """n row positions, in proportion to `weights` when given: without replacement when there are
    enough, else with (and a warning)."""
    if n < 1:
        raise SynthesisError(f"the number of images n must be at least 1, got {n}")
    if available == 0:
        raise SynthesisError(f"no {what} to synthesize from")
    p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    if n <= available:
        return rng.permutation(available)[:n] if p is None else rng.choice(available, n, replace=False, p=p)
    log.warning("%d images requested but only %d %s: sampling them with replacement", n, available, what)
    return rng.integers(available, size=n) if p is None else rng.choice(available, n, replace=True, p=p)


def _check_sources(sources: pd.DataFrame, classes: Sequence[str]) -> None:
    needed = ["patch_id", "image", "mask", "conditioning", *map(fraction_column, classes)]
    missing = [c for c in needed if c not in sources]
    if missing:
        raise SynthesisError(f"the source table lacks columns {missing}; pass conditioning index rows "
                             "(histosynth.generators.datasets.read_indexes)")


def _to_model(pixels: np.ndarray, device) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)


# ----------------------------------------------------------------------------- model

def model_record(model_path: str | Path | None) -> tuple[str, str]:
    """(path, content hash) of a saved model folder for the manifest; ('', '') without one."""
    if model_path is None:
        return "", ""
    path = Path(model_path)
    return str(model_path), content_hash(path) if path.is_dir() else ""


class _Runner:
    """What both modes need from a loaded model: device, space, conditioning channels, labels."""

    def __init__(self, diffusion: Diffusion, classes: Sequence[str], conditioning_cfg: Mapping):
        self.model, self.autoencoder, meta = diffusion.model, diffusion.autoencoder, diffusion.meta
        self.space = meta.get("space", "pixel")
        if self.space == "latent" and self.autoencoder is None:
            raise SynthesisError("this is a latent-space diffusion model but no autoencoder was loaded with it; "
                                 "load it with histosynth.generators.diffusion.load_diffusion (its recorded autoencoder, or autoencoder=)")
        self.device = next(self.model.parameters()).device
        self.n_regions = len(classes)
        self.channels = {f"use_{key}": bool(conditioning_cfg.get(key, True)) for key in ("regions", "nuclei", "boundaries")}
        self.expected = meta.get("cond_channels")
        self.size = meta.get("image_size")
        self.num_classes = num_classes(self.model)
        self.prediction = diffusion.scheduler.config.get("prediction_type", "epsilon")
        self.autoencoder_hash = (meta.get("autoencoder") or {}).get("sha256", "") if self.space == "latent" else ""

    def cond(self, encoded: list[np.ndarray]) -> torch.Tensor:
        cond = torch.from_numpy(conditioning_channels(np.stack(encoded), self.n_regions, **self.channels))
        if self.expected is not None and cond.shape[1] != self.expected:
            raise SynthesisError(f"the conditioning settings give {cond.shape[1]} channels {self.channels} for "
                                 f"{self.n_regions} region classes, but the model was trained on {self.expected}; "
                                 "use the classes and conditioning settings the model was trained with")
        if self.size is not None and list(cond.shape[-2:]) != list(self.size):
            raise SynthesisError(f"source patches are {tuple(cond.shape[-2:])} px but the model was trained on "
                                 f"{tuple(self.size)} px patches")
        return cond.to(self.device)

    def labels(self, labels: np.ndarray) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if labels.max(initial=0) >= self.num_classes:
            raise SynthesisError(f"class index {int(labels.max())} is outside the model's class embedding "
                                 f"(num_classes={self.num_classes}); the model was trained with other labels")
        return torch.as_tensor(labels, dtype=torch.long, device=self.device)


def image_classes(masks: Sequence[np.ndarray], sources: pd.DataFrame, labels: Mapping) -> np.ndarray:
    """The label of each output image: its source patch's sheet label, or (region labels) the
    dominant region class of its mask, which inpainting edits."""
    if labels["source"] == "sheet":
        return patch_labels(sources, labels)
    fractions = pd.DataFrame([fraction_columns(m, class_indices(labels["regions"])) for m in masks])
    return patch_labels(fractions, labels)


def per_class_picks(rng: np.random.Generator, pool_classes: np.ndarray, per_class: Mapping[str, int],
                    labels: Mapping) -> np.ndarray:
    """Row positions of the source maps for class-conditioned synthesis: per_class[name] of the
    rows labelled name, classes in the labels' order (with replacement, logged, when a class has fewer)."""
    unknown = [name for name in per_class if name not in labels["classes"]]
    if unknown:
        raise SynthesisError(f"synthesize.per_class names {unknown}, which are not among the labels {labels['classes']}")
    picks = []
    for name in [name for name in labels["classes"] if name in per_class]:
        count, rows = per_class[name], np.flatnonzero(pool_classes == name)
        if not len(rows):
            present = pd.Series(pool_classes).value_counts().to_dict()
            raise SynthesisError(f"synthesize.per_class asks for {count} images of class {name!r} but no training patch "
                                 f"has that label (training patches per label: {present})")
        picks.append(rows[_choose(rng, count, len(rows), f"training patches of class {name!r}")])
    return np.concatenate(picks)


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, so image i's noise depends only on its seed (on any device)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def paste_region(clean_mask: np.ndarray, clean_encoded: np.ndarray, donor_mask: np.ndarray,
                 target_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The donor's target-class region pasted at the same location: (label mask, encoded map,
    region bool mask). In the map the region channel is the class inside the region and the
    nucleus class and boundary channels are cleared there (pixel-wise), for the model to draw
    new nuclei."""
    if clean_mask.shape != donor_mask.shape or clean_encoded.shape[:2] != clean_mask.shape:
        raise SynthesisError(f"patch sizes differ: clean mask {clean_mask.shape}, its map {clean_encoded.shape[:2]}, "
                             f"donor mask {donor_mask.shape}")
    region = donor_mask == target_index
    mask = np.where(region, np.uint8(target_index), clean_mask).astype(np.uint8)
    encoded = clean_encoded.copy()
    encoded[region, 0] = target_index
    encoded[region, 1:] = 0
    return mask, encoded, region


def _grow(region: torch.Tensor, pixels: int) -> torch.Tensor:
    """Binary dilation of (N, 1, H, W) by `pixels` (square structuring element)."""
    return F.max_pool2d(region, 2 * pixels + 1, 1, pixels) if pixels > 0 else region


def latent_region(region: torch.Tensor, factor: int, dilation: int) -> torch.Tensor:
    """A pixel-space region (N, 1, H, W) on the latent grid: every latent pixel covering a region
    pixel, dilated by `dilation` latent pixels so the seam falls inside the regenerated area."""
    return _grow(F.max_pool2d(region, factor, factor), dilation)


def _paint(runner: _Runner, scheduler, pixels: np.ndarray, regions: list[np.ndarray], encoded: list[np.ndarray],
           labels: np.ndarray, generators, *, steps: int, jump_length: int, jump_n_sample: int, guidance: float,
           grow: int, latent_dilation: int) -> np.ndarray:
    """RePaint one batch of sources (N, H, W, 3) uint8 inside their regions (grown by `grow` px)
    under the edited maps, in the model's space; (N, H, W, 3) uint8 with the source's bytes outside."""
    region = _grow(torch.from_numpy(np.stack(regions)[:, None]).float(), grow).to(runner.device)
    known, keep, cond, ae = _to_model(pixels, runner.device), 1 - region, runner.cond(encoded), runner.autoencoder
    if ae is not None:
        known, keep = encode(ae, known).float(), 1 - latent_region(region, latent_factor(ae), latent_dilation)
        cond = resize_cond(cond, known.shape[-2:])
    with autocast(runner.device):
        x = repaint(runner.model, scheduler, known, keep, cond, runner.labels(labels), steps=steps, jump_length=jump_length,
                    jump_n_sample=jump_n_sample, guidance=guidance, generator=generators, prediction=runner.prediction)
        x = decode(ae, x) if ae is not None else x.clamp(-1, 1)
    return np.where(region[:, 0].bool().cpu().numpy()[..., None], to_uint8(x), pixels)


# ----------------------------------------------------------------------------- outputs

def _write(root: Path, image_id: str, image: np.ndarray, mask: np.ndarray, encoded: np.ndarray) -> dict:
    write_png(image, root / "images" / f"{image_id}.png")
    write_png(mask, root / "masks" / f"{image_id}.png")
    write_conditioning(encoded, root / "conditioning" / f"{image_id}.png")
    return {"image": f"images/{image_id}.png", "mask": f"masks/{image_id}.png",
            "conditioning": f"conditioning/{image_id}.png"}


def _manifest(rows: list[dict], labels: Mapping) -> pd.DataFrame:
    manifest = pd.DataFrame(rows)
    manifest.insert(manifest.columns.get_loc("created_at"), "label", label_index(manifest["class"], labels))
    for column in ("jump_length", "jump_n_sample"):
        manifest[column] = manifest[column].astype("Int64")
    manifest["split"] = SPLIT
    return manifest


def _row(image_id: str, mode: str, paths: dict, record: tuple[str, str], runner: _Runner, sampler: str, steps: int,
         guidance: float, strength: float, seed: int, source: pd.Series, donor_id: str | None, target_class: str | None,
         jumps: tuple[int | None, int | None], mask: np.ndarray, classes: Sequence[str], class_name: str) -> dict:
    return {"id": image_id, **paths, "mode": mode, "class": class_name, "model_path": record[0], "model_hash": record[1],
            "space": runner.space, "sampler": sampler, "steps": int(steps), "guidance": float(guidance),
            "strength": float(strength),
            "seed": int(seed), "source_patch_id": str(source["patch_id"]), "donor_patch_id": donor_id,
            "target_class": target_class, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **fraction_columns(mask, class_indices(classes)), "source_slide": str(source.get("slide", "")),
            "jump_length": jumps[0], "jump_n_sample": jumps[1], "autoencoder_hash": runner.autoencoder_hash}


def _finish(tmp: Path, rows: list[dict], labels: Mapping, sources: pd.DataFrame, grid_per_class: int) -> pd.DataFrame:
    manifest = _manifest(rows, labels)
    write_table(manifest, tmp / MANIFEST)
    if grid_per_class:
        class_grids(manifest, tmp, sources, tmp, per_class=grid_per_class)
    return manifest


def comparison_grid(manifest: pd.DataFrame, root: str | Path, sources: pd.DataFrame, path: str | Path) -> Path:
    """One PNG of manifest rows side by side: the real source patch, the preview of the map the
    image was generated from, the synthetic (or inpainted) patch."""
    root = Path(root)
    images = sources.drop_duplicates("patch_id").set_index("patch_id")["image"]
    as_tensor = lambda arrays: _to_model(np.stack(arrays), "cpu")  # noqa: E731
    real = as_tensor([read_rgb(images[pid]) for pid in manifest["source_patch_id"]])
    maps = as_tensor([preview(read_conditioning(root / p)) for p in manifest["conditioning"]])
    synthetic = as_tensor([read_rgb(root / p) for p in manifest["image"]])
    return save_grid([real, maps, synthetic], path)


def grid_name(class_name: str) -> str:
    return f"grid_{fraction_column(class_name)[5:]}.png"


def class_grids(manifest: pd.DataFrame, root: str | Path, sources: pd.DataFrame, out_dir: str | Path,
                per_class: int = 8) -> list[Path]:
    """grid_<class>.png per class (the inpainting target class, else the image's `class`), each
    with the first `per_class` images."""
    key = manifest["target_class"].where(manifest["target_class"].notna(), manifest["class"])
    return [comparison_grid(manifest[key == name].head(per_class), root, sources, Path(out_dir) / grid_name(name))
            for name in dict.fromkeys(key)]


# ----------------------------------------------------------------------------- the two modes

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


def synthesize(diffusion: Diffusion, sources: pd.DataFrame, out_dir: str | Path, *, n: int, classes: Sequence[str],
               labels: Mapping, conditioning_cfg: Mapping, target_class: str | None = None,
               per_class: Mapping[str, int] | None = None, sampler: str = "ddim", steps: int = 50, guidance: float = 1.0,
               strength: float = 1.0, class_balance: float = 0.0, batch_size: int = 8, seed: int = 0,
               model_path: str | Path | None = None, grid_per_class: int = 8) -> pd.DataFrame:
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
    _check_sources(sources, classes)
    runner = _Runner(diffusion, classes, conditioning_cfg)
    pool = sources.reset_index(drop=True)
    rng = np.random.default_rng(derive_seed(seed, "synth", "sources"))
    if per_class:
        picks = per_class_picks(rng, patch_labels(pool, labels), per_class, labels)
    else:
        if target_class is not None:
            _class_index(pool, classes, target_class)
            pool = pool[pool[fraction_column(target_class)] > 0].reset_index(drop=True)
        weights = balance_weights(label_index(patch_labels(pool, labels), labels), class_balance).numpy() if class_balance else None
        picks = _choose(rng, n, len(pool), "source maps" + (f" containing {target_class!r}" if target_class else ""), weights)
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
            init = _to_model(np.stack([read_rgb(p) for p in batch["image"]]), runner.device) if strength < 1 else None
            with autocast(runner.device):
                images = sample(runner.model, scheduler, runner.cond(encoded), runner.labels(label_index(names, labels)),
                                steps=steps, guidance=guidance, generator=_generators(seeds), autoencoder=runner.autoencoder,
                                init=init, strength=strength)
            for i, s, (_, source), image, mask, enc, name in zip(ids, seeds, batch.iterrows(), to_uint8(images), masks,
                                                                 encoded, names):
                image_id = f"synth-{i:06d}"
                paths = _write(tmp, image_id, image, mask, enc)
                rows.append(_row(image_id, "synth", paths, record, runner, sampler, steps, guidance, strength, s, source, None,
                                 target_class, (None, None), mask, classes, name))
            log.info("synthesize: %d/%d images", len(rows), n)
        return _finish(tmp, rows, labels, sources, grid_per_class)


def inpaint(diffusion: Diffusion, sources: pd.DataFrame, out_dir: str | Path, *, n: int, target_class: str,
            classes: Sequence[str], labels: Mapping, conditioning_cfg: Mapping, steps: int = 50, jump_length: int = 10,
            jump_n_sample: int = 5, eta: float = 1.0, guidance: float = 1.0, donor: str = "random",
            donor_min_fraction: float = 0.0, grow: int = 0, latent_dilation: int = 1, batch_size: int = 8,
            seed: int = 0, model_path: str | Path | None = None, grid_per_class: int = 8) -> pd.DataFrame:
    """Paint a donor's target_class region into n clean-tissue patches (frac_<target_class> == 0)
    with RePaint, in the model's space; pixels outside the region keep the source's bytes.
    Writes out_dir (atomically) and returns the manifest."""
    if target_class is None:
        raise SynthesisError(f"inpainting needs a target class (one of {list(classes)})")
    if donor not in DONORS:
        raise SynthesisError(f"donor must be one of {DONORS}, got {donor!r}")
    if jump_length < 1 or jump_n_sample < 1 or steps < 1:
        raise SynthesisError(f"steps, jump_length and jump_n_sample must be >= 1, got {steps}, {jump_length}, {jump_n_sample}")
    _check_sources(sources, classes)
    runner = _Runner(diffusion, classes, conditioning_cfg)
    if not runner.channels["use_regions"]:
        log.warning("conditioning.regions is off: the model cannot see the pasted %r region; it is only redrawn", target_class)
    target = _class_index(sources, classes, target_class)
    column = fraction_column(target_class)
    clean = sources[sources[column] == 0].reset_index(drop=True)
    donors = sources[sources[column] > donor_min_fraction].reset_index(drop=True)
    if donors.empty:
        raise SynthesisError(f"no donor patch has {column} > {donor_min_fraction} (max {sources[column].max():.3f}); "
                             "lower donor_min_fraction")
    if clean.empty:
        raise SynthesisError(f"every training patch contains {target_class!r}: no clean-tissue patch to paint into")
    rng = np.random.default_rng(derive_seed(seed, "inpaint", "sources"))
    picks = _choose(rng, n, len(clean), f"clean-tissue patches (without {target_class!r})")
    donor_picks = rng.integers(len(donors), size=n)
    scheduler = repaint_scheduler(diffusion.scheduler.config, eta)
    record = model_record(model_path)
    rows = []
    with _output_dir(out_dir) as tmp:
        for chunk, ids, seeds in _batches(n, batch_size, seed, "inpaint"):
            batch, donor_rows = clean.iloc[picks[chunk]], donors.iloc[donor_picks[chunk]]
            pixels = np.stack([read_rgb(p) for p in batch["image"]])
            edits = [paste_region(read_mask(m).astype(np.uint8), read_conditioning(c), read_mask(d), target)
                     for m, c, d in zip(batch["mask"], batch["conditioning"], donor_rows["mask"])]
            masks, encoded, regions = map(list, zip(*edits))
            names = image_classes(masks, batch, labels)
            images = _paint(runner, scheduler, pixels, regions, encoded, label_index(names, labels), _generators(seeds), steps=steps,
                            jump_length=jump_length, jump_n_sample=jump_n_sample, guidance=guidance, grow=grow,
                            latent_dilation=latent_dilation)
            for i, s, (_, source), (_, d), image, mask, enc, name in zip(ids, seeds, batch.iterrows(), donor_rows.iterrows(),
                                                                          images, masks, encoded, names):
                image_id = f"inpaint-{i:06d}"
                paths = _write(tmp, image_id, image, mask, enc)
                rows.append(_row(image_id, "inpaint", paths, record, runner, "repaint", steps, guidance, 1.0, s, source,
                                 str(d["patch_id"]), target_class, (jump_length, jump_n_sample), mask, classes, name))
            log.info("inpaint: %d/%d images", len(rows), n)
        return _finish(tmp, rows, labels, sources, grid_per_class)


def class_counts(n: int, per_class: Mapping[str, int] | None, labels: Mapping) -> dict[str, int]:
    """Images per label: per_class (names checked), else n spread evenly over the labels (the
    first labels take the remainder)."""
    names = list(labels["classes"])
    if per_class:
        unknown = [name for name in per_class if name not in names]
        if unknown:
            raise SynthesisError(f"per_class names {unknown}, which are not among the labels {names}")
        return {name: int(per_class[name]) for name in names if name in per_class}
    return {name: n // len(names) + (i < n % len(names)) for i, name in enumerate(names)}


def write_label_set(out_dir: str | Path, mode: str, names: Sequence[str], seeds: Sequence[int], draw, *, labels: Mapping,
                    real: pd.DataFrame, size: int, batch_size: int, grid_per_class: int, record: Mapping,
                    per_label: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """A synthetic set of labelled images without masks (a GAN's, Stable Diffusion's): image i of
    label names[i] from seed seeds[i], drawn batch by batch by draw(names, seeds) -> uint8 (N, h, w,
    3) and resized to the patch size `size` (Lanczos). Writes out_dir (atomically): images/,
    manifest.parquet (id, image, mode, class, the fields of `record` and of per_label[class], seed,
    created_at, label, split) and grid_<class>.png (the `real` training rows of the class above the
    set's images)."""
    from histosynth.generators.gan import resize_images

    real_names = patch_labels(real, labels) if len(real) else np.empty(0, object)
    rows, grids = [], {}
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for start in range(0, len(names), batch_size):
            chunk = slice(start, start + batch_size)
            images = resize_images(draw(list(names[chunk]), list(seeds[chunk])), size)
            for i, (name, image_seed, image) in enumerate(zip(names[chunk], seeds[chunk], images), start):
                image_id = f"{mode}-{i:06d}"
                write_png(image, tmp / "images" / f"{image_id}.png")
                grids.setdefault(name, []).append(image)
                rows.append({"id": image_id, "image": f"images/{image_id}.png", "mode": mode, "class": name, **record,
                             **(per_label or {}).get(name, {}), "seed": int(image_seed), "source_patch_id": None,
                             "source_slide": None, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            log.info("%s: %d/%d images", mode, len(rows), len(names))
        manifest = pd.DataFrame(rows)
        manifest.insert(manifest.columns.get_loc("created_at"), "label", label_index(manifest["class"], labels))
        manifest["split"] = SPLIT
        write_table(manifest, tmp / MANIFEST)
        for name, made in grids.items() if grid_per_class else ():
            real_rows = real[real_names == name].head(grid_per_class)
            grid = [_to_model(np.stack([read_rgb(p) for p in real_rows["image"]]), "cpu")] if len(real_rows) else []
            save_grid([*grid, _to_model(np.stack(made[:grid_per_class]), "cpu")], tmp / grid_name(name))
    return manifest


def gan_stage(model_path: str | Path, indexes: Sequence[str | Path], out_dir: str | Path, *, settings: Mapping,
              labels: Mapping, size: int, seed: int, device: str = "auto") -> pd.DataFrame:
    """Rule gan_synthesize: images per label from the trained GAN (histosynth.generators.gan),
    image i from its own noise seed derive_seed(seed, 'gan', i), at the patch size `size`; no
    masks (write_label_set; the manifest records model path and hash and the truncation).
    `settings` is the `synthesis` config section (its gan, batch_size and grid_per_class);
    `indexes` the training slides' patch indexes."""
    from histosynth.device import pick_device
    from histosynth.generators.datasets import read_indexes
    from histosynth.generators.gan import generate, load_gan

    model = load_gan(model_path, pick_device(device))
    if list(model.config.labels or []) != list(labels["classes"]):
        raise SynthesisError(f"the GAN at {model_path} was trained on the labels {model.config.labels}, this run's are "
                             f"{labels['classes']}; retrain it (rule train_gan)")
    s = section_defaults("synthesis", settings)
    gan = s["gan"]
    counts = class_counts(gan["n"], gan["per_class"], labels)
    names = [name for name, count in counts.items() for _ in range(count)]
    seeds = [derive_seed(seed, "gan", i) for i in range(len(names))]
    path, digest = model_record(model_path)
    if model.config.size != size:
        log.info("gan_synthesize: the GAN draws %d px images; resized to the %d px patches", model.config.size, size)

    def draw(batch_names, batch_seeds):
        return generate(model, torch.as_tensor(label_index(batch_names, labels)), batch_seeds, gan["truncation"])

    return write_label_set(out_dir, "gan", names, seeds, draw, labels=labels, real=read_indexes(indexes, "train"),
                           size=size, batch_size=s["batch_size"], grid_per_class=s["grid_per_class"],
                           record={"model_path": path, "model_hash": digest, "truncation": gan["truncation"]})


def lora_stage(adapter: str | Path, indexes: Sequence[str | Path], out_dir: str | Path, *, settings: Mapping,
               labels: Mapping, size: int, seed: int, scale: float, device: str = "auto") -> pd.DataFrame:
    """Rule lora_synthesize: images per label from Stable Diffusion with the trained LoRA adapter
    (histosynth.generators.lora) at LoRA weight `scale`, prompt per label, Euler ancestral
    sampling; image i from seed derive_seed(seed, 'lora', i), the same at every scale so the sets
    pair image for image; resized to the patch size `size`; no masks (write_label_set; the manifest
    records adapter and base model paths and hashes, prompt, scale, steps and guidance).
    `settings` is the `synthesis` config section (its lora, batch_size and grid_per_class)."""
    from histosynth.device import pick_device
    from histosynth.generators.datasets import read_indexes
    from histosynth.generators.lora import load_pipeline, sample

    s = section_defaults("synthesis", settings)
    draw_settings = s["lora"]
    pipe, meta = load_pipeline(adapter, pick_device(device))
    if list(meta["labels"]) != list(labels["classes"]):
        raise SynthesisError(f"the LoRA adapter at {adapter} was trained on the labels {meta['labels']}, this run's are "
                             f"{labels['classes']}; retrain it (rule train_lora)")
    prompts = meta["prompts"]
    counts = class_counts(draw_settings["n"], draw_settings["per_class"], labels)
    names = [name for name, count in counts.items() for _ in range(count)]
    seeds = [derive_seed(seed, "lora", i) for i in range(len(names))]
    path, digest = model_record(adapter)
    log.info("lora_synthesize: %d images at LoRA scale %s, %d px resized to %d px, %d Euler ancestral steps, guidance %s",
             len(names), scale, meta["resolution"], size, draw_settings["steps"], draw_settings["guidance"])

    def draw(batch_names, batch_seeds):
        return sample(pipe, [prompts[name] for name in batch_names], batch_seeds, size=meta["resolution"],
                      steps=draw_settings["steps"], guidance=draw_settings["guidance"],
                      negative_prompt=draw_settings["negative_prompt"], scale=scale)

    record = {"model_path": path, "model_hash": digest, "base_model": meta["base_model"], "base_hash": meta["base_hash"],
              "lora_scale": float(scale), "sampler": "euler_ancestral", "steps": draw_settings["steps"],
              "guidance": draw_settings["guidance"], "negative_prompt": draw_settings["negative_prompt"]}
    return write_label_set(out_dir, lora_set(scale), names, seeds, draw, labels=labels, real=read_indexes(indexes, "train"),
                           size=size, batch_size=s["batch_size"], grid_per_class=s["grid_per_class"], record=record,
                           per_label={name: {"prompt": prompts[name]} for name in counts})


def run_stage(mode: str, model_path: str | Path, indexes: Sequence[str | Path], out_dir: str | Path, *,
              settings: Mapping, classes: Sequence[str], labels: Mapping, conditioning_cfg: Mapping, seed: int,
              autoencoder: str | Path | None = None, device: str = "auto", split: str = "train") -> pd.DataFrame:
    """The rules' entry: load the model, read the `split` rows of the conditioning indexes and run
    `mode` ('synth' | 'inpaint') with the `synthesis` config section `settings` and the resolved
    `labels` (histosynth.data.labels.resolve_labels)."""
    from histosynth.device import pick_device
    from histosynth.generators.datasets import read_indexes
    from histosynth.generators.diffusion import load_diffusion

    if mode not in MODES:
        raise SynthesisError(f"mode must be one of {MODES}, got {mode!r}")
    s = section_defaults("synthesis", settings)
    diffusion = load_diffusion(model_path, autoencoder=autoencoder, device=pick_device(device))
    sources = read_indexes(indexes, split)
    if sources.empty:
        raise SynthesisError(f"no {split!r} patches in the conditioning indexes {[str(p) for p in indexes]}")
    common = dict(classes=classes, labels=labels, conditioning_cfg=conditioning_cfg, batch_size=s["batch_size"], seed=seed,
                  model_path=model_path, grid_per_class=s["grid_per_class"])
    if mode == "synth":
        return synthesize(diffusion, sources, out_dir, **s["synthesize"], **common)
    return inpaint(diffusion, sources, out_dir, **s["inpaint"], **common)
