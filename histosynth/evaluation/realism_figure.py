"""The realism figure of one synthetic set (rule realism): can a classifier tell it from real
patches (C2ST AUC per class with its interval), how sharp are its images (Laplacian variance per
class, real beside synthetic), how is their power spread over frequencies (radially averaged
spectra), and which of its images look least and most real to the test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.evaluation.figures import plt, save_figure

KIND_COLOURS = {"real": "0.35", "synthetic": "C1"}


def _auc_panel(ax, table: pd.DataFrame) -> None:
    wide = table[table["status"] == "ok"].pivot_table(index="class", columns="metric", values="value", sort=False)
    if "c2st_auc" not in wide:
        ax.axis("off")
        notes = sorted(set(table["note"].dropna()))
        ax.text(0, 0.5, "no two-sample test:\n" + "\n".join(notes), fontsize=8, va="center", wrap=True)
        return
    y = np.arange(len(wide))[::-1]
    ax.errorbar(
        wide["c2st_auc"],
        y,
        xerr=[wide["c2st_auc"] - wide["c2st_low"], wide["c2st_high"] - wide["c2st_auc"]],
        fmt="o",
        color="C1",
        capsize=3,
    )
    for yi, value in zip(y, wide["c2st_auc"], strict=True):
        ax.annotate(f"{value:.2f}", (value, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.axvline(0.5, color="0.3", ls="--", lw=1)
    ax.set_yticks(y, wide.index, fontsize=8)
    ax.set_xlim(0.2, 1.02)
    ax.set_xlabel("C2ST AUC (0.5 = indistinguishable)", fontsize=8)
    ax.set_title("Can a classifier tell synthetic from real?", fontsize=9)


def _sharpness_panel(ax, per_image: pd.DataFrame) -> None:
    classes = ["all", *dict.fromkeys(per_image["class"])]
    for k, kind in enumerate(("real", "synthetic")):
        part = per_image[per_image["kind"] == kind]
        data = [
            part["laplacian_variance"].to_numpy()
            if c == "all"
            else part.loc[part["class"] == c, "laplacian_variance"].to_numpy()
            for c in classes
        ]
        where = np.arange(len(classes)) + (k - 0.5) * 0.38
        keep = [i for i, d in enumerate(data) if len(d)]
        box = ax.boxplot(
            [np.maximum(data[i], 1e-3) for i in keep],
            positions=where[keep],
            widths=0.34,
            patch_artist=True,
            manage_ticks=False,
            showfliers=False,
        )
        for patch in box["boxes"]:
            patch.set_facecolor(KIND_COLOURS[kind])
        ax.plot([], [], color=KIND_COLOURS[kind], lw=6, label=kind)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(classes)), classes, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("Laplacian variance (grey, 0-255)", fontsize=8)
    ax.set_title("Sharpness (lower = blurrier)", fontsize=9)
    ax.legend(fontsize=8)


def _spectrum_panel(ax, per_image: pd.DataFrame, frequencies: Sequence[float]) -> None:
    for kind in ("real", "synthetic"):
        curves = np.stack(per_image.loc[per_image["kind"] == kind, "spectrum"].to_numpy())
        ax.plot(frequencies, np.median(curves, axis=0), color=KIND_COLOURS[kind], label=f"{kind} (median)")
        ax.fill_between(
            frequencies, *np.percentile(curves, [25, 75], axis=0), color=KIND_COLOURS[kind], alpha=0.2, lw=0
        )
    ax.axvline(0.25, color="0.3", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("spatial frequency (cycles / pixel; dashed: a quarter of sampling)", fontsize=8)
    ax.set_ylabel("power", fontsize=8)
    ax.set_title("Radially averaged power spectrum", fontsize=9)
    ax.legend(fontsize=8)


def plot_realism(
    per_image: pd.DataFrame,
    table: pd.DataFrame,
    frequencies: Sequence[float],
    out: str | Path,
    *,
    images: Mapping[str, np.ndarray],
) -> Path:
    """Three panels (C2ST AUC per class, Laplacian variance per class, power spectra) over a strip
    of the synthetic images in `images` ({id: RGB}), most realistic first, each with its
    out-of-fold probability of being synthetic. Without measures, a panel says why."""
    shown = per_image[per_image["id"].isin(list(images)) & (per_image["kind"] == "synthetic")].sort_values(
        "p_synthetic"
    )
    fig = plt.figure(figsize=(12, 7.6 if len(shown) else 3.8))
    grid = fig.add_gridspec(2 if len(shown) else 1, 3, height_ratios=[1, 0.8] if len(shown) else [1])
    _auc_panel(fig.add_subplot(grid[0, 0]), table)
    if len(per_image):
        _sharpness_panel(fig.add_subplot(grid[0, 1]), per_image)
        _spectrum_panel(fig.add_subplot(grid[0, 2]), per_image, frequencies)
    strip_axes = []
    if len(shown):
        strip = grid[1, :].subgridspec(1, len(shown), wspace=0.08)
        for k, (_, row) in enumerate(shown.iterrows()):
            ax = fig.add_subplot(strip[0, k])
            ax.imshow(images[row["id"]], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{row['class']}\np(synthetic) {row['p_synthetic']:.2f}", fontsize=7)
            strip_axes.append(ax)
    mode = table["set"].iloc[0] if len(table) else ""
    fig.suptitle(f"Realism of synthetic set {mode} against real training patches", fontsize=10)
    fig.tight_layout()
    if strip_axes:
        fig.text(
            0.5,
            strip_axes[0].get_position().y0 - 0.015,
            "Synthetic images the test found most real (left) to "
            "least real (right), by their out-of-fold probability of being synthetic",
            ha="center",
            va="top",
            fontsize=9,
        )
    return save_figure(fig, out)
