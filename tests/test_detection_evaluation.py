"""COCO evaluation: exact values on hand-computed cases, agreement with pycocotools, ignore regions."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.exporters import LabelledImage, write_coco
from aerosynth.data.imageio import write_png
from aerosynth.data.tileset import SplitInfo, TileRecord, open_evaluation_split, tiles_document
from aerosynth.detection.evaluation import EvaluationResult, evaluate_coco, evaluate_split
from aerosynth.detection.toydata import write_toy_split


def _write_split(root: Path, boxes: list[list[list[float]]], ignore: list[list[list[float]]] | None = None) -> Path:
    """A labelled 64x64 split, one tile per entry of ``boxes``."""
    split = root / "source-val"
    items, records = [], []
    for i, bx in enumerate(boxes):
        tid = f"t{i}"
        img = np.full((64, 64, 3), 100, np.uint8)
        path = write_png(split / "images" / f"{tid}.png", img)
        ign = Detections(ignore[i]) if ignore and ignore[i] else None
        items.append(LabelledImage(tid, path, Detections(bx), ign))
        records.append(TileRecord(tid, "x.png", "g", 0, 0, 64, 64, bool(bx)))
    info = SplitInfo(name="source-val", domain="d", gsd=0.125, tile_size=64, weak=False)
    atomic_write_json(split / "tiles.json", tiles_document(info, records))
    write_coco(split / "annotations.json", items, ["vehicle"])
    return split


def _dets(boxes, scores) -> Detections:
    return Detections(np.array(boxes, float).reshape(-1, 4), np.array(scores, float))


def test_perfect_predictions_score_one(tmp_path):
    write_toy_split(
        tmp_path / "target-test",
        9,
        seed=3,
        name="target-test",
        weak=True,
        labels_dir=tmp_path / "evaluation" / "target-test",
    )
    split = open_evaluation_split(tmp_path, "target-test")
    preds = []
    for t in split.tiles:
        gt = split.labels(t.tile_id)
        preds.append(Detections(gt.xyxy, np.full(len(gt), 0.9)))
    r = evaluate_split(split, preds)
    assert r.ap50 == pytest.approx(1.0)
    assert r.ap50_95 == pytest.approx(1.0)
    assert (r.precision, r.recall, r.f1, r.threshold) == pytest.approx((1.0, 1.0, 1.0, 0.9))
    assert r.n_ground_truth == 9 and r.n_predictions == 9 and r.n_images == 9


def test_hand_computed_partial_cases(tmp_path):
    a, b = [4, 4, 24, 14], [30, 30, 40, 50]
    split = open_evaluation_split(tmp_path, _write_split(tmp_path, [[a], [b]]).name)
    # one hit (0.9) and one miss: recall 0.5 at precision 1 -> 51 of the 101 recall points
    r = evaluate_split(split, [_dets([a], [0.9]), _dets([[50, 0, 60, 10]], [0.8])])
    assert r.ap50 == pytest.approx(51 / 101)
    assert (r.precision, r.recall, r.threshold) == pytest.approx((1.0, 0.5, 0.9))
    assert r.f1 == pytest.approx(2 / 3)
    # a false positive ranked above both hits: precision 1/2 at recall 1/2, 2/3 at recall 1
    r = evaluate_split(split, [_dets([a, [40, 40, 60, 60]], [0.8, 0.95]), _dets([b], [0.7])])
    assert r.ap50 == pytest.approx(2 / 3)
    assert (r.precision, r.recall, r.threshold) == pytest.approx((2 / 3, 1.0, 0.7))
    # a box with IoU 0.6 matches at the IoU thresholds 0.5, 0.55 and 0.6 (pycocotools: iou >= threshold)
    shifted = [a[0] + 5, a[1], a[2] + 5, a[3]]  # IoU = 15*10 / (25*10) = 0.6
    r = evaluate_split(split, [_dets([shifted], [0.9]), _dets([b], [0.95])])
    assert r.ap50 == pytest.approx(1.0)
    # those three thresholds give AP 1; the seven others: the exact box first (0.95), then a miss -> 51/101
    assert r.ap50_95 == pytest.approx((3 * 1.0 + 7 * 51 / 101) / 10)
    # nothing predicted
    r = evaluate_split(split, {})
    assert (r.ap50, r.ap50_95, r.recall, r.n_predictions) == (0.0, 0.0, 0.0, 0)


def test_agrees_with_direct_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    write_toy_split(tmp_path / "source-val", 12, seed=5, name="source-val", max_vehicles=4)
    split = open_evaluation_split(tmp_path, "source-val")
    rng = np.random.default_rng(0)
    preds = []
    for t in split.tiles:
        gt = split.labels(t.tile_id)
        keep = rng.random(len(gt)) < 0.8
        jitter = gt.xyxy[keep] + rng.normal(0, 2.0, (int(keep.sum()), 4))
        fps = rng.uniform(0, 100, (2, 2))
        fps = np.concatenate([fps, fps + rng.uniform(8, 25, (2, 2))], axis=1)
        boxes = np.concatenate([jitter, fps])
        preds.append(_dets(boxes, rng.uniform(0.001, 1, len(boxes))))
    ours = evaluate_split(split, preds)

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(split.coco_path))
        ids = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
        results = []
        for t, d in zip(split.tiles, preds, strict=True):
            results += [
                {k: v for k, v in ann.items() if k in ("image_id", "category_id", "bbox", "score")}
                for ann in d.to_coco(ids[f"images/{t.tile_id}.png"])
            ]
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours.ap50_95 == pytest.approx(ev.stats[0], abs=1e-6)
    assert ours.ap50 == pytest.approx(ev.stats[1], abs=1e-6)
    max_recall_50 = ev.eval["recall"][0, 0, 0, -1]  # IoU 0.5, class 0, area "all", maxDets 100
    assert ours.pr_curve.recall[-1] == pytest.approx(max_recall_50, abs=1e-6)
    assert ours.recall <= max_recall_50 + 1e-9
    assert 0 < ours.precision <= 1 and 0 < ours.recall <= 1


def test_ignore_regions_neither_help_nor_hurt(tmp_path):
    a = [4, 4, 24, 14]
    crowd = [40, 40, 60, 60]
    plain = open_evaluation_split(tmp_path / "p", _write_split(tmp_path / "p", [[a]]).name)
    ignored = open_evaluation_split(tmp_path / "i", _write_split(tmp_path / "i", [[a]], [[crowd]]).name)
    hit = _dets([a], [0.9])
    on_region = _dets([a, crowd], [0.9, 0.95])  # a detection on the ignore region, ranked first
    base = evaluate_split(plain, [hit])
    # a detection on an ignore region is not a false positive ...
    r = evaluate_split(ignored, [on_region])
    assert (r.ap50, r.precision, r.recall) == pytest.approx((base.ap50, base.precision, base.recall))
    # ... and a missed ignore region is not a false negative
    r = evaluate_split(ignored, [hit])
    assert (r.ap50, r.recall, r.n_ground_truth, r.n_ignore) == pytest.approx((1.0, 1.0, 1, 1))
    # the same detection without the region is a false positive
    r = evaluate_split(plain, [on_region])
    assert r.ap50 < base.ap50


def test_bad_inputs_and_roundtrip(tmp_path):
    split = open_evaluation_split(tmp_path, _write_split(tmp_path, [[[4, 4, 24, 14]]]).name)
    with pytest.raises(InputError, match="1 tiles"):
        evaluate_split(split, [])
    with pytest.raises(InputError, match="not in split"):
        evaluate_split(split, {"nope": Detections.empty(True)})
    with pytest.raises(InputError, match="without confidence"):
        evaluate_split(split, [Detections([[4, 4, 24, 14]])])
    with pytest.raises(InputError, match="image ids"):
        evaluate_coco(split.coco, {999: Detections.empty(True)})
    r = evaluate_split(split, [_dets([[4, 4, 24, 14]], [0.5])])
    back = EvaluationResult.from_dict(r.to_dict())
    assert back.ap50 == r.ap50 and np.allclose(back.pr_curve.recall, r.pr_curve.recall)
