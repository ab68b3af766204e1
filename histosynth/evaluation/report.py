"""Report: one tidy table of every metric, the verdict (histosynth.evaluation.verdict: each ratio
against the baseline, paired by seed, with intervals and a word), the plots across ratios, the
memorisation audit of the curated sets, loss curves and class-share figures (rule summarize).
The tables are histosynth.evaluation.report_tables', the figures report_plots' and quality_plots'
(each writes a PNG and returns its path, so rules can flag them with report()).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from histosynth.config import baseline_ratio
from histosynth.data.io import write_csv, write_table
from histosynth.evaluation.quality_plots import plot_quality, plot_quality_per_class
from histosynth.evaluation.report_plots import (
    plot_class_share,
    plot_confusions,
    plot_loss_curves,
    plot_metrics,
    plot_verdict,
)
from histosynth.evaluation.report_tables import (
    CLASSIFICATION_METRICS,
    SEGMENTATION_METRICS,
    metrics_table,
    read_tables,
    seed_summary,
)
from histosynth.evaluation.verdict import answer, sentence, verdict_table

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- rule entry


def summarize(
    segmentation_paths: Sequence[str | Path],
    outputs: Mapping[str, str | Path],
    *,
    ratios: Sequence[Mapping],
    seed: int,
    quality_paths: Sequence[str | Path] = (),
    scores_paths: Sequence[str | Path] = (),
    share_paths: Sequence[str | Path] = (),
    audit_paths: Sequence[str | Path] = (),
    loss_csvs: Sequence[str | Path] = (),
    loss_names: Sequence[str] | None = None,
    baseline: str | None = None,
    classification_paths: Sequence[str | Path] = (),
    prediction_paths: Sequence[str | Path] = (),
    class_names: Sequence[str] = (),
    image_paths: Sequence[str | Path] = (),
    verdict_settings: Mapping,
    primary: Mapping,
) -> dict:
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
    amounts = (
        dict(shares.groupby("ratio")["n_synthetic"].first())
        if shares is not None and len(shares)
        else {r["name"]: r["synthetic"] for r in ratios}
    )
    cls = read_tables(classification_paths)
    table = metrics_table(seg, quality, cls)
    write_table(table, out["parquet"])
    predictions = read_tables(prediction_paths)
    sources = {r["name"]: "+".join(r.get("sources") or []) for r in ratios}
    decided = verdict_table(
        images=read_tables(image_paths),
        predictions=predictions,
        class_names=class_names,
        segmentation_metrics=SEGMENTATION_METRICS,
        classification_metrics=CLASSIFICATION_METRICS,
        baseline=baseline,
        order=order,
        settings=verdict_settings,
        primary=primary,
        seed=seed,
        sources=sources,
    )
    said = answer(decided)
    log.info("verdict: %s", said)
    for row in decided.to_dict("records"):
        log.info("verdict: %s", sentence(row))
    written = {
        "verdict": write_csv(decided, out["verdict"]),
        "verdict_plot": plot_verdict(decided, out["verdict_plot"], said, verdict_settings["adjustment"]),
        "parquet": out["parquet"],
        "table": write_csv(table, out["table"]),
        "seed_summary": write_csv(seed_summary(pd.concat([seg, cls], ignore_index=True), order), out["seed_summary"]),
    }
    if len(seg):
        written["metrics_plot"] = plot_metrics(seg, out["metrics_plot"], order, amounts)
    if len(cls):
        written["classification_plot"] = plot_metrics(
            cls, out["classification_plot"], order, amounts, CLASSIFICATION_METRICS
        )
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
