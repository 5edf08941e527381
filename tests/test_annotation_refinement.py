"""Refinement: positives/negatives by threshold and top-1, the CNN decides the boxes in between."""

from __future__ import annotations

import numpy as np
import pytest

from aerosynth.annotation.fake_data import write_fake_synthetic_set
from aerosynth.annotation.refinement import Candidate, RefinementConfig, extract_crops, partition, refine
from aerosynth.annotation.relay import RelayConfig, _choose_lambdas
from aerosynth.annotation.synthetic_set import open_synthetic_set
from aerosynth.data.detections import Detections, box_iou
from aerosynth.data.errors import InputError


def _true_boxes(sset, name: str) -> Detections:
    """The planted vehicles of a fake set, recovered from its heat map (blob per vehicle)."""
    from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig, boxes_from_heatmap

    cfg = HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5, min_area_px=4)
    return Detections(boxes_from_heatmap(sset.heatmap(name), cfg).xyxy)


def _candidates(tmp_path, seed: int = 0):
    """Fake target sets with candidate boxes: true vehicles and junk, at high, middle and low confidence."""
    cars = open_synthetic_set(write_fake_synthetic_set(tmp_path / "tc", "target_cars", "kit_munich_aerial", 24, 21))
    empty = open_synthetic_set(write_fake_synthetic_set(tmp_path / "te", "target_empty", "kit_munich_aerial", 8, 22))
    rng = np.random.default_rng(seed)
    truth: dict[str, np.ndarray] = {}
    cands = []
    for sset in (cars, empty):
        for n in sset.names:
            real = _true_boxes(sset, n) if sset.with_vehicles else Detections.empty()
            xy = rng.uniform(0, 48, size=(3, 2))
            junk = Detections(np.concatenate([xy, xy + 14], axis=1))
            boxes = Detections.merge([real, junk])
            # real boxes: one high, the rest middle; junk: middle and low
            conf = np.concatenate([np.r_[0.9, np.full(max(len(real) - 1, 0), 0.4)][: len(real)], [0.45, 0.35, 0.05]])
            name = f"{sset.name}_{n}"
            truth[name] = np.r_[np.ones(len(real), bool), np.zeros(3, bool)]
            cands.append(
                Candidate(
                    name,
                    sset.image_path(n),
                    sset.heatmap_path(n),
                    Detections(boxes.xyxy, conf),
                    sset.with_vehicles,
                    sset.name,
                )
            )
    return cands, truth


def test_partition_rules() -> None:
    cfg = RefinementConfig()
    dets = Detections([[0, 0, 4, 4]] * 4, [0.05, 0.3, 0.6, 0.2])
    cand = Candidate("a", None, None, dets, with_vehicles=True)  # type: ignore[arg-type]
    assert partition(cand, 0.1, 0.5, cfg).tolist() == [0, -1, 1, -1]
    low_only = Candidate("b", None, None, Detections(dets.xyxy, [0.05, 0.3, 0.4, 0.2]), True)  # type: ignore[arg-type]
    assert partition(low_only, 0.1, 0.5, cfg).tolist() == [0, -1, 1, -1]  # the top-1 box is a positive
    empty = Candidate("c", None, None, dets, with_vehicles=False)  # type: ignore[arg-type]
    assert partition(empty, 0.1, 0.5, cfg).tolist() == [0, 0, 0, 0]


def test_crops_have_the_requested_channels(tmp_path) -> None:
    s = open_synthetic_set(write_fake_synthetic_set(tmp_path / "s", "target_cars", "kit_munich_aerial", 1, 3))
    boxes = Detections([[0, 0, 10, 10], [60, 60, 64, 64], [10, 20, 30, 25]])
    crops = extract_crops(s.image("000000"), s.heatmap_rgb("000000"), boxes, RefinementConfig(crop_size=16))
    assert crops.shape == (3, 6, 16, 16) and crops.dtype == np.float32
    assert 0.0 <= crops.min() and crops.max() <= 1.0
    rgb_only = extract_crops(s.image("000000"), None, boxes, RefinementConfig(channels="rgb"))
    assert rgb_only.shape == (3, 3, 32, 32)
    with pytest.raises(InputError, match="heat map"):
        extract_crops(s.image("000000"), None, boxes, RefinementConfig(channels="heatmap"))


