"""Report: the tidy table, seed summaries, every plot written as a non-empty PNG, and summarize
writing each output (the verdict among them) where the rule says."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histosynth.config import section_defaults
from histosynth.data.io import write_table
from histosynth.evaluation.quality_plots import plot_quality
from histosynth.evaluation.report import summarize
from histosynth.evaluation.report_plots import plot_class_share, plot_loss_curves, plot_metrics, plot_verdict
from histosynth.evaluation.report_tables import metrics_table, seed_summary

RATIOS = [
    {"name": "real", "synthetic": 0, "real": True},
    {"name": "k2", "synthetic": 2, "real": True},
    {"name": "syn", "synthetic": 1.0, "real": False},
]


def seg_rows(values: dict[str, list[float]], slides=("t1",), classes=("Blood vessel",)) -> pd.DataFrame:
    """Per-slide dice/precision/recall rows: values[ratio][seed] (the same for every slide/metric),
    plus pooled 'all' rows equal to the slide mean."""
    rows = []
    for ratio, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            for name in classes:
                for metric in ("dice", "precision", "recall"):
                    for slide in slides:
                        rows.append(
                            {"ratio": ratio, "seed": seed, "slide": slide, "class": name, "metric": metric, "value": v}
                        )
                    rows.append(
                        {"ratio": ratio, "seed": seed, "slide": "all", "class": name, "metric": metric, "value": v}
                    )
    return pd.DataFrame(rows)


def image_rows(shift: dict[str, list[float]], classes=("Blood vessel", "Fat"), images: int = 12) -> pd.DataFrame:
    """Per-image TP/FP/FN of every ratio x seed: 100 labelled pixels per image and class, of which
    the ratio's shift (plus per-image noise) moves a share between missed and found."""
    rng = np.random.default_rng(0)
    rows = []
    for ratio, shifts in shift.items():
        for seed, s in enumerate(shifts):
            for i in range(images):
                for name in classes:
                    fn = int(np.clip(40 - 100 * s + rng.normal(0, 5), 0, 100))
                    rows.append(
                        {
                            "ratio": ratio,
                            "seed": seed,
                            "patch_id": f"p{i}",
                            "slide": "t1",
                            "class": name,
                            "tp": 100 - fn,
                            "fp": 20,
                            "fn": fn,
                        }
                    )
    return pd.DataFrame(rows)


def verdict_of(images: pd.DataFrame) -> pd.DataFrame:
    from histosynth.evaluation.verdict import verdict_table

    return verdict_table(
        images=images,
        predictions=None,
        class_names=[],
        segmentation_metrics=["dice", "precision", "recall"],
        classification_metrics=[],
        baseline="real",
        order=["real", "k2", "syn"],
        settings=section_defaults("verdict"),
        primary={"task": "segmentation", "class": "Fat", "metric": "dice"},
        seed=0,
        sources={"k2": "synth"},
    )


