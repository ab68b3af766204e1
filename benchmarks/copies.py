"""Benchmark (not a test): the copy test of curation (histosynth.evaluation.copies) on planted copies.

Held-out real patches are split in two: one half calibrates the thresholds, as the validation
slides do in the workflow; the other half are genuine real images never trained on ("fresh").
Among the fresh ones, copies of random training patches are planted, of each kind: exact, flipped
or rotated, shifted by a few pixels, JPEG-recompressed, colour-jittered and partially inpainted
(a square of about a third of the patch replaced by another patch's pixels). Printed: per kind,
recall (share of its copies flagged with the right copy_of) and precision (right flags over all
flags, among its copies and as many genuine images: false flags = the copies flagged with a wrong
source + the fresh images' false-positive rate x the number of copies); per class, the
false-positive rate on the fresh images. Written as CSV to --out.

    .venv/bin/python benchmarks/copies.py --index results/patches/*.parquet   # a run's patches
    .venv/bin/python benchmarks/copies.py --tiles DIR --size 64 --downsample 2  # image tiles cut up
    .venv/bin/python benchmarks/copies.py --tiny                              # drawn images, seconds
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from histosynth.config import section_defaults
from histosynth.evaluation.copies import eight_views, find_copies

KINDS = ("exact", "flip", "shift", "jpeg", "colour", "inpaint")


def plant(kind: str, source: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of `source` (H, W, 3 uint8) of one KINDS kind; `other` fills an inpainted part."""
    side = source.shape[0]
    if kind == "exact":
        return source.copy()
    if kind == "flip":
        return eight_views(source[None])[rng.integers(1, 8), 0].copy()
    if kind == "shift":
        dy, dx = rng.choice([-3, -2, 2, 3], 2)
        padded = np.pad(source, ((3, 3), (3, 3), (0, 0)), mode="reflect")
        return padded[3 + dy : 3 + dy + side, 3 + dx : 3 + dx + side].copy()
    if kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(source).save(buffer, format="JPEG", quality=60)
        return np.asarray(Image.open(buffer).convert("RGB"))
    if kind == "colour":
        gain, offset = rng.uniform(0.85, 1.15, 3), rng.uniform(-15, 15, 3)
        return np.clip(source * gain + offset, 0, 255).astype(np.uint8)
    if kind == "inpaint":
        out, part = source.copy(), int(round(side * 0.55))
        y, x = rng.integers(0, side - part + 1, 2)
        out[y : y + part, x : x + part] = other[y : y + part, x : x + part]
        return out
    raise ValueError(f"unknown copy kind {kind!r}; one of {KINDS}")


def tissue(rng: np.random.Generator, n: int, side: int = 32) -> np.ndarray:
    """(n, side, side, 3) uint8 smooth random textures, each distinct."""
    from scipy import ndimage as ndi

    smooth = ndi.gaussian_filter(rng.normal(size=(n, side, side, 3)), (0, 1.5, 1.5, 0))
    return np.clip(150 + 50 * (smooth - smooth.mean()) / smooth.std(), 0, 255).astype(np.uint8)


