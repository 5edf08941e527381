"""The run report: gap closure (the one closure, ratio of means), files written, figures, manifests."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb
from aerosynth.data.tileset import open_evaluation_split
from aerosynth.detection import report as report_module
from aerosynth.detection.closure import gap_closure
from aerosynth.detection.evaluation import EvaluationResult, PRCurve, evaluate_split
from aerosynth.detection.report import Stat, summarise, write_report
from aerosynth.detection.toydata import write_toy_split


def _result(ap50: float) -> EvaluationResult:
    curve = PRCurve(np.array([0.5, ap50]), np.array([1.0, 0.8]), np.array([0.9, 0.3]))
    return EvaluationResult(ap50, ap50 / 2, 0.8, ap50, 0.7, 0.3, 4, 10, 0, 12, curve)


# Two seeds where the ratio of means and the mean of per-seed ratios differ: seed 1's gap is small, so
# its own ratio weighs as much as seed 0's in a mean of ratios but little in the ratio of means.
SOURCE, ORACLE, ADAPTED = (0.40, 0.70), (0.80, 0.75), (0.60, 0.74)
RATIO_OF_MEANS = (np.mean(ADAPTED) - np.mean(SOURCE)) / (np.mean(ORACLE) - np.mean(SOURCE))
MEAN_OF_RATIOS = np.mean([(a - s) / (o - s) for a, s, o in zip(ADAPTED, SOURCE, ORACLE, strict=True)])


def _two_seeds(**extra: tuple[float, ...]) -> dict[str, list[EvaluationResult]]:
    runs = {"source-only": SOURCE, "agenda": ADAPTED, **extra, "oracle": ORACLE}
    return {name: [_result(ap) for ap in aps] for name, aps in runs.items()}


def test_stat_format():
    assert Stat.of([0.5]).fmt() == "0.500" and Stat.of([]).fmt() == "n/a"
    assert Stat.of([0.5, 0.7]).fmt(2) == "0.60 ± 0.14"


def test_the_report_has_no_closure_of_its_own():
    assert not hasattr(report_module, "gap_closure") or report_module.gap_closure is gap_closure


def test_summary_orders_source_adapted_oracle():
    rows = summarise({"oracle": [_result(0.9)], "agenda": [_result(0.6), _result(0.7)], "source-only": [_result(0.5)]})
    assert [r["variant"] for r in rows] == ["source-only", "agenda", "oracle"]
    assert [r["role"] for r in rows] == ["source-only", "adapted", "oracle"]
    # paired by seed: the adapted seed 1 has no source-only or oracle seed 1, so only seed 0 counts
    assert rows[1]["gap_closure"].seeds == ("0",)
    assert rows[1]["gap_closure"].ratio_of_means == pytest.approx((0.6 - 0.5) / 0.4)
    assert rows[1]["gap_closure"].ci95 is None  # one seed: no interval
    assert rows[1]["ap50"].n == 2 and rows[0]["gap_closure"] is None and rows[2]["gap_closure"] is None


def test_summary_closure_is_the_ratio_of_means_with_its_interval():
    assert abs(RATIO_OF_MEANS - MEAN_OF_RATIOS) > 0.1  # the two readings differ on these seeds
    rows = {r["variant"]: r for r in summarise(_two_seeds())}
    closure = rows["agenda"]["gap_closure"]
    assert closure.ratio_of_means == pytest.approx(RATIO_OF_MEANS)
    assert closure == gap_closure(dict(enumerate(ADAPTED)), dict(enumerate(SOURCE)), dict(enumerate(ORACLE)))
    lo, hi = closure.ci95
    assert lo <= closure.ratio_of_means <= hi and lo < hi


def test_summary_pairs_seeds_by_name():
    variants = {
        "source-only": [_result(0.4), _result(0.7), _result(0.5)],
        "agenda": [_result(0.74), _result(0.60)],
        "oracle": [_result(0.8), _result(0.75), _result(0.9)],
    }
    rows = {r["variant"]: r for r in summarise(variants, seeds={"source-only": [0, 1, 2], "agenda": [1, 0]})}
    closure = rows["agenda"]["gap_closure"]  # the oracle's seeds by position: 0, 1, 2, the same names
    assert closure.seeds == ("1", "0") and closure.ratio_of_means == pytest.approx(RATIO_OF_MEANS)
    with pytest.raises(InputError, match="seeds\\[agenda\\]"):
        summarise(variants, seeds={"agenda": [0]})


def test_the_paired_oracle_is_listed_but_the_closure_is_against_the_oracle():
    rows = summarise(_two_seeds(**{"oracle-paired": (0.70, 0.74)}))
    assert [(r["variant"], r["role"]) for r in rows] == [
        ("source-only", "source-only"),
        ("agenda", "adapted"),
        ("oracle-paired", "oracle-paired"),
        ("oracle", "oracle"),
    ]
    assert rows[2]["gap_closure"] is None and rows[2]["ap50"].mean == pytest.approx(0.72)
    assert rows[1]["gap_closure"].ratio_of_means == pytest.approx(RATIO_OF_MEANS)


def test_report_quotes_the_closure_with_its_interval(tmp_path):
    variants = _two_seeds(**{"oracle-paired": (0.70, 0.74)})
    handed = {"variant": "agenda", "seed": 0, "path": "w/detector.pt"}
    md = write_report(tmp_path / "report", variants, handed_over=handed)
    text = md.read_text()
    closure = gap_closure(dict(enumerate(ADAPTED)), dict(enumerate(SOURCE)), dict(enumerate(ORACLE)))
    shown = closure.fmt()
    assert shown == f"{RATIO_OF_MEANS:.2f} ({closure.ci95[0]:.2f}..{closure.ci95[1]:.2f})"
    assert f"{MEAN_OF_RATIOS:.2f}" not in shown
    first = text.splitlines()[0]
    assert first.endswith(f", gap closure {shown}") and len(first) <= 200
    assert "| agenda | adapted | 2 |" in text and text.count(f" {shown} |") == 1  # the table's row
    assert "| oracle-paired | oracle-paired | 2 |" in text
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {r["variant"]: r for r in doc["variants"]}
    assert rows["agenda"]["gap_closure"] == closure.to_dict()
    assert rows["agenda"]["gap_closure"]["ratio_of_means"] == pytest.approx(RATIO_OF_MEANS)
    assert len(rows["agenda"]["gap_closure"]["ci95"]) == 2 and rows["agenda"]["gap_closure"]["seeds"] == ["0", "1"]
    assert rows["oracle-paired"]["gap_closure"] is None and rows["oracle"]["gap_closure"] is None


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
    assert rows["agenda"]["gap_closure"]["ratio_of_means"] == pytest.approx(expected_gap)
    assert rows["agenda"]["gap_closure"]["ci95"] is None  # one seed: no interval
    assert f"| {expected_gap:.2f} |" in text
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


def _toy_run(tmp_path):
    """A labelled toy target-test split and three variants' predictions on it: none, one box a tile, all."""
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
    predictions = {
        "source-only": [Detections(d.xyxy[:1], np.full(min(len(d), 1), 0.3)) for d in truth[:3]]
        + [Detections.empty(True) for _ in truth[3:]],
        "real-heatmap-r2+source": [Detections(d.xyxy[:1], np.full(min(len(d), 1), 0.6)) for d in truth],
        "oracle": [Detections(d.xyxy, np.full(len(d), 0.9)) for d in truth],
    }
    return split, {k: [evaluate_split(split, v)] for k, v in predictions.items()}


