"""A synthetic set's files: its images (with masks and conditioning maps for the diffusion model's
sets), the manifest (one row per image: paths relative to the set's folder, `class` the image's
label and `label` its class index, histosynth.data.labels; provenance: model path and hash, seed,
sampler) and the comparison grids grid_<class>.png (rows: real patch, conditioning preview,
synthetic patch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from histosynth.data.io import read_rgb, write_png, write_table
from histosynth.data.labels import label_index
from histosynth.data.patches import class_indices, fraction_column, fraction_columns
from histosynth.files import content_hash
from histosynth.generators.table import MANIFEST
from histosynth.nuclei.conditioning import preview, read_conditioning, write_conditioning
from histosynth.training.grids import save_grid

SPLIT = "synthetic"


class SynthesisError(ValueError):
    """Sources, classes or model that cannot produce the requested synthetic set."""


def to_model(pixels: np.ndarray, device) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)


def model_record(model_path: str | Path | None) -> tuple[str, str]:
    """(path, content hash) of a saved model folder for the manifest; ('', '') without one."""
    if model_path is None:
        return "", ""
    path = Path(model_path)
    return str(model_path), content_hash(path) if path.is_dir() else ""


def write_images(root: Path, image_id: str, image: np.ndarray, mask: np.ndarray, encoded: np.ndarray) -> dict:
    write_png(image, root / "images" / f"{image_id}.png")
    write_png(mask, root / "masks" / f"{image_id}.png")
    write_conditioning(encoded, root / "conditioning" / f"{image_id}.png")
    return {
        "image": f"images/{image_id}.png",
        "mask": f"masks/{image_id}.png",
        "conditioning": f"conditioning/{image_id}.png",
    }


def _manifest(rows: list[dict], labels: Mapping) -> pd.DataFrame:
    manifest = pd.DataFrame(rows)
    manifest.insert(manifest.columns.get_loc("created_at"), "label", label_index(manifest["class"], labels))
    for column in ("jump_length", "jump_n_sample"):
        manifest[column] = manifest[column].astype("Int64")
    manifest["split"] = SPLIT
    return manifest


def manifest_row(
    image_id: str,
    mode: str,
    paths: dict,
    record: tuple[str, str],
    runner,
    sampler: str,
    steps: int,
    guidance: float,
    strength: float,
    seed: int,
    source: pd.Series,
    donor_id: str | None,
    target_class: str | None,
    jumps: tuple[int | None, int | None],
    mask: np.ndarray,
    classes: Sequence[str],
    class_name: str,
) -> dict:
    """One manifest row of the diffusion model's sets; `runner` the sampling model (its space and autoencoder hash)."""
    return {
        "id": image_id,
        **paths,
        "mode": mode,
        "class": class_name,
        "model_path": record[0],
        "model_hash": record[1],
        "space": runner.space,
        "sampler": sampler,
        "steps": int(steps),
        "guidance": float(guidance),
        "strength": float(strength),
        "seed": int(seed),
        "source_patch_id": str(source["patch_id"]),
        "donor_patch_id": donor_id,
        "target_class": target_class,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **fraction_columns(mask, class_indices(classes)),
        "source_slide": str(source.get("slide", "")),
        "jump_length": jumps[0],
        "jump_n_sample": jumps[1],
        "autoencoder_hash": runner.autoencoder_hash,
    }


def finish(tmp: Path, rows: list[dict], labels: Mapping, sources: pd.DataFrame, grid_per_class: int) -> pd.DataFrame:
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
    as_tensor = lambda arrays: to_model(np.stack(arrays), "cpu")  # noqa: E731
    real = as_tensor([read_rgb(images[pid]) for pid in manifest["source_patch_id"]])
    maps = as_tensor([preview(read_conditioning(root / p)) for p in manifest["conditioning"]])
    synthetic = as_tensor([read_rgb(root / p) for p in manifest["image"]])
    return save_grid([real, maps, synthetic], path)


def grid_name(class_name: str) -> str:
    return f"grid_{fraction_column(class_name)[5:]}.png"


def class_grids(
    manifest: pd.DataFrame, root: str | Path, sources: pd.DataFrame, out_dir: str | Path, per_class: int = 8
) -> list[Path]:
    """grid_<class>.png per class (the inpainting target class, else the image's `class`), each
    with the first `per_class` images."""
    key = manifest["target_class"].where(manifest["target_class"].notna(), manifest["class"])
    return [
        comparison_grid(manifest[key == name].head(per_class), root, sources, Path(out_dir) / grid_name(name))
        for name in dict.fromkeys(key)
    ]
