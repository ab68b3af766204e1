"""The report's figures of image quality: every set's distribution metrics side by side, and per
label (the seeds' per-class table)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from histosynth.evaluation.figures import GROUP_WIDTH, bar_offset, plt, save_figure, wrap
from histosynth.evaluation.report_tables import QUALITY_METRICS

PER_CLASS_METRICS = (
    "c2st_auc",
    "fd",
    "kd",
    "fid",
    "kid",
    "is",
)  # the seeds' per-class table (000 Table 5: FID and IS per class)


def plot_quality_per_class(quality: pd.DataFrame, out: str | Path) -> Path:
    """The synthetic sets side by side per label (e.g. the GAN against the diffusion sets, as seed
    000's Table 5): one panel per distribution metric that was computed, grouped bars per class
    ('all' first), one bar per set; lower is better for FD/KD/FID/KID, higher for IS. Without any
    computed metric, a panel says why (the skip notes)."""
    ok = quality[(quality["status"] == "ok") & quality["metric"].isin(PER_CLASS_METRICS)]
    metrics = [m for m in PER_CLASS_METRICS if m in set(ok["metric"])]
    classes = ["all", *[c for c in dict.fromkeys(ok["class"]) if c != "all"]]
    fig, axes = plt.subplots(
        1, max(1, len(metrics)), figsize=(max(6.0, 0.9 * len(classes) * max(1, len(metrics)) + 2), 3.6), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics):
        wide = (
            ok[ok["metric"] == metric]
            .pivot_table(index="class", columns="set", values="value", sort=False)
            .reindex(classes)
        )
        x = np.arange(len(wide))
        for k, name in enumerate(wide.columns):
            ax.bar(
                x + bar_offset(k, len(wide.columns)),
                wide[name],
                GROUP_WIDTH / len(wide.columns),
                label=name,
                color=f"C{k}",
            )
        better = "higher" if metric == "is" else "nearer 0.5" if metric == "c2st_auc" else "lower"
        space = ok.loc[ok["metric"] == metric, "extractor"].iloc[0] if "extractor" in ok else ""
        ax.set_title(
            f"{metric} ({better} is better)" + (f"\n{wrap(_short_extractor(space), 32)}" if space else ""), fontsize=9
        )
        ax.set_xticks(x, wide.index, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    if not metrics:
        axes[0][0].axis("off")
        notes = sorted(set(quality.loc[quality["metric"].isin(PER_CLASS_METRICS), "note"].dropna()))
        axes[0][0].text(
            0,
            0.5,
            "no per-class distribution metric computed:\n" + "\n".join(wrap(n, 90) for n in notes),
            fontsize=8,
            va="center",
        )
    fig.suptitle("Synthetic sets per class against the real training patches", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_quality(quality: pd.DataFrame, out: str | Path, scores: pd.DataFrame | None = None) -> Path:
    """Top row: one panel per image-quality metric that was computed (offline FD/KD and feature
    diversity, FID, KID, IS, LPIPS diversity; class 'all', one bar per synthetic set, the feature
    space in the title) and one of mask consistency (pooled Dice of the re-segmented region classes
    and of the re-detected nuclei against the conditioning masks, per class and set). With the
    per-image `scores`, a second row shows each class's per-image Dice as box plots per set.
    Metrics that were skipped are listed under the panels with the reason."""
    ok = quality[quality["status"] == "ok"]
    overall = ok[(ok["class"] == "all") & ok["metric"].isin(QUALITY_METRICS)]
    metrics = [m for m in QUALITY_METRICS if m in set(overall["metric"])]
    consistency = ok[ok["metric"].isin(["mask_dice", "nuclei_dice"])]
    c2st = ok[(ok["class"] == "all") & ok["metric"].isin(["c2st_auc", "c2st_low", "c2st_high"])]
    c2st = c2st.pivot_table(index="set", columns="metric", values="value", sort=False) if len(c2st) else None
    per_image = scores.dropna(subset=["dice"]) if scores is not None and len(scores) else None
    panels = (1 if c2st is not None else 0) + len(metrics) + (1 if len(consistency) else 0)
    width = 2.8 * (len(metrics) + (c2st is not None)) + (
        1.2 + 0.5 * consistency["class"].nunique() if len(consistency) else 0
    )
    rows = 2 if per_image is not None and len(per_image) else 1
    fig, grid = plt.subplots(rows, max(1, panels), figsize=(max(6.0, width), 3.4 * rows), squeeze=False)
    axes = grid
    if c2st is not None:
        ax, axes = axes[0][0], axes[:, 1:]
        x = np.arange(len(c2st))
        ax.bar(x, c2st["c2st_auc"] - 0.5, bottom=0.5, color="C1")
        ax.errorbar(
            x,
            c2st["c2st_auc"],
            yerr=[c2st["c2st_auc"] - c2st["c2st_low"], c2st["c2st_high"] - c2st["c2st_auc"]],
            fmt="none",
            color="black",
            capsize=4,
        )
        ax.axhline(0.5, color="0.3", ls="--", lw=1)
        ax.set_xticks(x, c2st.index.astype(str))
        ax.set_ylim(0.3, 1.02)
        ax.set_title("C2ST AUC: real vs synthetic\n(0.5 = indistinguishable; 95 % interval)", fontsize=9)
    for ax, metric in zip(axes[0], metrics, strict=False):
        part = overall[overall["metric"] == metric]
        ax.bar(part["set"].astype(str), part["value"])
        space = part["extractor"].iloc[0] if "extractor" in part and len(part) else ""
        ax.set_title(f"{metric}\n{wrap(_short_extractor(space), 28)}" if space else metric, fontsize=9)
    if len(consistency):
        ax = axes[0][len(metrics)]
        wide = consistency.pivot_table(index="class", columns="set", values="value", sort=False)
        x = np.arange(len(wide))
        for k, name in enumerate(wide.columns):
            ax.bar(x + bar_offset(k, len(wide.columns)), wide[name], GROUP_WIDTH / len(wide.columns), label=name)
        reference = ok[ok["metric"] == "mask_dice_real"].pivot_table(
            index="class", columns="set", values="value", sort=False
        )
        label = "same maps, real patches"
        for k, name in enumerate(wide.columns):
            if name in reference:
                ax.scatter(
                    x + bar_offset(k, len(wide.columns)),
                    reference[name].reindex(wide.index),
                    marker="_",
                    s=200,
                    color="black",
                    zorder=3,
                    label=label,
                )
                label = None
        ax.set_xticks(x, wide.index, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("mask consistency (pooled Dice)", fontsize=9)
        ax.legend(fontsize=8)
    if not panels:
        axes[0][0].axis("off")
    if rows == 2:
        for ax in grid[1]:
            ax.axis("off")
        ax = fig.add_subplot(2, 1, 2)
        classes = list(dict.fromkeys(per_image["class"]))
        sets = list(dict.fromkeys(per_image["set"]))
        for k, name in enumerate(sets):
            data = [
                per_image[(per_image["class"] == c) & (per_image["set"] == name)]["dice"].to_numpy() for c in classes
            ]
            where = np.arange(len(classes)) + bar_offset(k, len(sets))
            keep = [i for i, d in enumerate(data) if len(d)]
            box = ax.boxplot(
                [data[i] for i in keep],
                positions=where[keep],
                widths=0.9 * GROUP_WIDTH / len(sets),
                patch_artist=True,
                manage_ticks=False,
            )
            for patch in box["boxes"]:
                patch.set_facecolor(f"C{k}")
            ax.plot([], [], color=f"C{k}", lw=6, label=name)
        ax.set_xticks(np.arange(len(classes)), classes, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("Dice per image")
        ax.set_title("mask consistency per synthetic image (images where the class is drawn or found)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    skipped = quality[(quality["status"] == "skipped") & quality["metric"].isin(QUALITY_METRICS)]
    notes = sorted(set(skipped["note"]))
    if notes:
        fig.text(0.01, -0.02 * rows, "\n".join(wrap(n, 140) for n in notes), fontsize=7, va="top")
    return save_figure(fig, out)


def _short_extractor(name: str) -> str:
    """'segmentation encoder (u-resnet18, results/...)' -> 'segmentation encoder (u-resnet18)'."""
    return re.sub(r",\s[^,()]*\)$", ")", name)
