"""Remake the README's two pictures from a finished demo run (`make demo`):

    .venv/bin/python docs/make_figures.py results

docs/verdict.png is results/report/verdict.png scaled down; docs/real_vs_synthetic.png puts, per
region class, two real training patches above the synthetic images the diffusion model drew from
their conditioning maps (results/synthetic/synth/manifest.parquet names each image's source patch).
"""

import argparse
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

CELL, GAP, LEFT, TOP = 112, 4, 78, 22  # pixels: one patch, between patches, row labels, class labels
PER_CLASS = 2


def real_vs_synthetic(results: Path) -> Image.Image:
    """Two rows (real source patch, synthetic image) and PER_CLASS columns per class."""
    manifest = pd.read_parquet(results / "synthetic/synth/manifest.parquet")
    picked = manifest.sort_values("id").groupby("class", sort=True).head(PER_CLASS)
    classes = list(dict.fromkeys(picked["class"]))
    width = LEFT + len(picked) * (CELL + GAP)
    canvas = Image.new("RGB", (width, TOP + 2 * (CELL + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(["real", "synthetic"]):
        draw.text((6, TOP + row * (CELL + GAP) + CELL // 2 - 6), label, fill="black")
    column = 0
    for name in classes:
        draw.text((LEFT + column * (CELL + GAP) + 4, 5), name, fill="black")
        for item in picked[picked["class"] == name].itertuples():
            slide, patch = item.source_slide, item.source_patch_id
            real = Image.open(results / "patches" / slide / "images" / f"{patch}.png").convert("RGB")
            synthetic = Image.open(results / "synthetic/synth" / item.image).convert("RGB")
            for row, image in enumerate([real, synthetic]):
                cell = image.resize((CELL, CELL), Image.Resampling.LANCZOS)
                canvas.paste(cell, (LEFT + column * (CELL + GAP), TOP + row * (CELL + GAP)))
            column += 1
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a finished demo run's results/ folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the PNGs (default docs/)")
    args = parser.parse_args()
    verdict = Image.open(args.results / "report/verdict.png").convert("RGB")
    verdict = verdict.resize((1000, round(verdict.height * 1000 / verdict.width)), Image.Resampling.LANCZOS)
    verdict.save(args.out / "verdict.png", optimize=True)
    real_vs_synthetic(args.results).quantize(256).save(args.out / "real_vs_synthetic.png", optimize=True)  # < 300 KB
    for name in ("verdict.png", "real_vs_synthetic.png"):
        print(args.out / name, f"{(args.out / name).stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
