"""The report's figures of the task results: metrics per ratio, confusion matrices, the verdict's
forest plot, loss curves and the class share of the mixed training sets."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from histosynth.evaluation.figures import plt, ratio_order, save_figure, wrap
from histosynth.evaluation.report_tables import SEGMENTATION_METRICS, seed_summary

METRIC_TITLES = {
    "dice": "Dice",
    "f1": "F1 (macro: all)",
    "auroc": "AUROC (one-vs-rest)",
    "balanced_accuracy": "Balanced accuracy",
}


def plot_metrics(
    scores: pd.DataFrame,
    out: str | Path,
    order: Sequence[str] | None = None,
    amounts: Mapping[str, int] | None = None,
    metrics: Sequence[str] = SEGMENTATION_METRICS,
) -> Path:
    """Task metrics (pooled over test slides; segmentation's Dice, precision and recall by default)
    per ratio: mean +- sd over runs, one line per class (the same colour in every panel; 'all',
    the macro or micro score, in black), one panel per metric; ratios in config order, labelled
    with their synthetic count."""
    summary = seed_summary(scores, order)
    ratios = ratio_order(summary["ratio"], order)
    names = [c for c in dict.fromkeys(summary["class"]) if c != "all"]
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)} | {"all": "black"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False, sharey=True)
    x = np.arange(len(ratios))
    for ax, metric in zip(axes[0], metrics, strict=True):
        part = summary[summary["metric"] == metric]
        for name, group in part.groupby("class", sort=False):
            g = group.set_index("ratio").reindex(ratios)
            ax.errorbar(
                x,
                g["mean"],
                yerr=g["sd"].fillna(0),
                marker="o",
                capsize=3,
                label=name,
                color=colours[name],
                lw=2.2 if name == "all" else 1.4,
            )
        ax.set_title(METRIC_TITLES.get(metric, metric.replace("_", " ").capitalize()))
        ax.set_xticks(x, [f"{r}\n({amounts[r]})" if amounts and r in amounts else r for r in ratios], fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (mean ± sd over runs)")
    handles = [
        plt.Line2D([], [], color=colour, marker="o", label=name)
        for name, colour in colours.items()
        if name in set(summary["class"])
    ]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    fig.supxlabel("training set (synthetic images)" if amounts else "training set", y=-0.04)
    return save_figure(fig, out)


def plot_confusions(
    predictions: pd.DataFrame, class_names: Sequence[str], out: str | Path, order: Sequence[str] | None = None
) -> Path:
    """One confusion matrix per ratio, summed over its runs (folds x seeds) on the test slides:
    counts in the cells, colour the row-normalised share (recall of each true class)."""
    from histosynth.evaluation.classification_metrics import confusion

    ratios = ratio_order(predictions["ratio"], order)
    n = len(class_names)
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(0.55 * n * len(ratios) + 1.8 * len(ratios), 0.55 * n + 1.8), squeeze=False
    )
    for ax, ratio in zip(axes[0], ratios, strict=True):
        rows = predictions[predictions["ratio"] == ratio]
        matrix = confusion(rows["true"].to_numpy(), rows["pred"].to_numpy(), n)
        share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(
                j, i, str(count), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black"
            )
        ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n), class_names if ax is axes[0][0] else [""] * n, fontsize=7)
        ax.set_title(f"{ratio} ({rows[['fold', 'seed']].drop_duplicates().shape[0]} runs)", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true class", fontsize=8)
    fig.suptitle("Test-slide confusion matrices (colour: share of the true class)", fontsize=10)
    return save_figure(fig, out)


ADJUSTMENTS = {"holm": "Holm", "bh": "Benjamini-Hochberg"}
VERDICT_COLOURS = {"helped": "#1a9850", "hurt": "#d73027", "no evidence": "#7f7f7f"}


def _forest(ax, rows: pd.DataFrame, labels: Sequence[str], *, band: bool) -> None:
    """Rows as a forest: the difference with its interval (thick, coloured by the word), the
    seed-only t interval (thin grey), the no-effect line and, with band, the detectable-effect band."""
    y = {label: i for i, label in enumerate(labels)}
    for row, label in zip(rows.to_dict("records"), rows["label"], strict=True):
        i, colour = y[label], VERDICT_COLOURS[row["verdict"]]
        if band and not math.isnan(row["mde"]):
            ax.fill_betweenx([i - 0.4, i + 0.4], -row["mde"], row["mde"], color="#cccccc", alpha=0.5, lw=0)
        ax.plot([row["t_low"], row["t_high"]], [i + 0.18, i + 0.18], color="#888888", lw=1)
        ax.errorbar(
            row["mean_diff"],
            i,
            xerr=[[row["mean_diff"] - row["ci_low"]], [row["ci_high"] - row["mean_diff"]]]
            if not math.isnan(row["ci_low"])
            else None,
            fmt="o",
            color=colour,
            capsize=3,
            lw=2,
        )
    ax.axvline(0, color="black", lw=0.8)
    low = min(-0.05, np.nanmin(rows[["ci_low", "t_low", "mean_diff"]].to_numpy(float), initial=0) * 1.1)
    high = max(0.05, np.nanmax(rows[["ci_high", "t_high", "mean_diff"]].to_numpy(float), initial=0) * 1.1)
    ax.set_xlim(max(low, -1.05), min(high, 1.05))  # a difference of these metrics lies in [-1, 1]
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)


def plot_verdict(table: pd.DataFrame, out: str | Path, answer: str = "", adjustment: str = "holm") -> Path:
    """The verdict at a glance. First panel: the primary endpoint alone, one row per ratio (and its
    synthetic sources): the difference to the baseline with its interval over seeds and test images,
    the seed-only t interval (thin grey), the detectable-effect band (grey) and the word; titled by
    `answer`. Below, per task a row of panels (one per metric) of the secondary rows, class x ratio,
    coloured by their word from the `adjustment` (holm or bh) adjusted p."""
    table = table.assign(
        label=[f"{r} ({s})" if s else r for r, s in zip(table["ratio"], table["sources"].fillna(""), strict=True)]
    )
    primary, secondary = table[table["endpoint"] == "primary"], table[table["endpoint"] == "secondary"]
    tasks = list(dict.fromkeys(secondary["task"]))
    width = max([len(dict.fromkeys(secondary.loc[secondary["task"] == t, "metric"])) for t in tasks] + [1])
    heights = [0.45 * max(len(primary), 2) + 1.4] + [
        0.3 * max(secondary.loc[secondary["task"] == t, ["class", "ratio"]].drop_duplicates().shape[0], 3) + 1.0
        for t in tasks
    ]
    fig = plt.figure(figsize=(max(3.6 * width + 1.8, 9), sum(heights) + 0.6), layout="constrained")
    subs = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    ax = subs[0].subplots(1, 1)
    if len(primary):
        first = primary.iloc[0]
        _forest(ax, primary, list(primary["label"]), band=True)
        for i, row in enumerate(primary.to_dict("records")):
            ax.annotate(
                row["verdict"],
                (1.01, i),
                xycoords=("axes fraction", "data"),
                va="center",
                fontsize=9,
                color=VERDICT_COLOURS[row["verdict"]],
                weight="bold",
            )
        ax.set_title(
            f"Primary endpoint, {first['task']} {METRIC_TITLES.get(first['metric'], first['metric'])}"
            f"{'' if first['class'] == 'all' else ' of ' + first['class']}: ratio − {first['baseline']} "
            f"(interval over {first['n']} runs and {first['units']} test {first['unit']}; grey band: detectable effect)",
            fontsize=8,
        )
    else:
        ax.axis("off")
    subs[0].suptitle(wrap(answer or "Primary endpoint", 150), fontsize=10, x=0.02, ha="left")
    for sub, task in zip(subs[1:], tasks, strict=True):
        part = secondary[secondary["task"] == task].assign(label=lambda t: t["class"] + " · " + t["label"])
        metrics = list(dict.fromkeys(part["metric"]))
        labels = list(dict.fromkeys(part["label"]))
        axes = sub.subplots(1, width, squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            _forest(ax, part[part["metric"] == metric], labels, band=False)
            ax.set_title(f"{METRIC_TITLES.get(metric, metric)}: ratio − {part['baseline'].iloc[0]}", fontsize=9)
        for ax in axes[1 : len(metrics)]:
            ax.set_yticklabels([])
        for ax in axes[len(metrics) :]:
            ax.set_visible(False)
        sub.suptitle(
            f"{task}, secondary: paired by {part['paired_by'].iloc[0]}, {int(part['n'].max())} runs; words from "
            f"{ADJUSTMENTS[adjustment]}-adjusted p",
            fontsize=9,
            x=0.02,
            ha="left",
        )
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=w) for w, c in VERDICT_COLOURS.items()]
    handles.append(plt.Line2D([], [], color="#888888", lw=1, label="seed-only t interval"))
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)
    return save_figure(fig, out)


LOSS_SERIES = (
    ("train_loss", "train"),
    ("loss", "loss"),
    ("val_loss", "validation"),
    ("d_loss", "discriminator"),
    ("g_loss", "generator"),
)
FIDELITY_SERIES = ("fd", "kd", "fid", "kid")  # a generator's fidelity during training (generators.monitor)


def plot_loss_curve(csv_path: str | Path, out: str | Path, title: str | None = None) -> Path:
    """The losses of one training (its loss.csv) against optimiser steps: train (or the single
    `loss`) and validation, or discriminator and generator (a GAN); beside them, a panel per
    fidelity metric logged during training (FD/KD, FID/KID)."""
    table = pd.read_csv(csv_path)
    x = table["step"] if "step" in table else pd.Series(np.arange(1, len(table) + 1))
    present = lambda column: column in table and table[column].notna().any()  # noqa: E731
    # a GAN's `loss` is its discriminator's (training.fit: the first update's), drawn once as d_loss
    losses = [(c, label) for c, label in LOSS_SERIES if present(c) and not (c == "loss" and present("d_loss"))]
    fidelity = [c for c in FIDELITY_SERIES if present(c)]
    fig, axes = plt.subplots(1, 1 + len(fidelity), figsize=(5 + 2.8 * len(fidelity), 3.4), squeeze=False)
    ax = axes[0][0]
    for column, label in losses:
        ax.plot(x, table[column], marker="." if len(table) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or Path(csv_path).parent.name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax, column in zip(axes[0][1:], fidelity):
        rows = table[column].notna()
        ax.plot(x[rows], table.loc[rows, column], marker=".", color="C3")
        ax.set_xlabel("step")
        ax.set_title(f"{column} vs training images (lower is better)", fontsize=9)
        ax.grid(alpha=0.3)
    return save_figure(fig, out)


def plot_loss_curves(
    csv_paths: Sequence[str | Path], out_dir: str | Path, names: Sequence[str] | None = None
) -> list[Path]:
    """One loss-curve PNG per training, named after `names` (default: the CSV's folder)."""
    out_dir = Path(out_dir)
    names = list(names) if names else [Path(p).parent.name for p in csv_paths]
    return [plot_loss_curve(p, out_dir / f"{n}.png", title=n) for p, n in zip(csv_paths, names, strict=True)]


def plot_class_share(shares: pd.DataFrame, out: str | Path, order: Sequence[str] | None = None) -> Path:
    """Stacked bars: the pixel share of each class per mixed training set (thesis Table 6.1)."""
    ratios = ratio_order(shares["ratio"], order)
    wide = shares.pivot_table(index="ratio", columns="class", values="share", sort=False).reindex(ratios)
    fig, ax = plt.subplots(figsize=(1.2 * len(ratios) + 2.5, 3.6))
    bottom = np.zeros(len(ratios))
    for name in wide.columns:
        values = wide[name].fillna(0).to_numpy()
        ax.bar(ratios, 100 * values, bottom=100 * bottom, label=name)
        bottom += values
    ax.set_ylabel("% of training pixels")
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.tick_params(axis="x", labelsize=8)
    return save_figure(fig, out)
