"""Tests for histosynth.nuclei.metrics on hand-made masks whose answers are worked out in the comments."""

import numpy as np
import pytest

from histosynth.nuclei.metrics import match_instances, score_instances


def canvas(shape=(10, 10)):
    return np.zeros(shape, np.int32)


def scores(truth, pred) -> dict:
    """The scores of one image (score_instances of one pair)."""
    return score_instances([(truth, pred)])


def test_shifted_square_has_iou_one_third():
    truth, pred = canvas(), canvas()
    truth[0:6, 0:6] = 1  # 36 px
    pred[0:6, 3:9] = 4  # 36 px, overlap 6 x 3 = 18, union 36 + 36 - 18 = 54: IoU 1/3
    assert match_instances(truth, pred) == (0, 1, 1, [])
    tp, fp, fn, pairs = match_instances(truth, pred, iou_threshold=0.3)
    assert (tp, fp, fn) == (1, 0, 0)
    assert pairs[0][:2] == (1, 4) and pairs[0][2] == pytest.approx(1 / 3)


def test_matching_ignores_label_values_and_is_one_to_one():
    truth, pred = canvas(), canvas()
    truth[0:4, 0:4], truth[6:9, 6:9] = 1, 2
    pred[0:4, 0:4], pred[6:9, 6:9] = 7, 3
    assert match_instances(truth, pred) == (2, 0, 0, [(1, 7, 1.0), (2, 3, 1.0)])
    # one 4x4 truth, two 4x2 halves: each half has IoU 8/16 = 0.5; at 0.3 only one may match it
    truth, pred = canvas(), canvas()
    truth[0:4, 0:4] = 1
    pred[0:4, 0:2], pred[0:4, 2:4] = 1, 2
    tp, fp, fn, pairs = match_instances(truth, pred, iou_threshold=0.3)
    assert (tp, fp, fn) == (1, 1, 0) and pairs == [(1, 1, 0.5)]
    assert match_instances(truth, pred)[:3] == (0, 2, 1)  # IoU 0.5 is not > 0.5


def test_detection_f1_counts():
    truth, pred = canvas(), canvas()
    truth[0:3, 0:3], truth[0:3, 5:8], truth[6:9, 0:3] = 1, 2, 3
    pred[0:3, 0:3], pred[0:3, 5:8], pred[6:9, 6:9] = 1, 2, 3  # 2 matched, 1 missed, 1 spurious
    result = scores(truth, pred)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 1, 1)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)  # 2*2 / (2*2 + 1 + 1)


def test_empty_cases():
    empty, one = canvas(), canvas()
    one[2:5, 2:5] = 1
    both_empty = scores(empty, empty)
    assert both_empty == {
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "tp": 0,
        "fp": 0,
        "fn": 0,
        "aji": 1.0,
        "pq": 1.0,
        "dq": 1.0,
        "sq": 1.0,
        "dice": 1.0,
        "images": 1,
    }
    spurious = scores(empty, one)
    assert spurious["f1"] == 0.0 and spurious["fp"] == 1 and spurious["precision"] == 0.0
    missed = scores(one, empty)
    assert missed["f1"] == 0.0 and missed["fn"] == 1 and missed["recall"] == 0.0
    assert scores(empty, empty)["aji"] == 1.0
    assert scores(empty, one)["aji"] == 0.0 and scores(one, empty)["aji"] == 0.0
    assert scores(empty, empty)["dice"] == 1.0 and scores(one, empty)["dice"] == 0.0
    assert scores(one, empty)["pq"] == scores(empty, one)["pq"] == 0.0


def test_panoptic_quality():
    truth, pred = canvas(), canvas()
    truth[0:4, 0:4] = 1  # 16 px, matched by a 4x3 prediction: IoU 12/16
    truth[6:8, 6:8] = 2  # 4 px, missed
    pred[0:4, 0:3] = 5
    pred[8:10, 0:2] = 6  # spurious
    # tp 1, fp 1, fn 1: DQ = 1 / (1 + 1/2 + 1/2) = 0.5; SQ = 0.75; PQ = 0.375
    result = scores(truth, pred)
    assert (result["dq"], result["sq"]) == (pytest.approx(0.5), pytest.approx(0.75))
    assert result["pq"] == pytest.approx(0.375) and result["dq"] == result["f1"]


