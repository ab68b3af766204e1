"""The memorisation audit of a curated set: its copy rates per set and per class, and a montage a
person can judge, each flagged image beside its match and its second-nearest training patch with
the measures and thresholds written under them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.data.io import read_rgb
from histosynth.evaluation.copies import eight_views
from histosynth.evaluation.curation import Reference, reason_kinds

MONTAGE_ROWS = 8  # flagged images first, then the closest kept ones
PANEL_INCHES = 2.0  # a row's height per image: each is drawn about 180 px wide at figures.DPI


def _rates(curated: pd.DataFrame, n_train: int) -> dict:
    closer = curated["closer_to_train"].dropna().astype(bool)
    return {
        "images": len(curated),
        "kept": int(curated["keep"].sum()),
        "copies": int(curated["copy"].astype(bool).sum()),
        "copy_rate": float(curated["copy"].astype(bool).mean()) if len(curated) else np.nan,
        "train_copied_share": curated["copy_of"].dropna().nunique() / n_train if n_train else np.nan,
        "closer_to_train_share": float(closer.mean()) if len(closer) else np.nan,
        **{f"rejected_{k.replace(' ', '_')}": v for k, v in reason_kinds(curated).items()},
    }


def audit(curated: pd.DataFrame, n_train: int, name: str) -> pd.DataFrame:
    """Audit rows of one curated set `name`: class 'all', then one per image class (the manifest's
    `class`): images, kept, copies, copy rate, share of the training patches copied at least once,
    share of images closer to a training patch than to any held-out real patch (NaN without a
    feature space) with, on the 'all' row, the same share for held-out real patches, and the
    rejects per reason."""
    real = curated["closer_to_train_real"].dropna()
    rows = [
        {
            "set": name,
            "class": "all",
            **_rates(curated, n_train),
            "closer_to_train_share_real": float(real.iloc[0]) if len(real) else np.nan,
        }
    ]
    if "class" in curated:
        rows += [
            {"set": name, "class": str(label), **_rates(part, n_train)} for label, part in curated.groupby("class")
        ]
    table = pd.DataFrame(rows)
    rejected = sorted(c for c in table if c.startswith("rejected_"))
    return table[[c for c in table if not c.startswith("rejected_")] + rejected].fillna({c: 0 for c in rejected})


def montage_rows(curated: pd.DataFrame, n: int = MONTAGE_ROWS) -> pd.DataFrame:
    """The images the montage shows: the flagged copies (most similar first), then the most similar
    images not flagged, n in all."""
    scored = curated.dropna(subset=["similarity", "nearest_patch"])
    copies = scored["copy"].astype(bool)
    order = lambda part: part.sort_values("similarity", ascending=False)  # noqa: E731
    return pd.concat([order(scored[copies]), order(scored[~copies])]).head(n)


def _caption(row: dict, which: str) -> str:
    """The text under one montage image: the verdict and both measures against their thresholds
    under the synthetic image, the patch and its similarity under a training patch."""
    if which == "image":
        s, t_s, r, t_r = (
            row["similarity"],
            row["similarity_threshold"],
            row["relative_distance"],
            row["relative_threshold"],
        )
        return (
            f"{'COPY' if row['copy'] else 'not a copy'} ({row['calibration']} thresholds)\n"
            f"similarity {s:.2f} {'>' if s > t_s else '≤'} {t_s:.2f}\nrelative dist. {r:.2f} {'<' if r < t_r else '≥'} {t_r:.2f}"
        )
    patch, label = row[f"{which}_patch"], "nearest" if which == "nearest" else "2nd nearest"
    similarity = row["similarity"] if which == "nearest" else row["second_similarity"]
    return f"{label}: {patch}\nsimilarity {similarity:.2f}" if patch is not None else f"{label}: none"


def montage(curated: pd.DataFrame, reference: Reference, n: int = MONTAGE_ROWS):
    """A matplotlib figure: per row (montage_rows) the synthetic image in the flip/rotation that
    matched (inpainted images as they are: compared in place), its nearest and its second-nearest
    training patch, each with its measures; copies titled red."""
    from histosynth.evaluation.figures import plt

    rows = montage_rows(curated, n)
    index = {pid: i for i, pid in enumerate(reference.train["patch_id"].astype(str))}
    figure, axes = plt.subplots(
        max(len(rows), 1), 3, figsize=(3 * PANEL_INCHES + 0.4, max(len(rows), 1) * (PANEL_INCHES + 0.7)), squeeze=False
    )
    for ax in axes.flat:
        ax.set_axis_off()
    if rows.empty:
        axes[0, 0].text(0, 0.5, "no synthetic image was scored", fontsize=10)
    for ax, row in zip(axes, rows.to_dict("records"), strict=False):
        image = read_rgb(row["image"])
        if pd.isna(row.get("donor_patch_id")):
            image = eight_views(image[None])[int(row["nearest_view"]), 0]
        panels = [(image, f"{row['id']}" + (f" ({row['class']})" if "class" in row else ""), _caption(row, "image"))]
        for which in ("nearest", "second"):
            patch = row[f"{which}_patch"]
            pixels = reference.train_pixels[index[patch]] if patch is not None else np.full_like(image, 255)
            panels.append((pixels, "", _caption(row, which)))
        for axis, (pixels, title, text) in zip(ax, panels, strict=True):
            axis.imshow(pixels, interpolation="nearest")
            axis.set_title(title, fontsize=8, color="#c81e1e" if row["copy"] else "black")
            axis.text(
                0.5,
                -0.03,
                text,
                transform=axis.transAxes,
                ha="center",
                va="top",
                fontsize=8,
                color="#c81e1e" if row["copy"] and title else "black",
            )
    figure.suptitle("synthetic image (in the view that matched) | nearest training patch | 2nd nearest", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.25 / figure.get_figheight()))
    return figure


def write_montage(curated: pd.DataFrame, reference: Reference, path: str | Path) -> Path:
    """Save the montage as a PNG at `path` (histosynth.evaluation.figures.save_figure)."""
    from histosynth.evaluation.figures import save_figure

    return save_figure(montage(curated, reference), path)
