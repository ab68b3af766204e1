"""Report: one tidy table of every metric, the verdict (histosynth.evaluation.verdict: each ratio
against the baseline, paired by seed, with intervals and a word), the plots across ratios, the
memorisation audit of the curated sets, loss curves and class-share figures. Every plotting
function writes a PNG (matplotlib, Agg) and returns its path, so rules can flag them with report().
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from histosynth.config import baseline_ratio  # noqa: E402
from histosynth.data.io import write_csv, write_table  # noqa: E402
from histosynth.evaluation.figures import save_figure  # noqa: E402
from histosynth.evaluation.verdict import answer, sentence, verdict_table  # noqa: E402

log = logging.getLogger(__name__)

SEGMENTATION_METRICS = ("dice", "precision", "recall")
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc")  # the verdict's and the plot's
QUALITY_METRICS = ("fd", "kd", "feature_diversity", "fid", "kid", "is", "lpips_diversity")
TABLE_COLUMNS = ("kind", "ratio", "fold", "seed", "slide", "set", "class", "metric", "value", "status", "note", "extractor")
GROUP_WIDTH = 0.8  # width of a tick's group of side-by-side bars


# ----------------------------------------------------------------------------- tables

def read_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    tables = [pd.read_parquet(p) for p in paths]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def metrics_table(segmentation: pd.DataFrame, quality: pd.DataFrame | None = None,
                  classification: pd.DataFrame | None = None) -> pd.DataFrame:
    """One tidy table: task rows (kind 'segmentation' or 'classification': ratio, fold, seed,
    slide or 'all', class, metric, value) and image-quality rows (kind 'quality': set, class,
    metric, value, status, note)."""
    parts = []
    for kind, scores in (("segmentation", segmentation), ("classification", classification)):
        if scores is not None and len(scores):
            task = scores.assign(kind=kind, set=None, status="ok", note="")
            task.loc[task["value"].isna(), "status"] = "nan"
            parts.append(task.reindex(columns=TABLE_COLUMNS))
    if quality is not None and len(quality):
        parts.append(quality.assign(kind="quality", ratio=None, seed=None, slide=None).reindex(columns=TABLE_COLUMNS))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TABLE_COLUMNS)


def seed_summary(scores: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, sd and count over runs (seeds, and folds where there are) of the pooled ('all')
    scores per task, ratio, class and metric."""
    pooled = scores[scores["slide"] == "all"]
    if "task" not in pooled:
        pooled = pooled.assign(task="segmentation")
    out = (pooled.groupby(["task", "ratio", "class", "metric"], sort=False)["value"]
           .agg(mean="mean", sd=lambda v: v.std(ddof=1) if v.notna().sum() > 1 else math.nan, n="count").reset_index())
    if order:
        out["ratio"] = pd.Categorical(out["ratio"], categories=_order(out["ratio"], order), ordered=True)
        out = out.sort_values(["task", "ratio", "class", "metric"], kind="stable").reset_index(drop=True)
        out["ratio"] = out["ratio"].astype(str)
    return out


def _order(values, order: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(values))
    return [r for r in (order or []) if r in present] + [r for r in present if r not in (order or [])]


# ----------------------------------------------------------------------------- plots


METRIC_TITLES = {"dice": "Dice", "f1": "F1 (macro: all)", "auroc": "AUROC (one-vs-rest)", "balanced_accuracy": "Balanced accuracy"}


