"""The run report: gap closure arithmetic, files written, figures, manifests."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from aerosynth.data.detections import Detections
from aerosynth.data.imageio import read_rgb
from aerosynth.data.tileset import open_evaluation_split
from aerosynth.detection.evaluation import EvaluationResult, PRCurve, evaluate_split
from aerosynth.detection.report import Stat, gap_closure, summarise, write_report
from aerosynth.detection.toydata import write_toy_split


def _result(ap50: float) -> EvaluationResult:
    curve = PRCurve(np.array([0.5, ap50]), np.array([1.0, 0.8]), np.array([0.9, 0.3]))
    return EvaluationResult(ap50, ap50 / 2, 0.8, ap50, 0.7, 0.3, 4, 10, 0, 12, curve)


def test_gap_closure_mean_and_std():
    g = gap_closure([0.6, 0.7], [0.4], [0.8])
    assert g.mean == pytest.approx(0.625) and g.std == pytest.approx(np.std([0.5, 0.75], ddof=1)) and g.n == 2
    assert gap_closure([0.6], [0.4, 0.6], [0.8, 1.0]).mean == pytest.approx((0.6 - 0.5) / (0.9 - 0.5))
    assert gap_closure([0.6], [0.8], [0.8]).n == 0  # no gap to close: undefined
    assert Stat.of([0.5]).fmt() == "0.500" and Stat.of([]).fmt() == "n/a"
    assert Stat.of([0.5, 0.7]).fmt(2) == "0.60 ± 0.14"


def test_summary_orders_source_adapted_oracle():
    rows = summarise({"oracle": [_result(0.9)], "agenda": [_result(0.6), _result(0.7)], "source-only": [_result(0.5)]})
    assert [r["variant"] for r in rows] == ["source-only", "agenda", "oracle"]
    assert [r["role"] for r in rows] == ["source-only", "adapted", "oracle"]
    assert rows[1]["gap_closure"].mean == pytest.approx(((0.6 - 0.5) / 0.4 + (0.7 - 0.5) / 0.4) / 2)
    assert rows[1]["ap50"].n == 2 and rows[0]["gap_closure"] is None


def test_write_report_files(tmp_path):
    write_toy_split(
        tmp_path / "target-test",
        6,
        seed=4,
        name="target-test",
        weak=True,
        labels_dir=tmp_path / "evaluation/target-test",
    )
    split = open_evaluation_split(tmp_path, "target-test")
    truth = [split.labels(t.tile_id) for t in split.tiles]
    perfect = [Detections(d.xyxy, np.full(len(d), 0.9)) for d in truth]
    half = [Detections(d.xyxy[:1], np.full(min(len(d), 1), 0.6)) for d in truth]
    none = [Detections.empty(True) for _ in truth]
    predictions = {"source-only": none, "agenda": half, "oracle": perfect}
    variants = {k: [evaluate_split(split, v)] for k, v in predictions.items()}
    manifest = tmp_path / "detector.json"
    manifest.write_text('{"a": 1}\n')
    md = write_report(tmp_path / "report", variants, split=split, predictions=predictions, manifests=[manifest])
    text = md.read_text()
    assert "| agenda | adapted | 1 |" in text and "gap closure" in text
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() in text
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {r["variant"]: r for r in doc["variants"]}
    assert rows["oracle"]["ap50"]["mean"] == pytest.approx(1.0)
    assert rows["source-only"]["ap50"]["mean"] == pytest.approx(0.0)
    expected_gap = variants["agenda"][0].ap50  # (adapted - 0) / (1 - 0)
    assert rows["agenda"]["gap_closure"]["mean"] == pytest.approx(expected_gap)
    assert len(rows["agenda"]["per_seed"][0]["pr_curve"]["recall"]) > 0
    pr = read_rgb(tmp_path / "report" / "pr_curves.png")
    assert pr.shape[0] > 100 and pr.std() > 0
    grid = read_rgb(tmp_path / "report" / "predictions_grid.png")
    assert grid.shape[1] == 3 * (2 * 128 + 4)  # one column per variant
    red = (grid[..., 0] == 255) & (grid[..., 1] == 0) & (grid[..., 2] == 0)
    green = (grid[..., 0] == 0) & (grid[..., 1] == 255) & (grid[..., 2] == 0)
    assert red.sum() > 0 and green.sum() > 0


def test_palette_png_keeps_shape_and_colours_and_is_smaller(tmp_path):
    """Report figures for committing: 256 colours, same size, close to the original, fewer bytes."""
    from aerosynth.data.imageio import write_png

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(120, 40, (96, 96, 3)), 0, 255).astype(np.uint8)
    img[10:12, :] = (255, 0, 0)
    full, small = write_png(tmp_path / "full.png", img), write_png(tmp_path / "small.png", img, palette=True)
    back = read_rgb(small)
    assert back.shape == img.shape
    assert len(np.unique(back.reshape(-1, 3), axis=0)) <= 256
    assert np.abs(back.astype(int) - img.astype(int)).mean() < 12
    assert small.stat().st_size < full.stat().st_size
