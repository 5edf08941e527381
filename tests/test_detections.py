"""The detections type and its YOLO/COCO adapters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aerosynth.data.detections import Detections, box_iou, nms
from aerosynth.data.errors import InputError


def test_yolo_round_trip_is_exact_to_six_decimals():
    dets = Detections([[10, 20, 46, 34], [150.5, 150, 190, 166.25]], class_id=[0, 1])
    back = Detections.from_yolo(dets.to_yolo(200, 180), 200, 180)
    np.testing.assert_allclose(back.xyxy, dets.xyxy, atol=2e-4)
    assert back.class_id.tolist() == [0, 1]


def test_coco_round_trip_keeps_scores_and_classes():
    dets = Detections([[1, 2, 5, 9]], confidence=[0.7], class_id=[2])
    anns = dets.to_coco(image_id=3)
    assert anns[0]["bbox"] == [1.0, 2.0, 4.0, 7.0] and anns[0]["category_id"] == 3
    assert Detections.from_coco(anns) == dets


@pytest.mark.parametrize(
    "row, problem",
    [
        ("0 0.5 0.5 0.1", "expected 5 values"),
        ("0 0.5 nan 0.1 0.1", "not finite"),
        ("0 0.5 0.5 -0.1 0.1", "positive"),
        ("x 0.5 0.5 0.1 0.1", "not a number"),
        ("-1 0.5 0.5 0.1 0.1", "non-negative integer"),
        ("0 1.7 0.5 0.1 0.1", "outside [0, 1]"),
    ],
)
def test_malformed_yolo_rows_name_file_and_line(row, problem):
    with pytest.raises(InputError) as err:
        Detections.from_yolo(row, 100, 100, where="lab.txt")
    assert str(err.value).startswith("lab.txt:1: ") and problem in str(err.value)
    assert "\n" not in str(err.value)


def test_validate_rejects_inverted_and_nan_boxes():
    with pytest.raises(InputError, match="inverted"):
        Detections([[5, 5, 1, 9]]).validate("f.json")
    with pytest.raises(InputError, match="finite"):
        Detections([[np.nan, 5, 1, 9]]).validate("f.json")


def test_nms_keeps_best_of_overlapping_pair():
    dets = Detections([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], confidence=[0.5, 0.9, 0.3])
    kept = nms(dets, 0.5)
    assert sorted(kept.confidence.tolist()) == [0.3, 0.9]


def test_iou_of_identical_and_disjoint_boxes():
    iou = box_iou([[0, 0, 2, 2]], [[0, 0, 2, 2], [5, 5, 6, 6], [1, 0, 3, 2]])
    np.testing.assert_allclose(iou, [[1.0, 0.0, 1 / 3]])


boxes = st.tuples(st.floats(-50, 250), st.floats(-50, 250), st.floats(0.5, 80), st.floats(0.5, 80)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(boxes, min_size=0, max_size=8))
def test_clip_stays_inside_and_never_grows(box_list):
    dets = Detections(np.array(box_list).reshape(-1, 4))
    clipped = dets.clip(200, 150)
    assert np.all(clipped.xyxy[:, [0, 2]] >= 0) and np.all(clipped.xyxy[:, [0, 2]] <= 200)
    assert np.all(clipped.xyxy[:, [1, 3]] >= 0) and np.all(clipped.xyxy[:, [1, 3]] <= 150)
    assert np.all(clipped.area <= dets.area + 1e-9)


@settings(max_examples=200, deadline=None)
@given(st.lists(boxes, min_size=1, max_size=8), st.integers(16, 400), st.integers(16, 400))
def test_yolo_round_trip_property(box_list, w, h):
    dets = Detections(np.array(box_list).reshape(-1, 4)).clip(w, h)
    dets = dets[(dets.xyxy[:, 2] - dets.xyxy[:, 0] > 1e-3) & (dets.xyxy[:, 3] - dets.xyxy[:, 1] > 1e-3)]
    back = Detections.from_yolo(dets.to_yolo(w, h), w, h)
    assert len(back) == len(dets)
    np.testing.assert_allclose(back.xyxy, dets.xyxy, atol=1e-6 * max(w, h) * 2)


def test_pixel_mask_rounds_corners_outward_grows_by_the_margin_and_clips():
    dets = Detections(np.array([[1.5, 2.2, 3.1, 4.0], [8.0, 8.0, 12.0, 12.0]]))
    mask = dets.pixel_mask(10, 9)
    assert mask.shape == (9, 10)
    assert mask[2:4, 1:4].all() and mask[2:4, 1:4].sum() == mask[:6, :6].sum()  # floor / ceil of the first box
    assert mask[8:, 8:].all() and mask.sum() == 6 + 2  # the second box clipped to the image
    grown = dets.pixel_mask(10, 9, margin=1.0)
    assert grown[1:5, 0:5].all() and not grown[6, 6]
    assert not Detections.empty().pixel_mask(4, 4).any()


def test_detection_lists_round_trip_exactly(tmp_path):
    from aerosynth.data.detections import load_detection_lists, save_detection_lists

    lists = {
        "a": [Detections([[1.5, 2.25, 9.0, 7.0], [0, 0, 3, 3]], [0.9, 0.125], [0, 2]), Detections.empty(True)],
        "b": [],
    }
    save_detection_lists(tmp_path / "p.npz", lists, {"record": {"seed": 3}})
    back, meta = load_detection_lists(tmp_path / "p.npz")
    assert meta == {"record": {"seed": 3}} and back == lists
    with pytest.raises(ValueError, match="confidences"):
        save_detection_lists(tmp_path / "q.npz", {"a": [Detections([[0, 0, 1, 1]])]}, {})
