"""Weighted boxes fusion of the two real-tile proposers (``annotation.fusion``)."""

from __future__ import annotations

import numpy as np
import pytest

from aerosynth.annotation.fusion import fuse_boxes, fuse_proposers
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError


def _dets(boxes, conf):
    return Detections(np.asarray(boxes, float), np.asarray(conf, np.float32), np.zeros(len(boxes), np.int64))


def test_boxes_both_proposers_found_outrank_a_lone_box():
    detector = _dets([[10, 10, 20, 20], [50, 50, 60, 60]], [0.8, 0.9])
    heatmap = _dets([[11, 11, 21, 21]], [0.6])
    fused = fuse_boxes([detector, heatmap])
    assert len(fused) == 2
    # the agreed vehicle: mean confidence of both; the lone one: half its confidence (one proposer of two)
    assert fused.confidence[0] == pytest.approx(0.7)
    assert fused.confidence[1] == pytest.approx(0.45)
    # coordinates averaged with the confidences as weights
    expected = (np.array([10, 10, 20, 20]) * 0.8 + np.array([11, 11, 21, 21]) * 0.6) / 1.4
    np.testing.assert_allclose(fused.xyxy[0], expected, rtol=1e-6)
    np.testing.assert_allclose(fused.xyxy[1], [50, 50, 60, 60])


def test_boxes_below_the_iou_stay_apart_and_duplicates_of_one_proposer_do_not_count_twice():
    a = _dets([[0, 0, 10, 10], [1, 0, 11, 10]], [0.9, 0.9])  # one proposer's two boxes on one vehicle
    b = _dets([[30, 30, 40, 40]], [0.5])
    fused = fuse_boxes([a, b], iou_threshold=0.5)
    assert len(fused) == 2
    assert fused.confidence[0] == pytest.approx(0.45)  # one proposer of two, however many boxes it put there
    assert len(fuse_boxes([a, b], iou_threshold=1.0)) == 3


def test_weights_scale_a_proposer_and_empty_tiles_fuse_to_nothing():
    a, b = _dets([[0, 0, 10, 10]], [0.8]), _dets([[40, 40, 50, 50]], [0.8])
    fused = fuse_boxes([a, b], weights=[3, 1])
    assert fused.confidence.tolist() == pytest.approx([0.6, 0.2])
    empty = Detections.empty(with_confidence=True)
    assert len(fuse_boxes([empty, empty])) == 0
    assert len(fuse_boxes([a, empty])) == 1


def test_bad_inputs_are_refused():
    a = _dets([[0, 0, 10, 10]], [0.8])
    with pytest.raises(InputError):
        fuse_boxes([])
    with pytest.raises(InputError):
        fuse_boxes([a, a], weights=[1])
    with pytest.raises(InputError):
        fuse_boxes([a, a], iou_threshold=0)
    with pytest.raises(InputError, match="different tile counts"):
        fuse_proposers([[a], [a, a]])
    assert [len(d) for d in fuse_proposers([[a, a], [a, Detections.empty(True)]])] == [1, 1]
