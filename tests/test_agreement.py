"""Heat-map boxes of synthetic images scored against a detector's detections (no target label)."""

from __future__ import annotations

import numpy as np
import pytest

from aerosynth.annotation.agreement import heatmap_agreement, truth_threshold
from aerosynth.annotation.fake_data import write_fake_synthetic_set
from aerosynth.annotation.synthetic_set import open_synthetic_set
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError


def _detections(set_dir, shift: float = 0.0) -> dict[str, Detections]:
    """The boxes the fake set was drawn with (a translation set carries them), as confident detections."""
    sset = open_synthetic_set(set_dir)
    out = {}
    for name in sset.names:
        boxes = sset.yolo_labels(name).translate(shift, shift)
        out[name] = Detections(boxes.xyxy, np.full(len(boxes), 0.9))
    return out


def test_maps_on_the_vehicles_agree_and_shifted_ones_do_not(tmp_path):
    sset = write_fake_synthetic_set(tmp_path / "t", "translation", "kit_munich_aerial", 6, seed=1)
    good = heatmap_agreement(sset, _detections(sset))
    assert good["images"] == 6 and good["truth_boxes"] > 0 and good["heatmap_boxes"] > 0
    assert good["ap50"] > 0.8, good
    bad = heatmap_agreement(sset, list(_detections(sset, shift=30.0).values()))
    assert bad["ap50"] < 0.2, bad
    assert heatmap_agreement(sset, _detections(sset)) == good  # deterministic


def test_low_confidence_detections_are_not_truth(tmp_path):
    sset = write_fake_synthetic_set(tmp_path / "t", "translation", "kit_munich_aerial", 4, seed=2)
    result = heatmap_agreement(sset, _detections(sset), truth_threshold=0.95)
    assert result["truth_boxes"] == 0 and result["ap50"] is None and "no vehicle" in result["note"]


def test_bad_inputs(tmp_path):
    empty = write_fake_synthetic_set(tmp_path / "e", "target_empty", "kit_munich_aerial", 3, seed=3)
    with pytest.raises(InputError, match="no vehicles"):
        heatmap_agreement(empty, [Detections.empty()] * 3)
    cars = write_fake_synthetic_set(tmp_path / "c", "target_cars", "kit_munich_aerial", 3, seed=4)
    with pytest.raises(InputError, match="2 entries for 3"):
        heatmap_agreement(cars, [Detections.empty()] * 2)
    with pytest.raises(InputError, match="000002"):
        heatmap_agreement(cars, {"000000": Detections.empty(), "000001": Detections.empty()})


def test_truth_threshold_is_f1_optimal():
    gt = [Detections(np.array([[0, 0, 10, 10.0]]))]
    pred = [Detections(np.array([[0, 0, 10, 10.0], [20, 20, 30, 30.0]]), np.array([0.8, 0.3]))]
    assert truth_threshold(pred, gt) == pytest.approx(0.8)
