"""The copy-paste baseline: source vehicles on real target tiles flagged empty (annotation.copy_paste)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aerosynth.annotation.copy_paste import CopyPasteConfig, copy_paste_set
from aerosynth.annotation.metrics import label_agreement
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb
from aerosynth.data.tileset import open_split
from tests.test_generation_helpers import make_split


@pytest.fixture()
def splits(tmp_path):
    return (
        make_split(tmp_path, "source-train", "madison_drone", n=8, size=48, weak=False),
        make_split(tmp_path, "target-train", "kit_munich_aerial", n=8, size=48, seed=1),
    )


def test_composites_are_empty_target_tiles_with_source_cars_at_their_boxes(splits, tmp_path):
    source, target = splits
    out = copy_paste_set(
        source, target, tmp_path / "cp", CopyPasteConfig(min_per_tile=2, max_per_tile=3, colour_pull=0.0)
    )
    split = open_split(target)
    empty = [t.tile_id for t in split.tiles if not t.has_vehicle]
    labels = sorted((out / "labels").glob("*.txt"))
    assert [p.stem for p in labels] == [f"cp_{t}" for t in empty]  # only tiles flagged empty are backgrounds
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] == len(empty) and summary["boxes"] >= 2 * len(empty)
    src = open_split(source)
    car_colours = {
        tuple(src.image(t.tile_id)[int(b[1]) + 2, int(b[0]) + 2]) for t in src.tiles for b in src.labels(t.tile_id).xyxy
    }
    for tile_id, path in zip(empty, labels, strict=True):
        rgb = read_rgb(out / "images" / f"cp_{tile_id}.png")
        background = split.image(tile_id)
        boxes = Detections.from_yolo(path.read_text(), 48, 48)
        assert 2 <= len(boxes) <= 3
        changed = np.any(rgb != background, axis=2)
        inside = np.zeros_like(changed)
        for x1, y1, x2, y2 in np.rint(boxes.xyxy).astype(int):
            inside[y1:y2, x1:x2] = True
            patch = rgb[y1:y2, x1:x2].reshape(-1, 3)
            assert any(tuple(p) in car_colours for p in patch)  # a source car (colour pull 0: exact pixels)
        assert not changed[~inside].any()  # nothing changed outside the boxes


def test_colour_pull_moves_crops_toward_the_tile_mean(splits, tmp_path):
    source, target = splits
    far, near = (
        copy_paste_set(source, target, tmp_path / name, CopyPasteConfig(colour_pull=pull, seed=3))
        for name, pull in (("far", 0.0), ("near", 0.8))
    )
    name = sorted((far / "labels").glob("*.txt"))[0].stem
    boxes = Detections.from_yolo((far / "labels" / f"{name}.txt").read_text(), 48, 48)
    mean = read_rgb(far / "images" / f"{name}.png").reshape(-1, 3).mean(axis=0)
    x1, y1, x2, y2 = np.rint(boxes.xyxy[0]).astype(int)
    gap = [np.abs(read_rgb(d / "images" / f"{name}.png")[y1:y2, x1:x2] - mean).mean() for d in (far, near)]
    assert gap[1] < 0.5 * gap[0]


def test_refuses_labelled_targets_and_evaluation_folders(splits, tmp_path):
    source, target = splits
    with pytest.raises(InputError, match="weak target split"):
        copy_paste_set(source, source, tmp_path / "x")
    with pytest.raises(InputError, match="labelled source"):
        copy_paste_set(target, target, tmp_path / "x")
    evaluation = make_split(tmp_path / "evaluation", "target-train", "kit_munich_aerial", n=2, weak=True)
    with pytest.raises(InputError, match="evaluation"):
        copy_paste_set(source, evaluation, tmp_path / "x")


def test_label_agreement_is_one_for_equal_folders_and_drops_with_changes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "t1.txt").write_text("0 0.5 0.5 0.1 0.1\n0 0.2 0.2 0.1 0.1\n")
    (b / "t1.txt").write_text("0 0.5 0.5 0.1 0.1\n0 0.2 0.2 0.1 0.1\n")
    assert label_agreement(a, b)["f1"] == pytest.approx(1.0)
    (b / "t2.txt").write_text("0 0.7 0.7 0.1 0.1\n")  # a tile only b labels: a has no box there
    agreement = label_agreement(a, b)
    assert agreement["recall"] == pytest.approx(2 / 3) and agreement["precision"] == pytest.approx(1.0)


def test_poisoned_target_labels_change_no_composite_byte(splits, tmp_path):
    source, target = splits
    first = copy_paste_set(source, target, tmp_path / "a", CopyPasteConfig(seed=2))
    # true target boxes planted where the evaluation API would find them (and a labels/ folder beside the
    # weak split): the composites and their boxes come from the flags and the source labels only
    for folder in (target.parent / "evaluation" / "target-train" / "labels", target / "labels"):
        folder.mkdir(parents=True)
        for t in open_split(target).tiles:
            (folder / f"{t.tile_id}.txt").write_text("0 0.5 0.5 0.9 0.9\n")
    again = copy_paste_set(source, target, tmp_path / "b", CopyPasteConfig(seed=2))

    def files(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    assert files(first) == files(again)