def plot_metrics(scores: pd.DataFrame, out: str | Path, order: Sequence[str] | None = None,
                 amounts: Mapping[str, int] | None = None, metrics: Sequence[str] = SEGMENTATION_METRICS) -> Path:
    """Task metrics (pooled over test slides; segmentation's Dice, precision and recall by default)
    per ratio: mean +- sd over runs, one line per class (the same colour in every panel; 'all',
    the macro or micro score, in black), one panel per metric; ratios in config order, labelled
    with their synthetic count."""
    summary = seed_summary(scores, order)
    ratios = _order(summary["ratio"], order)
    names = [c for c in dict.fromkeys(summary["class"]) if c != "all"]
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)} | {"all": "black"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False, sharey=True)
    x = np.arange(len(ratios))
    for ax, metric in zip(axes[0], metrics, strict=True):
        part = summary[summary["metric"] == metric]
        for name, group in part.groupby("class", sort=False):
            g = group.set_index("ratio").reindex(ratios)
            ax.errorbar(x, g["mean"], yerr=g["sd"].fillna(0), marker="o", capsize=3, label=name, color=colours[name],
                        lw=2.2 if name == "all" else 1.4)
        ax.set_title(METRIC_TITLES.get(metric, metric.replace("_", " ").capitalize()))
        ax.set_xticks(x, [f"{r}\n({amounts[r]})" if amounts and r in amounts else r for r in ratios], fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (mean ± sd over runs)")
    handles = [plt.Line2D([], [], color=colour, marker="o", label=name) for name, colour in colours.items()
               if name in set(summary["class"])]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    fig.supxlabel("training set (synthetic images)" if amounts else "training set", y=-0.04)
    return save_figure(fig, out)


def plot_confusions(predictions: pd.DataFrame, class_names: Sequence[str], out: str | Path,
                    order: Sequence[str] | None = None) -> Path:
    """One confusion matrix per ratio, summed over its runs (folds x seeds) on the test slides:
    counts in the cells, colour the row-normalised share (recall of each true class)."""
    from histosynth.evaluation.classification import confusion

    ratios = _order(predictions["ratio"], order)
    n = len(class_names)
    fig, axes = plt.subplots(1, len(ratios), figsize=(0.55 * n * len(ratios) + 1.8 * len(ratios), 0.55 * n + 1.8),
                             squeeze=False)
    for ax, ratio in zip(axes[0], ratios, strict=True):
        rows = predictions[predictions["ratio"] == ratio]
        matrix = confusion(rows["true"].to_numpy(), rows["pred"].to_numpy(), n)
        share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
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
        ax.errorbar(row["mean_diff"], i, xerr=[[row["mean_diff"] - row["ci_low"]], [row["ci_high"] - row["mean_diff"]]]
                    if not math.isnan(row["ci_low"]) else None, fmt="o", color=colour, capsize=3, lw=2)
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
    table = table.assign(label=[f"{r} ({s})" if s else r for r, s in zip(table["ratio"], table["sources"].fillna(""), strict=True)])
    primary, secondary = table[table["endpoint"] == "primary"], table[table["endpoint"] == "secondary"]
    tasks = list(dict.fromkeys(secondary["task"]))
    width = max([len(dict.fromkeys(secondary.loc[secondary["task"] == t, "metric"])) for t in tasks] + [1])
    heights = [0.45 * max(len(primary), 2) + 1.4] + [
        0.3 * max(secondary.loc[secondary["task"] == t, ["class", "ratio"]].drop_duplicates().shape[0], 3) + 1.0 for t in tasks]
    fig = plt.figure(figsize=(max(3.6 * width + 1.8, 9), sum(heights) + 0.6), layout="constrained")
    subs = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    ax = subs[0].subplots(1, 1)
    if len(primary):
        first = primary.iloc[0]
        _forest(ax, primary, list(primary["label"]), band=True)
        for i, row in enumerate(primary.to_dict("records")):
            ax.annotate(row["verdict"], (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=9,
                        color=VERDICT_COLOURS[row["verdict"]], weight="bold")
        ax.set_title(f"Primary endpoint, {first['task']} {METRIC_TITLES.get(first['metric'], first['metric'])}"
                     f"{'' if first['class'] == 'all' else ' of ' + first['class']}: ratio − {first['baseline']} "
                     f"(interval over {first['n']} runs and {first['units']} test {first['unit']}; grey band: detectable effect)",
                     fontsize=8)
    else:
        ax.axis("off")
    subs[0].suptitle(_wrap(answer or "Primary endpoint", 150), fontsize=10, x=0.02, ha="left")
    for sub, task in zip(subs[1:], tasks, strict=True):
        part = secondary[secondary["task"] == task].assign(label=lambda t: t["class"] + " · " + t["label"])
        metrics = list(dict.fromkeys(part["metric"]))
        labels = list(dict.fromkeys(part["label"]))
        axes = sub.subplots(1, width, squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            _forest(ax, part[part["metric"] == metric], labels, band=False)
            ax.set_title(f"{METRIC_TITLES.get(metric, metric)}: ratio − {part['baseline'].iloc[0]}", fontsize=9)
        for ax in axes[1:len(metrics)]:
            ax.set_yticklabels([])
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        sub.suptitle(f"{task}, secondary: paired by {part['paired_by'].iloc[0]}, {int(part['n'].max())} runs; words from "
                     f"{ADJUSTMENTS[adjustment]}-adjusted p", fontsize=9, x=0.02, ha="left")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=w) for w, c in VERDICT_COLOURS.items()]
    handles.append(plt.Line2D([], [], color="#888888", lw=1, label="seed-only t interval"))
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)
    return save_figure(fig, out)


LOSS_SERIES = (("train_loss", "train"), ("loss", "loss"), ("val_loss", "validation"), ("d_loss", "discriminator"),
               ("g_loss", "generator"))
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