def test_report_opens_with_the_detector_handed_over_and_its_ap50_against_source_only(tmp_path):
    split, variants = _toy_run(tmp_path)
    name = "real-heatmap-r2+source"
    order = [f"`real-{m}-r{k}+source`: not built" for k in (4, 3) for m in ("heatmap", "fused", "self-training")]
    md = write_report(
        tmp_path / "report",
        variants,
        split=split,
        title="aerosynth toy: a -> b",
        handed_over={"variant": name, "seed": 0, "path": "runs/toy/detector.pt", "kind": "real"},
        how_chosen=["the first of the order built", "", *order, f"`{name}`: **handed over**"],
    )
    lines = md.read_text().splitlines()
    mine, base = variants[name][0].ap50, variants["source-only"][0].ap50
    assert mine > base  # the toy run: the adapted variant finds every tile's first box
    first = lines[0]
    assert len(first) <= 200 and first.startswith("# Handed over `real-heatmap-r2+source`")
    assert first.endswith(f"AP50 {mine:.3f} against source-only {base:.3f} ({mine - base:+.3f}) on target-test")
    assert "gap closure" not in first  # one seed: no interval, so the opening quotes none
    assert all(len(line) <= 200 for line in lines[:6])
    assert "`runs/toy/detector.pt` is seed 0 of `real-heatmap-r2+source` (real)" in "\n".join(lines[:4])
    assert "The run: aerosynth toy: a -> b." in lines[:6]
    # the order and the rule come further down, below the table
    chosen = lines.index("## How it was chosen")
    assert lines.index("## Results") < chosen and lines[chosen + 2] == "the first of the order built"
    assert not any("real-fused-r4+source" in line for line in lines[:chosen])
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert doc["handed_over"]["variant"] == name


def test_report_says_when_source_only_is_handed_over_and_refuses_an_unknown_variant(tmp_path):
    split, variants = _toy_run(tmp_path)
    handed = {"variant": "source-only", "seed": 1, "path": "w/detector.pt"}
    first = write_report(tmp_path / "r1", variants, split=split, handed_over=handed).read_text().splitlines()[0]
    ap = variants["source-only"][0].ap50
    assert first == f"# Handed over `source-only` (no adapted detector): AP50 {ap:.3f} on target-test"

    with pytest.raises(InputError, match="'real-fused\\+source' is not one of the variants reported"):
        write_report(tmp_path / "r2", variants, split=split, handed_over={**handed, "variant": "real-fused+source"})
