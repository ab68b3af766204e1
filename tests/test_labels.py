"""Image-level labels: the sheet's label column or the dominant region class, resolved once per run."""

from __future__ import annotations

import pandas as pd
import pytest

from histosynth.config import section_defaults
from histosynth.data.labels import LabelError, label_index, patch_labels, resolve_labels, run_labels

CLASSES = ["Blood vessel", "Fat"]


def config(**labels) -> dict:
    return {"classes": CLASSES, "labels": section_defaults("labels", labels)}


def index_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide": ["a", "a", "b"],
            "frac_blood_vessel": [0.0, 0.3, 0.1],
            "frac_fat": [0.0, 0.1, 0.6],
            "label": ["2", "2", "1"],
        }
    )


def test_region_labels_are_the_dominant_class_or_background():
    labels = resolve_labels(config(), ["", ""])
    assert labels["source"] == "region" and labels["classes"] == ["background", "Blood vessel", "Fat"]
    assert list(patch_labels(index_rows(), labels)) == ["background", "Blood vessel", "Fat"]
    assert list(label_index(["Fat", "background"], labels)) == [2, 0]
    with pytest.raises(LabelError, match="Tumour"):
        label_index(["Tumour"], labels)


def test_sheet_labels_sorted_or_in_configured_order():
    assert resolve_labels(config(), ["2", "1", "2"])["classes"] == ["1", "2"]
    labels = resolve_labels(config(classes=["2", "1", "3"]), ["2", "1"])
    assert labels["source"] == "sheet" and list(label_index(patch_labels(index_rows(), labels), labels)) == [0, 0, 1]
    with pytest.raises(LabelError, match=r"labels \['4'\] are not in labels.classes"):
        resolve_labels(config(classes=["1", "2"]), ["1", "4"])


def test_partial_or_single_sheet_labels_are_errors_that_say_what_to_do():
    with pytest.raises(LabelError, match="1 of 2 slides have no label.*labels.source: region"):
        resolve_labels(config(), ["1", ""], "sheet.tsv")
    with pytest.raises(LabelError, match="at least two classes"):
        resolve_labels(config(), ["1", "1"])
    assert resolve_labels(config(source="region"), ["1", ""])["source"] == "region"  # the labels are ignored


def test_run_labels_keeps_a_resolved_dict_and_resolves_a_plain_config():
    resolved = resolve_labels(config(), ["1", "2"])
    assert run_labels({"labels": resolved}) == resolved
    assert run_labels(config(), ["1", "2"]) == resolved