def plot_loss_curves(csv_paths: Sequence[str | Path], out_dir: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """One loss-curve PNG per training, named after `names` (default: the CSV's folder)."""
    out_dir = Path(out_dir)
    names = list(names) if names else [Path(p).parent.name for p in csv_paths]
    return [plot_loss_curve(p, out_dir / f"{n}.png", title=n) for p, n in zip(csv_paths, names, strict=True)]


def plot_class_share(shares: pd.DataFrame, out: str | Path, order: Sequence[str] | None = None) -> Path:
    """Stacked bars: the pixel share of each class per mixed training set (thesis Table 6.1)."""
    ratios = _order(shares["ratio"], order)
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


PER_CLASS_METRICS = ("c2st_auc", "fd", "kd", "fid", "kid", "is")  # the seeds' per-class table (000 Table 5: FID and IS per class)


def plot_quality_per_class(quality: pd.DataFrame, out: str | Path) -> Path:
    """The synthetic sets side by side per label (e.g. the GAN against the diffusion sets, as seed
    000's Table 5): one panel per distribution metric that was computed, grouped bars per class
    ('all' first), one bar per set; lower is better for FD/KD/FID/KID, higher for IS. Without any
    computed metric, a panel says why (the skip notes)."""
    ok = quality[(quality["status"] == "ok") & quality["metric"].isin(PER_CLASS_METRICS)]
    metrics = [m for m in PER_CLASS_METRICS if m in set(ok["metric"])]
    classes = ["all", *[c for c in dict.fromkeys(ok["class"]) if c != "all"]]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(max(6.0, 0.9 * len(classes) * max(1, len(metrics)) + 2), 3.6),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        wide = ok[ok["metric"] == metric].pivot_table(index="class", columns="set", values="value", sort=False).reindex(classes)
        x = np.arange(len(wide))
        for k, name in enumerate(wide.columns):
            ax.bar(x + _offset(k, len(wide.columns)), wide[name], GROUP_WIDTH / len(wide.columns), label=name, color=f"C{k}")
        better = "higher" if metric == "is" else "nearer 0.5" if metric == "c2st_auc" else "lower"
        space = ok.loc[ok["metric"] == metric, "extractor"].iloc[0] if "extractor" in ok else ""
        ax.set_title(f"{metric} ({better} is better)" + (f"\n{_wrap(_short_extractor(space), 32)}" if space else ""), fontsize=9)
        ax.set_xticks(x, wide.index, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    if not metrics:
        axes[0][0].axis("off")
        notes = sorted(set(quality.loc[quality["metric"].isin(PER_CLASS_METRICS), "note"].dropna()))
        axes[0][0].text(0, 0.5, "no per-class distribution metric computed:\n" + "\n".join(_wrap(n, 90) for n in notes),
                        fontsize=8, va="center")
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
    width = 2.8 * (len(metrics) + (c2st is not None)) + (1.2 + 0.5 * consistency["class"].nunique() if len(consistency) else 0)
    rows = 2 if per_image is not None and len(per_image) else 1
    fig, grid = plt.subplots(rows, max(1, panels), figsize=(max(6.0, width), 3.4 * rows), squeeze=False)
    axes = grid
    if c2st is not None:
        ax, axes = axes[0][0], axes[:, 1:]
        x = np.arange(len(c2st))
        ax.bar(x, c2st["c2st_auc"] - 0.5, bottom=0.5, color="C1")
        ax.errorbar(x, c2st["c2st_auc"], yerr=[c2st["c2st_auc"] - c2st["c2st_low"], c2st["c2st_high"] - c2st["c2st_auc"]],
                    fmt="none", color="black", capsize=4)
        ax.axhline(0.5, color="0.3", ls="--", lw=1)
        ax.set_xticks(x, c2st.index.astype(str))
        ax.set_ylim(0.3, 1.02)
        ax.set_title("C2ST AUC: real vs synthetic\n(0.5 = indistinguishable; 95 % interval)", fontsize=9)
    for ax, metric in zip(axes[0], metrics, strict=False):
        part = overall[overall["metric"] == metric]
        ax.bar(part["set"].astype(str), part["value"])
        space = part["extractor"].iloc[0] if "extractor" in part and len(part) else ""
        ax.set_title(f"{metric}\n{_wrap(_short_extractor(space), 28)}" if space else metric, fontsize=9)
    if len(consistency):
        ax = axes[0][len(metrics)]
        wide = consistency.pivot_table(index="class", columns="set", values="value", sort=False)
        x = np.arange(len(wide))
        for k, name in enumerate(wide.columns):
            ax.bar(x + _offset(k, len(wide.columns)), wide[name], GROUP_WIDTH / len(wide.columns), label=name)
        reference = ok[ok["metric"] == "mask_dice_real"].pivot_table(index="class", columns="set", values="value", sort=False)
        label = "same maps, real patches"
        for k, name in enumerate(wide.columns):
            if name in reference:
                ax.scatter(x + _offset(k, len(wide.columns)), reference[name].reindex(wide.index), marker="_", s=200, color="black", zorder=3, label=label)
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
            data = [per_image[(per_image["class"] == c) & (per_image["set"] == name)]["dice"].to_numpy() for c in classes]
            where = np.arange(len(classes)) + _offset(k, len(sets))
            keep = [i for i, d in enumerate(data) if len(d)]
            box = ax.boxplot([data[i] for i in keep], positions=where[keep], widths=0.9 * GROUP_WIDTH / len(sets),
                             patch_artist=True, manage_ticks=False)
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
        fig.text(0.01, -0.02 * rows, "\n".join(_wrap(n, 140) for n in notes), fontsize=7, va="top")
    return save_figure(fig, out)


def _offset(k: int, n: int) -> float:
    """x offset of the k-th of n side-by-side bars (or boxes) around a tick."""
    return (k - (n - 1) / 2) * GROUP_WIDTH / n


def _short_extractor(name: str) -> str:
    """'segmentation encoder (u-resnet18, results/...)' -> 'segmentation encoder (u-resnet18)'."""
    return re.sub(r",\s[^,()]*\)$", ")", name)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def read_rule_graph(dot: str):
    """The rule graph of `snakemake --rulegraph` (dot text) as a networkx DiGraph of rule names."""
    import networkx as nx

    labels = dict(re.findall(r'^\s*(\d+)\s*\[\s*label\s*=\s*"([^"]+)"', dot, flags=re.M))
    graph = nx.DiGraph()
    graph.add_nodes_from(labels.values())
    graph.add_edges_from((labels[a], labels[b]) for a, b in re.findall(r"^\s*(\d+)\s*->\s*(\d+)", dot, flags=re.M))
    if not labels:
        raise ValueError("no rules found in the dot text; is it the output of `snakemake --rulegraph`?")
    return graph


def _back_edges(graph) -> set:
    """Edges closing a loop in a depth-first walk from the rules nothing feeds: the rule graph can loop
    where the job graph does not (ratio-0 training feeds curation, which feeds the other ratios)."""
    back, state = set(), {}

    def visit(node):
        state[node] = "open"
        for nxt in sorted(graph.successors(node)):
            if state.get(nxt) == "open":
                back.add((node, nxt))
            elif nxt not in state:
                visit(nxt)
        state[node] = "done"

    for node in sorted(graph, key=lambda n: (graph.in_degree(n), n)):
        if node not in state:
            visit(node)
    return back


def plot_rule_graph(dot_path: str | Path, out: str | Path) -> Path:
    """Draw a rule graph (dot file) top to bottom, one row per dependency generation, without
    graphviz; edges closing a rule-level loop are dashed."""
    import networkx as nx

    graph = read_rule_graph(Path(dot_path).read_text())
    back = _back_edges(graph)  # rule-level loops (e.g. the baseline model feeding curation feeding mixing)
    layers = list(nx.topological_generations(nx.restricted_view(graph, [], back)))
    for depth, layer in enumerate(layers):
        for node in layer:
            graph.nodes[node]["layer"] = depth
    positions = nx.multipartite_layout(graph, subset_key="layer", align="horizontal", scale=1.0)
    positions = {node: (x, -y) for node, (x, y) in positions.items()}
    width = max(len(layer) for layer in layers)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.3 * width), 0.8 * len(layers) + 1))
    forward = [edge for edge in graph.edges if edge not in back]
    for edges, style in ((forward, "solid"), (sorted(back), "dashed")):
        nx.draw_networkx_edges(graph, positions, edgelist=edges, ax=ax, arrowsize=10, edge_color="#777777", node_size=0,
                               style=style, min_source_margin=9, min_target_margin=14)
    for node, (x, y) in positions.items():
        ax.text(x, y, node, ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round,pad=0.35", "facecolor": "#dbe9f6", "edgecolor": "#3b6ea5"})
    ax.axis("off")
    return save_figure(fig, out)


# ----------------------------------------------------------------------------- rule entry

def summarize(segmentation_paths: Sequence[str | Path], outputs: Mapping[str, str | Path], *, ratios: Sequence[Mapping],
              seed: int, quality_paths: Sequence[str | Path] = (), scores_paths: Sequence[str | Path] = (),
              share_paths: Sequence[str | Path] = (), audit_paths: Sequence[str | Path] = (),
              loss_csvs: Sequence[str | Path] = (), loss_names: Sequence[str] | None = None,
              baseline: str | None = None, classification_paths: Sequence[str | Path] = (),
              prediction_paths: Sequence[str | Path] = (), class_names: Sequence[str] = (),
              image_paths: Sequence[str | Path] = (), verdict_settings: Mapping, primary: Mapping) -> dict:
    """Entry of rule summarize: write the files `outputs` names (the rule's output names): verdict
    (CSV) and verdict_plot over both tasks; parquet and table (CSV) of all metrics, seed_summary and
    metrics_plot; with classification results classification_plot (accuracy, balanced accuracy, F1,
    AUROC per ratio) and confusion (per ratio, from the prediction tables, `class_names` in order);
    class_share and class_share_plot from the share tables; quality_plot and quality_per_class
    (the sets side by side per label) from the quality tables;
    memorisation (CSV) from the curated sets' audit rows; loss, a folder of one PNG per loss CSV.
    The verdict (histosynth.evaluation.verdict) is computed from the per-image tables: segmentation's
    `image_paths` and classification's `prediction_paths`, with the `verdict` config section as
    `verdict_settings` and the resolved `primary` endpoint. The baseline is the first ratio with
    synthetic 0 and real true (override with `baseline`); `seed` deals the test units into jackknife
    groups. Returns {name: path or list of paths} of what was written."""
    out = {name: Path(path) for name, path in outputs.items()}
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    order = [r["name"] for r in ratios]
    baseline = baseline_ratio(list(ratios), baseline)
    seg = read_tables(segmentation_paths)
    quality = read_tables(quality_paths) if quality_paths else None
    shares = read_tables(share_paths) if share_paths else None
    amounts = (dict(shares.groupby("ratio")["n_synthetic"].first()) if shares is not None and len(shares)
               else {r["name"]: r["synthetic"] for r in ratios})
    cls = read_tables(classification_paths)
    table = metrics_table(seg, quality, cls)
    write_table(table, out["parquet"])
    predictions = read_tables(prediction_paths)
    sources = {r["name"]: "+".join(r.get("sources") or []) for r in ratios}
    decided = verdict_table(images=read_tables(image_paths), predictions=predictions, class_names=class_names,
                            segmentation_metrics=SEGMENTATION_METRICS, classification_metrics=CLASSIFICATION_METRICS,
                            baseline=baseline, order=order, settings=verdict_settings, primary=primary, seed=seed,
                            sources=sources)
    said = answer(decided)
    log.info("verdict: %s", said)
    for row in decided.to_dict("records"):
        log.info("verdict: %s", sentence(row))
    written = {"verdict": write_csv(decided, out["verdict"]),
               "verdict_plot": plot_verdict(decided, out["verdict_plot"], said, verdict_settings["adjustment"]),
               "parquet": out["parquet"], "table": write_csv(table, out["table"]),
               "seed_summary": write_csv(seed_summary(pd.concat([seg, cls], ignore_index=True), order), out["seed_summary"])}
    if len(seg):
        written["metrics_plot"] = plot_metrics(seg, out["metrics_plot"], order, amounts)
    if len(cls):
        written["classification_plot"] = plot_metrics(cls, out["classification_plot"], order, amounts, CLASSIFICATION_METRICS)
        written["confusion"] = plot_confusions(predictions, class_names, out["confusion"], order)
    if shares is not None:
        written["class_share"] = write_csv(shares, out["class_share"])
        written["class_share_plot"] = plot_class_share(shares, out["class_share_plot"], order)
    if quality is not None:
        scores = read_tables(scores_paths) if scores_paths else None
        written["quality_plot"] = plot_quality(quality, out["quality_plot"], scores)
        written["quality_per_class"] = plot_quality_per_class(quality, out["quality_per_class"])
    if audit_paths:
        written["memorisation"] = write_csv(read_tables(audit_paths), out["memorisation"])
    if loss_csvs:
        written["loss"] = plot_loss_curves(loss_csvs, out["loss"], loss_names)
    return written


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m histosynth.evaluation.report", description="Report figures outside rule summarize.")
    commands = parser.add_subparsers(dest="command", required=True)
    rulegraph = commands.add_parser("rulegraph", help="draw `snakemake --rulegraph` output as a PNG")
    rulegraph.add_argument("dot", help="dot file written by snakemake --rulegraph")
    rulegraph.add_argument("png", help="PNG to write")
    args = parser.parse_args()
    print(plot_rule_graph(args.dot, args.png))