def test_aji_of_a_split_prediction():
    truth, pred = canvas(), canvas()
    truth[0:4, 0:4] = 1  # 16 px
    pred[0:4, 0:2], pred[0:4, 2:4] = 1, 2  # halves of 8 px, IoU 0.5 each; the tie goes to pred 1
    # C = |T ∩ P1| = 8; U = |T ∪ P1| = 16, plus the unused P2's 8 px = 24: AJI = 8/24
    assert scores(truth, pred)["aji"] == pytest.approx(1 / 3)
    assert scores(truth, truth)["aji"] == 1.0


def test_aji_counts_unmatched_instances_and_shared_predictions():
    truth, pred = canvas(), canvas()
    truth[0:4, 0:4] = 1  # 16 px, matched exactly by pred 1
    truth[8:10, 8:10] = 2  # 4 px, overlapping nothing
    pred[0:4, 0:4] = 1
    pred[5:8, 0:3] = 2  # 9 px, overlapping nothing
    # C = 16; U = 16 + 4 (lone truth) + 9 (lone prediction) = 29
    assert scores(truth, pred)["aji"] == pytest.approx(16 / 29)
    # two 2x2 truths side by side, one 2x4 prediction over both: each truth picks it (IoU 4/8)
    truth, pred = canvas(), canvas()
    truth[0:2, 0:2], truth[0:2, 2:4] = 1, 2
    pred[0:2, 0:4] = 1
    # C = 4 + 4 = 8; U = 8 + 8 = 16 (the shared prediction counts once per truth)
    assert scores(truth, pred)["aji"] == pytest.approx(0.5)


def test_pixel_dice_of_half_overlap():
    truth, pred = canvas(), canvas()
    truth[0:4, 0:4] = 1  # 16 px
    pred[0:4, 2:6] = 9  # 16 px, 8 shared: Dice = 2*8 / 32
    assert scores(truth, pred)["dice"] == pytest.approx(0.5)


def test_score_instances_pools_counts_before_dividing():
    truth_a, pred_a = canvas(), canvas()
    truth_a[0:4, 0:4] = pred_a[0:4, 0:4] = 1  # perfect, 16 px
    truth_b, pred_b = canvas(), canvas()
    truth_b[0:2, 0:2] = 1  # 4 px, missed
    scores = score_instances([(truth_a, pred_a), (truth_b, pred_b)])
    # tp 1, fp 0, fn 1: precision 1, recall 1/2, F1 2/3
    assert (scores["tp"], scores["fp"], scores["fn"], scores["images"]) == (1, 0, 1, 2)
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5 and scores["f1"] == pytest.approx(2 / 3)
    assert scores["aji"] == pytest.approx(16 / 20)  # C = 16; U = 16 + 4
    assert scores["dice"] == pytest.approx(32 / 36)  # 2*16 / (16 + 16 + 4)
    assert score_instances([])["f1"] == 1.0


def test_many_instances_are_matched_sparsely():
    # 16384 8x8 instances; a dense IoU matrix would hold 2.7e8 entries
    rows, cols = np.indices((1024, 1024))
    truth = ((rows // 8) * 128 + cols // 8 + 1).astype(np.int32)
    pred = np.roll(truth, 1, axis=1)  # each shifted by one column (the last wraps round): IoU 56 / 72
    tp, fp, fn, pairs = match_instances(truth, pred)
    assert (tp, fp, fn) == (16384, 0, 0)
    ids = np.array([(t, p) for t, p, _ in pairs])
    # each instance matches its own shifted copy (IoU 56/72), never its neighbour (IoU 8/120)
    assert (ids[:, 0] == ids[:, 1]).all() and sorted(ids[:, 0]) == list(range(1, 16385))
    assert np.allclose([iou for _, _, iou in pairs], 56 / 72)
