"""Box metrics (checked against pycocotools) and the direct method's quality report on real-style tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aerosynth.annotation.fake_data import write_fake_split, write_fake_synthetic_set
from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig
from aerosynth.annotation.map_quality import evaluate_map_quality, evaluate_translation_set, normalise_map
from aerosynth.annotation.metrics import (
    f1_optimal_threshold,
    match_all,
    score_at,
    threshold_for_precision,
    threshold_for_recall,
)
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError


def _random_case(seed: int, n_images: int = 8):
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(n_images):
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 100, size=(k, 2))
        wh = rng.uniform(8, 20, size=(k, 2))
        gt = Detections(np.concatenate([xy, xy + wh], axis=1))
        jitter = rng.normal(0, 3, size=(k, 4))
        hit = Detections(gt.xyxy + jitter, rng.uniform(0.2, 1.0, k))
        m = int(rng.integers(0, 3))
        fxy = rng.uniform(0, 100, size=(m, 2))
        fake = Detections(np.concatenate([fxy, fxy + 12], axis=1), rng.uniform(0.0, 0.8, m))
        pred = Detections.merge([hit, fake])
        keep = pred.xyxy[:, 2] > pred.xyxy[:, 0]
        gts.append(gt)
        preds.append(pred[keep & (pred.xyxy[:, 3] > pred.xyxy[:, 1])])
    return preds, gts


def _pycoco_ap50(preds, gts) -> float:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1, "width": 200, "height": 200} for i in range(len(gts))]
    anns, dets = [], []
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        anns += g.to_coco(i + 1, len(anns) + 1)
        dets += p.to_coco(i + 1, len(dets) + 1)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "vehicle"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, 1000]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap50_agrees_with_pycocotools(seed: int) -> None:
    preds, gts = _random_case(seed)
    ours = score_at(match_all(preds, gts)).ap50
    assert ours == pytest.approx(_pycoco_ap50(preds, gts), abs=0.02)


def test_precision_recall_and_thresholds() -> None:
    gt = Detections([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    pred = Detections([[0, 0, 10, 10], [20, 20, 30, 30], [60, 60, 70, 70], [40, 41, 50, 50]], [0.9, 0.8, 0.7, 0.3])
    m = match_all([pred], [gt])
    assert m.true_positive.tolist() == [True, True, False, True]
    all_boxes = score_at(m, 0.0)
    assert (all_boxes.precision, all_boxes.recall) == (0.75, 1.0)
    best = f1_optimal_threshold(m)
    assert best.threshold == 0.3 and best.f1 == pytest.approx(2 * 0.75 / 1.75)
    assert threshold_for_precision(m, 0.99) == 0.8
    assert threshold_for_recall(m, 0.6) == 0.8
    assert threshold_for_recall(m, 1.0) == 0.3
    # a false positive inside an ignore region does not count
    ignored = match_all([pred], [gt], [Detections([[55, 55, 75, 75]])])
    assert score_at(ignored, 0.0).precision == 1.0


def _colour_deviation_map(rgb: np.ndarray) -> np.ndarray:
    """A stand-in for the LDM's "cars" map: how far each pixel is from the median colour."""
    med = np.median(rgb.reshape(-1, 3), axis=0)
    return np.abs(rgb.astype(float) - med).sum(axis=2)


def test_map_quality_report(tmp_path) -> None:
    split = write_fake_split(tmp_path / "source-val", "madison_drone", 10, seed=4, weak=False)
    cfg = HeatmapBoxConfig(threshold_mode="max_fraction", max_fraction=0.4, min_threshold=0.3, min_area_px=20)
    out = tmp_path / "quality.json"
    report = evaluate_map_quality(split, _colour_deviation_map, out, cfg, sweep_thresholds=(0.3, 0.9))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["tiles"] == 10 and report["ground_truth_boxes"] > 5
    assert report["scores"]["recall"] > 0.8 and report["scores"]["precision"] > 0.8
    assert report["scores"]["ap50"] > 0.7
    assert [e["fixed_threshold"] for e in report["sweep"]] == [0.3, 0.9]
    assert report["best_sweep"]["fixed_threshold"] == 0.3

    # a blank map finds nothing: recall 0
    blank = evaluate_map_quality(split, lambda rgb: np.zeros(rgb.shape[:2]), None, cfg, sweep_thresholds=())
    assert blank["scores"]["recall"] == 0.0 and blank["best_sweep"] is None


def test_map_quality_refuses_weak_split_and_bad_maps(tmp_path) -> None:
    weak = write_fake_split(
        tmp_path / "target-train",
        "kit_munich_aerial",
        3,
        seed=5,
        weak=True,
        labels_dir=tmp_path / "evaluation" / "target-train",
    )
    with pytest.raises(InputError, match="weak split"):
        evaluate_map_quality(weak, _colour_deviation_map)
    with pytest.raises(InputError, match="NaN"):
        normalise_map(np.full((4, 4), np.nan))


def test_translation_set_quality(tmp_path) -> None:
    tr = write_fake_synthetic_set(tmp_path / "tr", "translation", "madison_drone", 6, seed=7)
    cfg = HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5)
    report = evaluate_translation_set(tr, tmp_path / "q.json", cfg, sweep_thresholds=(0.5,))
    # the blob of each carried-over box gives a box of IoU >= 0.5 with it
    assert report["scores"]["recall"] == 1.0 and report["scores"]["precision"] == 1.0
    assert json.loads((tmp_path / "q.json").read_text())["images"] == 6
    cars = write_fake_synthetic_set(tmp_path / "c", "target_cars", "kit_munich_aerial", 1, seed=7)
    with pytest.raises(InputError, match="translation"):
        evaluate_translation_set(cars)
