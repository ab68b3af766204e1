"""Image-level labels: the class of every patch, which classification learns and class-conditioned
synthesis draws.

A label comes either from the slide sheet's `label` column (every patch inherits its image's
label, e.g. an atypia score or a grade) or from the annotations: the patch's dominant region class
(the class covering most of it, `labels.background` where none does). `resolve_labels` fixes the
source and the class order once for a run; the workflow passes that dict to every job, so all of
them number the classes alike (class index = position in `classes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from histosynth.data.patches import dominant_class


class LabelError(ValueError):
    """Labels that cannot be resolved from the sheet and the config."""


def resolve_labels(config: Mapping, sheet_labels: Sequence[str], sheet: str = "the slide sheet") -> dict:
    """{'source': 'sheet' | 'region', 'classes': [...], 'regions': [...], 'background': str} from the
    validated config (sections labels, classes) and the sheet's label column ('' = none)."""
    settings = config["labels"]
    given = [str(label) for label in sheet_labels if str(label)]
    source = settings["source"]
    if source == "auto":
        if given and len(given) < len(sheet_labels):
            raise LabelError(
                f"{sheet}: {len(sheet_labels) - len(given)} of {len(sheet_labels)} slides have no label; "
                "fill the label column for every slide, or set labels.source: region to label patches "
                "by their dominant annotated class"
            )
        source = "sheet" if given else "region"
    regions = list(config["classes"])
    if source == "region":
        classes = [settings["background"], *regions]
    else:
        if len(given) < len(sheet_labels):
            raise LabelError(
                f"labels.source is sheet but {sheet} has {len(sheet_labels) - len(given)} slides without a label"
            )
        found = sorted(set(given))
        classes = list(settings["classes"]) if settings["classes"] else found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise LabelError(
                f"{sheet}: labels {unknown} are not in labels.classes {classes}; add them or fix the sheet"
            )
        if len(classes) < 2:
            raise LabelError(
                f"{sheet}: every slide has the label {classes[0]!r}; classification needs at least two classes"
            )
    return {"source": source, "classes": classes, "regions": regions, "background": settings["background"]}


def patch_labels(table: pd.DataFrame, labels: Mapping) -> np.ndarray:
    """Per patch-index row its label name under resolved `labels` (resolve_labels): the index's
    `label` column (the sheet's) or the dominant region class from the frac_<class> columns."""
    if labels["source"] == "sheet":
        if "label" not in table or table["label"].isna().any():
            raise LabelError(
                "labels.source is sheet but the patch index has patches without a label; "
                "rerun extract_patches after filling the sheet's label column"
            )
        return table["label"].astype(str).to_numpy()
    names = np.asarray(labels["classes"], dtype=object)  # background first, then the region classes
    return names[dominant_class(table, labels["regions"])]


def label_index(names: Sequence[str], labels: Mapping) -> np.ndarray:
    """Class indices (positions in labels['classes']) of label names; an error naming unknown ones."""
    position = {name: i for i, name in enumerate(labels["classes"])}
    unknown = sorted({str(name) for name in names} - set(position))
    if unknown:
        raise LabelError(f"labels {unknown} are not among the run's classes {labels['classes']}")
    return np.asarray([position[str(name)] for name in names], np.int64)


def run_labels(config: Mapping, sheet_labels: Sequence[str] = ()) -> dict:
    """The resolved labels of a job's config: the workflow passes resolve_labels' dict as
    config['labels']; a plain validated config (a library caller's) is resolved here from
    `sheet_labels` (one per slide)."""
    labels = config["labels"]
    return dict(labels) if "regions" in labels else resolve_labels(config, sheet_labels)