def nuclei(rng: np.random.Generator, n: int, side: int = 32) -> np.ndarray:
    """(n, side, side, 3) uint8 drawings of packed round nuclei on pink stroma: a uniform class,
    every drawing different but all alike."""
    from skimage.draw import disk

    out = np.empty((n, side, side, 3), np.uint8)
    for i in range(n):
        image = np.array([225.0, 180, 210]) + rng.normal(0, 6, (side, side, 3))
        for _ in range(side * side // 70):
            rows, cols = disk(rng.uniform(0, side, 2), rng.uniform(2.5, 4), shape=(side, side))
            image[rows, cols] = np.array([90, 50, 140]) + rng.normal(0, 10, 3)
        out[i] = np.clip(image, 0, 255)
    return out


def tiny_patches(seed: int = 0, n: int = 40, side: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train pixels, train classes, held-out pixels, held-out classes): n drawn textures and n drawn
    nuclei patches for training, twice as many of each held out."""
    rng = np.random.default_rng(seed)
    train = np.concatenate([tissue(rng, n, side), nuclei(rng, n, side)])
    heldout = np.concatenate([tissue(rng, 2 * n, side), nuclei(rng, 2 * n, side)])
    return train, np.repeat(["texture", "nuclei"], n), heldout, np.repeat(["texture", "nuclei"], 2 * n)


def index_patches(indexes, config: str | None) -> tuple[np.ndarray, ...]:
    """A run's patches (patch indexes, split train / val), labelled as the config's labels say."""
    from histosynth.config import load_config
    from histosynth.data.io import read_patch_index, read_rgb
    from histosynth.data.labels import patch_labels, run_labels

    real = pd.concat([read_patch_index(p) for p in indexes], ignore_index=True)
    labels = run_labels(load_config(config) if config else load_config(), [])
    real["class"] = patch_labels(real, labels)
    parts = [real[real["split"] == split] for split in ("train", "val")]
    return tuple(
        x for part in parts for x in (np.stack([read_rgb(p) for p in part["image"]]), part["class"].to_numpy())
    )


def tile_patches(folder: str | Path, size: int, downsample: int) -> tuple[np.ndarray, ...]:
    """Image tiles (PNG/TIFF) reduced `downsample` times and cut into size px patches: the first half
    of the tiles train, the rest held out; a patch's class is its tile's name."""
    tiles = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff", ".jpg"))
    out = []
    for path in tiles:
        image = Image.open(path).convert("RGB")
        image = np.asarray(image.resize((image.width // downsample, image.height // downsample), Image.LANCZOS))
        out.append(
            np.stack(
                [
                    image[y : y + size, x : x + size]
                    for y in range(0, image.shape[0] - size + 1, size)
                    for x in range(0, image.shape[1] - size + 1, size)
                ]
            )
        )
    half = len(tiles) // 2
    classes = [np.full(len(p), path.stem[:12]) for p, path in zip(out, tiles, strict=True)]
    return (
        np.concatenate(out[:half]),
        np.concatenate(classes[:half]),
        np.concatenate(out[half:]),
        np.concatenate(classes[half:]),
    )


def run(
    train: np.ndarray, heldout: np.ndarray, heldout_classes: np.ndarray, *, per_kind: int, settings: dict, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The copy test on planted copies (per_kind of each KINDS kind) among half of the held-out
    patches, calibrated on the other half: (the judged images with kind, source and the test's
    columns; the table of recall/precision per kind and false-positive rate per class)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(heldout))
    calibrate, fresh = order[::2], order[1::2]
    sources = rng.choice(len(train), per_kind * len(KINDS), replace=len(train) < per_kind * len(KINDS))
    fills = rng.choice(fresh, len(sources))
    kinds = np.repeat(KINDS, per_kind)
    planted = np.stack([plant(k, train[s], heldout[f], rng) for k, s, f in zip(kinds, sources, fills, strict=True)])
    images = np.concatenate([heldout[fresh], planted])
    judged = pd.DataFrame(
        {
            "kind": ["fresh"] * len(fresh) + list(kinds),
            "source": [-1] * len(fresh) + list(sources),
            "class": list(heldout_classes[fresh]) + ["planted"] * len(planted),
        }
    )
    found = find_copies(
        images,
        train,
        heldout[calibrate],
        classes=judged["class"].to_numpy(),
        heldout_classes=heldout_classes[calibrate],
        settings=settings,
    )
    judged["copy"], judged["nearest"] = found["copy"], found["matches"].index[:, 0]
    judged["similarity"], judged["relative_distance"] = found["similarity"], found["relative_distance"]
    judged["right"] = judged["copy"] & (judged["nearest"] == judged["source"])
    false_rate = judged.loc[judged["kind"] == "fresh", "copy"].mean()
    rows = []
    for kind in KINDS:
        part = judged[judged["kind"] == kind]
        flagged = part["copy"].sum() + false_rate * len(part)  # as many genuine images as copies
        rows.append(
            {
                "measure": "copy kind",
                "name": kind,
                "n": len(part),
                "recall": part["right"].mean(),
                "precision": part["right"].sum() / flagged if flagged else np.nan,
            }
        )
    for name, part in judged[judged["kind"] == "fresh"].groupby("class"):
        rows.append(
            {"measure": "fresh real class", "name": name, "n": len(part), "false_positive_rate": part["copy"].mean()}
        )
    return judged, pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", nargs="+", help="patch index parquet files (split train / val)")
    source.add_argument("--tiles", help="a folder of image tiles, cut into patches")
    source.add_argument("--tiny", action="store_true", help="drawn textures and nuclei (seconds)")
    parser.add_argument("--config", help="config of the run whose --index is given (its labels and classes)")
    parser.add_argument("--size", type=int, default=64, help="--tiles: patch side")
    parser.add_argument("--downsample", type=int, default=1, help="--tiles: reduce tiles this many times first")
    parser.add_argument("--per-kind", type=int, default=20, help="planted copies of each kind")
    parser.add_argument("--copy-quantile", type=float, help="curation.copy_quantile (default: the schema's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="CSV of the table")
    args = parser.parse_args(argv)
    if args.tiny:
        train, _, heldout, classes = tiny_patches(args.seed)
    elif args.tiles:
        train, _, heldout, classes = tile_patches(args.tiles, args.size, args.downsample)
    else:
        train, _, heldout, classes = index_patches(args.index, args.config)
    overrides = {} if args.copy_quantile is None else {"copy_quantile": args.copy_quantile}
    settings = section_defaults("curation", overrides)
    _, table = run(train, heldout, classes, per_kind=args.per_kind, settings=settings, seed=args.seed)
    print(
        f"{len(train)} training, {len(heldout)} held-out patches ({len(heldout) - len(heldout) // 2} fresh), "
        f"copy_quantile {settings['copy_quantile']}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