def test_cnn_decides_uncertain_boxes(tmp_path) -> None:
    cands, truth = _candidates(tmp_path)
    cfg = RefinementConfig(epochs=15, crop_size=24, seed=0)
    items, report = refine(cands, 0.1, 0.8, cfg, checkpoint=tmp_path / "cnn.pt")
    assert report["decision"] == "cnn" and (tmp_path / "cnn.pt").is_file()
    assert 1 <= report["classifier"]["best_epoch"] <= 15
    by_name = {it.name: it for it in items}
    correct, total = 0, 0
    for cand in cands:
        it = by_name[cand.name]
        if not cand.with_vehicles:
            assert len(it.detections) == 0 and it.dropped == len(cand.detections)
            continue
        assert len(it.detections) >= 1 and it.status[0] == "kept"  # the top-1 (0.9) box
        assert it.dropped + len(it.detections) == len(cand.detections)
        # every middle-confidence box was decided by the CNN: compare with the truth
        kept = box_iou(cand.detections.xyxy, it.detections.xyxy).max(axis=1) > 0.99
        middle = (cand.detections.confidence > 0.1) & (cand.detections.confidence < 0.8)
        correct += int((kept[middle] == truth[cand.name][middle]).sum())
        total += int(middle.sum())
        assert not kept[cand.detections.confidence < 0.1].any()
    assert correct / total > 0.8, f"CNN right on {correct}/{total} uncertain boxes"
    assert report["refined"] == sum(s == "refined" for it in items for s in it.status) > 0

    # deterministic
    again, _ = refine(cands, 0.1, 0.8, cfg)
    assert all(a.detections == b.detections and a.status == b.status for a, b in zip(items, again, strict=True))


def test_refinement_without_negatives_falls_back_to_midpoint(tmp_path) -> None:
    cands, _ = _candidates(tmp_path)
    cars_only = [c for c in cands if c.with_vehicles]
    items, report = refine(cars_only, 0.0, 0.8, RefinementConfig(empty_images_as_negatives=False))
    assert report["decision"] == "midpoint"
    for it in items:
        assert all(c >= 0.4 for c in it.detections.confidence)
    with pytest.raises(InputError, match="lambda_low"):
        refine(cands, 0.9, 0.1)


def test_lambdas_from_held_out_synthetic_source() -> None:
    refs = [Detections([[0, 0, 10, 10], [20, 20, 30, 30]]), Detections([[5, 5, 15, 15]])]
    preds = [
        Detections([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.9, 0.3, 0.6]),
        Detections([[5, 5, 15, 15], [30, 30, 40, 40]], [0.8, 0.1]),
    ]
    lam = _choose_lambdas(RelayConfig(precision_target=0.99, recall_target=1.0), preds, refs)
    assert lam["lambda_high"] == 0.8 and lam["lambda_low"] == 0.3
    assert lam["chosen_by"] == {"lambda_high": "precision_target", "lambda_low": "recall_target"}
    fixed = _choose_lambdas(RelayConfig(lambda_high=0.7, lambda_low=0.2), preds, refs)
    assert (fixed["lambda_high"], fixed["lambda_low"]) == (0.7, 0.2)
    unreachable = _choose_lambdas(
        RelayConfig(precision_target=0.99, recall_target=1.0),
        [Detections([[60, 60, 70, 70]], [0.5]), Detections.empty(True)],
        refs,
    )
    assert unreachable["chosen_by"]["lambda_low"].startswith("predict_conf_fallback")
    assert unreachable["lambda_low"] <= unreachable["lambda_high"]
