"""Real target tiles labelled from weak flags and label-free proposals (annotation.real_target)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aerosynth.annotation.real_target import (
    apply_flags,
    heatmap_proposals,
    label_real_tiles,
    source_threshold,
)
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.tileset import open_split
from tests.test_generation_helpers import make_split


@pytest.fixture()
def splits(tmp_path) -> tuple[Path, Path]:
    return (
        make_split(tmp_path, "source-val", "madison_drone", n=6, weak=False),
        make_split(tmp_path, "target-train", "kit_munich_aerial", n=6, seed=1),
    )


def _proposals(n: int) -> list[Detections]:
    """Two boxes per tile: a confident one and a weak one."""
    return [
        Detections(np.array([[2, 2, 10, 8], [20, 20, 28, 26]], float), np.array([0.9, 0.2]), np.zeros(2, int))
        for _ in range(n)
    ]


def test_flags_decide_empty_tiles_threshold_and_best_box(splits):
    split = open_split(splits[1])
    flags = [t.has_vehicle for t in split.tiles]
    labels = apply_flags(split, _proposals(len(flags)), threshold=0.5)
    assert [len(d) for d in labels] == [1 if f else 0 for f in flags]  # empty tiles: none; others: above 0.5
    labels = apply_flags(split, _proposals(len(flags)), threshold=0.95)
    assert [len(d) for d in labels] == [1 if f else 0 for f in flags]  # nothing above: the best box is kept
    assert all(float(d.confidence[0]) == 0.9 for d in labels if len(d))
    labels = apply_flags(split, _proposals(len(flags)), threshold=0.1)
    assert [len(d) for d in labels] == [2 if f else 0 for f in flags]


def test_threshold_comes_from_labelled_source_tiles_only(splits):
    val = open_split(splits[0])
    truth = [val.labels(t.tile_id) for t in val.tiles]
    noisy = [
        Detections.merge(
            [
                Detections(g.xyxy, np.full(len(g), 0.8), np.zeros(len(g), int)),
                Detections(np.array([[0, 0, 3, 3]], float), np.array([0.3]), np.zeros(1, int)),
            ]
        )
        for g in truth
    ]
    threshold, scores = source_threshold(noisy, val)
    assert 0.3 < threshold <= 0.8 and scores["precision"] == 1.0 and scores["recall"] == 1.0
    with pytest.raises(InputError, match="source tiles only"):
        source_threshold(noisy, open_split(splits[1]))  # a weak split has no boxes to choose on


def test_flagged_threshold_is_chosen_on_source_tiles_that_hold_a_vehicle(splits):
    val = open_split(splits[0])
    truth = [val.labels(t.tile_id) for t in val.tiles]
    assert any(len(g) == 0 for g in truth) and any(len(g) for g in truth)
    # the two true boxes of a tile at 0.7 and 0.4; four false boxes at 0.5 on every empty tile only
    false = np.array([[1, 1, 6, 6], [8, 1, 14, 6], [1, 8, 6, 14], [8, 8, 14, 14]], float)
    proposals = [
        Detections(g.xyxy, np.array([0.7, 0.4]), np.zeros(2, int))
        if len(g)
        else Detections(false, np.full(4, 0.5), np.zeros(4, int))
        for g in truth
    ]
    everywhere, _ = source_threshold(proposals, val)
    flagged, scores = source_threshold(proposals, val, tiles="flagged")
    assert everywhere == pytest.approx(0.7)  # on all tiles the empty tiles' boxes push the threshold up
    assert flagged == pytest.approx(0.4) and scores["recall"] == 1.0 and scores["precision"] == 1.0
    with pytest.raises(InputError, match="all or flagged"):
        source_threshold(proposals, val, tiles="some")


def test_labelled_folder_and_poisoned_target_labels(splits, tmp_path):
    split = open_split(splits[1])
    proposals = _proposals(len(split.tiles))
    out = label_real_tiles(splits[1], proposals, 0.5, tmp_path / "out", "detector", provenance={"detector": "x"})
    summary = json.loads((out / "summary.json").read_text())
    flagged = sum(t.has_vehicle for t in split.tiles)
    assert summary["flagged_tiles"] == flagged and summary["boxes"] == flagged and summary["threshold"] == 0.5
    assert sorted(p.stem for p in (out / "labels").glob("*.txt")) == sorted(t.tile_id for t in split.tiles)
    first = {p.name: p.read_bytes() for p in (out / "labels").glob("*.txt")}
    # target boxes planted where an evaluation API would find them change nothing
    poison = splits[1].parent / "evaluation" / "target-train" / "labels"
    poison.mkdir(parents=True)
    for t in split.tiles:
        (poison / f"{t.tile_id}.txt").write_text("0 0.5 0.5 0.9 0.9\n")
    again = label_real_tiles(splits[1], proposals, 0.5, tmp_path / "out", "detector", provenance={"detector": "x"})
    assert {p.name: p.read_bytes() for p in (again / "labels").glob("*.txt")} == first
    shutil.rmtree(splits[1].parent / "evaluation")
    with pytest.raises(InputError, match="weak target split"):
        label_real_tiles(splits[0], _proposals(6), 0.5, tmp_path / "bad", "detector")
    with pytest.raises(InputError, match="method"):
        label_real_tiles(splits[1], proposals, 0.5, tmp_path / "bad", "oracle")


def test_heatmap_proposals_follow_the_map(splits):
    split = open_split(splits[1])

    def map_fn(rgb: np.ndarray) -> np.ndarray:
        heat = np.zeros((8, 8))
        heat[1:3, 4:7] = 1.0
        return heat

    boxes = heatmap_proposals(split, map_fn)
    assert len(boxes) == len(split.tiles)
    for d in boxes:
        assert len(d) == 1 and d.confidence is not None
        x0, y0, x1, y1 = d.xyxy[0]
        assert 14 <= x0 <= 18 and 2 <= y0 <= 6 and 26 <= x1 <= 30 and 10 <= y1 <= 14  # cells 4..6 x 1..2 of 8 -> px


def test_uncertain_proposals_of_flagged_tiles_are_masked_out(splits, tmp_path):
    from aerosynth.annotation.real_target import RealTargetConfig
    from aerosynth.data.imageio import read_rgb

    split = open_split(splits[1])
    proposals = _proposals(len(split.tiles))  # 0.9 at [2, 2, 10, 8], 0.2 at [20, 20, 28, 26]
    for fraction, masked in ((0.5, 0), (0.3, 1)):  # 0.2 < 0.5 x 0.5 (kept as background) vs >= 0.3 x 0.5
        cfg = RealTargetConfig(mask_uncertain=fraction)
        out = label_real_tiles(splits[1], proposals, 0.5, tmp_path / f"m{fraction}", "detector", cfg)
        summary = json.loads((out / "summary.json").read_text())
        flagged = [t for t in split.tiles if t.has_vehicle]
        assert summary["masked_regions"] == masked * len(flagged) and summary["boxes"] == len(flagged)
        for t in split.tiles:
            rgb, original = read_rgb(next((out / "images").glob(f"{t.tile_id}.*"))), split.image(t.tile_id)
            if masked and t.has_vehicle:  # the uncertain box is one colour, the rest of the tile untouched
                patch = rgb[20:26, 20:28].reshape(-1, 3)
                assert (patch == patch[0]).all() and not np.array_equal(rgb, original)
                keep = np.ones(rgb.shape[:2], bool)
                keep[20:26, 20:28] = False
                assert np.array_equal(rgb[keep], original[keep])
            else:  # tiles flagged empty (and unmasked runs) keep their pixels
                assert np.array_equal(rgb, original)
    # target boxes planted where an evaluation API would find them change no masked image or label
    poison = splits[1].parent / "evaluation" / "target-train" / "labels"
    poison.mkdir(parents=True)
    for t in split.tiles:
        (poison / f"{t.tile_id}.txt").write_text("0 0.5 0.5 0.9 0.9\n")
    again = label_real_tiles(splits[1], proposals, 0.5, tmp_path / "again", "detector", cfg)

    def files(d: Path) -> dict[str, bytes]:
        return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*.*")) if f.parent.name != d.name}

    assert files(again) == files(out) and files(out)
    shutil.rmtree(splits[1].parent / "evaluation")
    # the best proposal kept below the threshold on a flagged tile stays a label, never a masked region
    out = label_real_tiles(
        splits[1], proposals, 0.95, tmp_path / "best", "detector", RealTargetConfig(mask_uncertain=0.1)
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["masked_regions"] == sum(t.has_vehicle for t in split.tiles)  # only the 0.2 box
