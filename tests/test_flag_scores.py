"""Flag-level scores of a detector: tile-level AP and AUROC against the flags, and rank agreement."""

from __future__ import annotations

import numpy as np
import pytest

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.detection.flag_scores import (
    flag_scores,
    spearman,
    tile_auroc,
    tile_average_precision,
    tile_score,
)


def _boxes(*confidences: float) -> Detections:
    n = len(confidences)
    return Detections(np.tile([[1.0, 1.0, 9.0, 9.0]], (n, 1)), np.array(confidences, dtype=float))


def test_tile_ap_and_auroc_by_hand():
    scores, flags = [0.9, 0.8, 0.7, 0.6], [True, False, True, False]
    assert tile_average_precision(scores, flags) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert tile_auroc(scores, flags) == pytest.approx(3 / 4)
    # a perfect ranking, and the reversed one
    assert tile_average_precision([0.9, 0.1], [True, False]) == 1.0 and tile_auroc([0.9, 0.1], [True, False]) == 1.0
    assert tile_auroc([0.1, 0.9], [True, False]) == 0.0
    # ties: one threshold takes both tiles, and a tie counts one half in the AUROC
    assert tile_average_precision([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert tile_auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)


def test_tile_ap_matches_the_area_under_the_step_curve_on_random_scores():
    rng = np.random.default_rng(0)
    scores = rng.random(200).round(2)  # many ties
    flags = rng.random(200) < 0.3
    # brute force: every distinct threshold, precision times the recall it adds
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        taken = scores >= t
        tp = (taken & flags).sum()
        recall = tp / flags.sum()
        ap += (recall - last_recall) * tp / taken.sum()
        last_recall = recall
    assert tile_average_precision(scores, flags) == pytest.approx(ap)
    # the AUROC against the pair count
    pos, neg = scores[flags], scores[~flags]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert tile_auroc(scores, flags) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_flag_scores_of_a_detector_use_its_best_box_per_tile():
    predictions = {
        "a": _boxes(0.9, 0.3),
        "b": _boxes(0.4),
        "c": Detections.empty(with_confidence=True),
        "d": _boxes(0.2),
    }
    flags = {"a": True, "b": False, "c": False, "d": True}
    assert tile_score(predictions["c"]) == 0.0 and tile_score(predictions["a"]) == 0.9
    s = flag_scores(predictions, flags, conf=0.25)
    assert (s.tiles, s.flagged) == (4, 2)
    assert s.auroc == pytest.approx(0.75)  # a beats b and c; d beats c only
    assert s.vehicles_per_tile == pytest.approx((2 + 1 + 0 + 0) / 4)
    with pytest.raises(InputError, match="no prediction"):
        flag_scores({"a": predictions["a"]}, flags)
    with pytest.raises(InputError, match="both kinds"):
        flag_scores(predictions, {"a": True, "d": True})


def test_spearman_of_two_rankings():
    ap50 = {"x": 0.5, "y": 0.7, "z": 0.9, "w": 0.6}
    assert spearman(ap50, {"x": 0.1, "y": 0.3, "z": 0.8, "w": 0.2}) == pytest.approx(1.0)
    assert spearman(ap50, {"x": 0.9, "y": 0.3, "z": 0.1, "w": 0.5}) == pytest.approx(-1.0)
    with pytest.raises(InputError, match="at least 3"):
        spearman(ap50, {"x": 0.1, "y": 0.2})