def is_png(path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.width > 10 and image.height > 10


def test_seed_summary_and_table():
    seg = seg_rows({"real": [0.5, 0.7], "k2": [0.6, 0.6]})
    summary = seed_summary(seg, ["real", "k2"]).set_index(["ratio", "metric"])
    assert summary.loc[("real", "dice"), "mean"] == pytest.approx(0.6)
    assert summary.loc[("real", "dice"), "sd"] == pytest.approx(math.sqrt(0.02))
    quality = pd.DataFrame(
        [
            {
                "set": "inpaint",
                "metric": "fid",
                "class": "all",
                "value": np.nan,
                "n_real": 3,
                "n_synthetic": 3,
                "status": "skipped",
                "note": "missing weights",
            }
        ]
    )
    table = metrics_table(seg, quality)
    assert set(table.kind) == {"segmentation", "quality"} and len(table) == len(seg) + 1


def test_plots_are_written(tmp_path):
    seg = seg_rows(
        {"real": [0.5, 0.6, 0.7], "k2": [0.6, 0.8, 0.7], "syn": [0.3, 0.2, 0.25]}, classes=("Blood vessel", "Fat")
    )
    assert is_png(plot_metrics(seg, tmp_path / "m.png", ["real", "k2", "syn"], {"real": 0, "k2": 2, "syn": 10}))
    shares = pd.DataFrame(
        {"ratio": ["real", "real", "k2", "k2"], "class": ["background", "Fat"] * 2, "share": [0.9, 0.1, 0.8, 0.2]}
    )
    assert is_png(plot_class_share(shares, tmp_path / "s.png", ["real", "k2"]))
    quality = pd.DataFrame(
        {
            "set": ["synth", "inpaint"],
            "metric": ["fid", "fid"],
            "class": "all",
            "value": [50.0, 30.0],
            "status": "ok",
            "note": "",
        }
    )
    assert is_png(plot_quality(quality, tmp_path / "q.png"))
    assert is_png(plot_quality(quality.assign(status="skipped", note="missing x"), tmp_path / "q2.png"))
    offline = pd.DataFrame(
        {
            "set": ["synth", "synth", "synth"],
            "metric": ["fd", "mask_dice", "nuclei_dice"],
            "class": ["all", "Fat", "nuclei"],
            "value": [12.0, 0.8, 0.6],
            "status": "ok",
            "note": "",
            "extractor": ["segmentation encoder (u-resnet18, results/segmentation/real/seed0)", "", ""],
        }
    )
    scores = pd.DataFrame(
        {
            "set": "synth",
            "id": ["a", "b", "a"],
            "kind": ["region", "region", "nuclei"],
            "class": ["Fat", "Fat", "nuclei"],
            "dice": [0.7, 0.9, 0.6],
        }
    )
    one_row, two_rows = plot_quality(offline, tmp_path / "q3.png"), plot_quality(offline, tmp_path / "q4.png", scores)
    with Image.open(one_row) as a, Image.open(two_rows) as b:
        assert b.size[1] > 1.6 * a.size[1]  # the per-image box plots add a row
    c2st = pd.DataFrame(
        {
            "set": "synth",
            "metric": ["c2st_auc", "c2st_low", "c2st_high"],
            "class": "all",
            "value": [0.9, 0.8, 1.0],
            "status": "ok",
            "note": "",
            "extractor": "",
        }
    )
    with_c2st = plot_quality(pd.concat([offline, c2st]), tmp_path / "q5.png", scores)
    with Image.open(two_rows) as a, Image.open(with_c2st) as b:
        assert b.size[0] > a.size[0]  # a panel of its own beside the others
    decided = verdict_of(image_rows({"real": [0.0, 0.0, 0.0], "k2": [0.1, 0.05, 0.1], "syn": [-0.2, -0.3, -0.25]}))
    assert len(decided) == 2 * 2 * 3 and is_png(
        plot_verdict(decided, tmp_path / "v.png", "an answer")
    )  # ratios x classes x metrics
    assert is_png(plot_verdict(verdict_of(image_rows({"real": [0.0], "k2": [0.1]})), tmp_path / "v1.png"))
    csv = tmp_path / "run" / "loss.csv"
    csv.parent.mkdir()
    pd.DataFrame({"step": [2, 4], "epoch": [1, 2], "train_loss": [1.0, 0.8], "val_loss": [1.1, 0.9]}).to_csv(
        csv, index=False
    )
    [curve] = plot_loss_curves([csv], tmp_path / "loss")
    assert curve.name == "run.png" and is_png(curve)


def test_gan_loss_curve_draws_both_networks_and_a_panel_per_fidelity_metric(tmp_path):
    """A GAN's loss.csv (loss = d_loss) with FD/KD at its evaluation steps: one panel of losses and
    one per logged fidelity metric, so the figure is wider than a single-panel curve."""
    from matplotlib import image

    gan = {
        "step": [1, 2, 3, 4],
        "loss": [2.0, 1.8, 1.7, 1.5],
        "d_loss": [2.0, 1.8, 1.7, 1.5],
        "g_loss": [0.5, 0.7, 0.8, 0.9],
        "fd": [None, 4.0, None, 3.0],
        "kd": [None, 0.4, None, 0.3],
        "fid": [None] * 4,
    }
    tables = {
        "plain": {"step": [1, 2], "loss": [1.0, 0.9], "val_loss": [1.1, 1.0]},
        "gan_fd": {k: v for k, v in gan.items() if k != "kd"},
        "gan": gan,
    }
    for name, table in tables.items():
        pd.DataFrame(table).to_csv(tmp_path / f"{name}.csv", index=False)
    pngs = plot_loss_curves([tmp_path / f"{name}.csv" for name in tables], tmp_path / "loss", list(tables))
    plain, one, two = (image.imread(png).shape[1] for png in pngs)
    assert 1.3 * plain < one < 0.85 * two  # a panel per logged metric (fd, then kd), none for the empty fid


def test_summarize_writes_everything(tmp_path):
    seg = seg_rows({"real": [0.5, 0.6, 0.7], "k2": [0.6, 0.8, 0.7], "syn": [0.3, 0.2, 0.25]})
    images = image_rows(
        {"real": [0.0, 0.0, 0.0], "k2": [0.1, 0.12, 0.09], "syn": [-0.3, -0.32, -0.31]}, classes=("Blood vessel",)
    )
    paths, image_paths = [], []
    for (ratio, seed), part in seg.groupby(["ratio", "seed"]):
        paths.append(tmp_path / f"{ratio}_{seed}.parquet")
        write_table(part, paths[-1])
        image_paths.append(tmp_path / f"{ratio}_{seed}.images.parquet")
        write_table(images[(images["ratio"] == ratio) & (images["seed"] == seed)], image_paths[-1])
    shares = pd.DataFrame(
        {
            "ratio": ["real", "k2", "syn"],
            "class": "Blood vessel",
            "share": [0.1, 0.2, 0.5],
            "n_real": [8, 8, 0],
            "n_synthetic": [0, 2, 8],
        }
    )
    write_table(shares, tmp_path / "share.parquet")
    quality = pd.DataFrame(
        {"set": ["synth"], "metric": ["fid"], "class": "all", "value": [50.0], "status": "ok", "note": ""}
    )
    write_table(quality, tmp_path / "quality.parquet")
    loss = tmp_path / "real_0" / "loss.csv"  # a run folder's loss.csv: the plot is named after the run
    loss.parent.mkdir()
    pd.DataFrame({"step": [2, 4], "epoch": [1, 2], "train_loss": [1.0, 0.8], "val_loss": [1.1, 0.9]}).to_csv(
        loss, index=False
    )
    summary = tmp_path / "summary"
    outputs = {
        "parquet": summary / "tables" / "metrics.parquet",
        "table": summary / "tables" / "metrics.csv",
        "seed_summary": summary / "seeds.csv",
        "verdict": summary / "verdict.csv",
        "verdict_plot": summary / "plots" / "verdict.png",
        "memorisation": summary / "memorisation.csv",
        "metrics_plot": summary / "plots" / "metrics.png",
        "class_share": summary / "share.csv",
        "class_share_plot": summary / "plots" / "share.png",
        "quality_plot": summary / "plots" / "quality.png",
        "quality_per_class": summary / "plots" / "quality_per_class.png",
        "loss": summary / "loss",
    }
    audit = pd.DataFrame([{"set": "synth", "images": 8, "kept": 6, "copy_rate": 0.25}])
    write_table(audit, tmp_path / "audit.parquet")
    out = summarize(
        paths,
        outputs,
        ratios=RATIOS,
        seed=0,
        share_paths=[tmp_path / "share.parquet"],
        quality_paths=[tmp_path / "quality.parquet"],
        audit_paths=[tmp_path / "audit.parquet"],
        loss_csvs=[loss],
        image_paths=image_paths,
        verdict_settings=section_defaults("verdict"),
        primary={"task": "segmentation", "class": "Blood vessel", "metric": "dice"},
    )
    # every output goes exactly where the caller said
    assert set(out) == set(outputs) and all(out[name] == path for name, path in outputs.items() if name != "loss")
    assert out["loss"] == [summary / "loss" / "real_0.png"]
    decided = pd.read_csv(outputs["verdict"]).set_index(["ratio", "metric"])
    assert set(decided.index.get_level_values(0)) == {"k2", "syn"} and set(decided.baseline) == {"real"}
    assert decided.loc[("syn", "dice"), "verdict"] == "hurt" and decided.loc[("syn", "dice"), "endpoint"] == "primary"
    assert decided.loc[("k2", "dice"), "mean_diff"] > 0 and decided.loc[("k2", "recall"), "endpoint"] == "secondary"
    assert pd.read_csv(outputs["memorisation"])["kept"].tolist() == [6]
    assert pd.read_parquet(outputs["parquet"]).shape[0] == len(seg) + 1  # segmentation rows and the quality row
    assert pd.read_csv(outputs["table"]).shape[0] == len(seg) + 1
    assert set(pd.read_csv(outputs["seed_summary"]).ratio) == {"real", "k2", "syn"}
    assert pd.read_csv(outputs["class_share"])["share"].tolist() == [0.1, 0.2, 0.5]
    assert all(
        is_png(outputs[name])
        for name in ("metrics_plot", "class_share_plot", "quality_plot", "quality_per_class", "verdict_plot")
    )
    assert is_png(out["loss"][0])


def test_rule_graph_with_a_rule_level_loop(tmp_path):
    # ratio-0 training feeds quality and curation, which feed the other ratios' mixing: a loop of rules, not of jobs
    names = ["all", "mix_dataset", "train_segmentation", "image_quality", "curate_synthetic", "extract_patches"]
    edges = [(5, 1), (1, 2), (2, 3), (3, 4), (4, 1), (2, 0)]
    dot = "digraph snakemake_dag {\n" + "".join(
        f'    {i}[label = "{n}", color = "0.1 0.6 0.85"];\n' for i, n in enumerate(names)
    )
    dot += "".join(f"    {a} -> {b}\n" for a, b in edges) + "}\n"
    (tmp_path / "g.dot").write_text(dot)
    from histosynth.evaluation.rule_graph import _back_edges, plot_rule_graph, read_rule_graph

    assert _back_edges(read_rule_graph(dot)) == {("curate_synthetic", "mix_dataset")}
    assert is_png(plot_rule_graph(tmp_path / "g.dot", tmp_path / "g.png"))
