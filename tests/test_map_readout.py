"""Reading boxes out of coarse attention maps: resampling, and the readout chosen on source-val."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from aerosynth.annotation.fake_data import write_fake_split
from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig, boxes_from_heatmap
from aerosynth.annotation.map_quality import (
    MapReadout,
    choose_map_source,
    choose_readout,
    evaluate_map_quality,
    flag_auc,
    memoised,
    normalise_map,
    normalise_maps,
    readout_candidates,
)
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.tileset import open_evaluation_split, open_split


def _coarse_map(boxes: np.ndarray, size: int = 128, side: int = 16, peak: float = 0.6) -> np.ndarray:
    """What a box-supervised "cars" map looks like: the box mask area-pooled to the attention grid."""
    mask = np.zeros((size, size), np.float32)
    for x1, y1, x2, y2 in boxes:
        mask[int(round(y1)) : int(round(y2)), int(round(x1)) : int(round(x2))] = 1.0
    return peak * cv2.resize(mask, (side, side), interpolation=cv2.INTER_AREA)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_upsampling_a_coarse_map_gives_boxes_that_fit_small_vehicles() -> None:
    """2 x 4 m cars off the 8 px grid: boxes of the resampled map fit them better than the raw grid's."""
    rng = np.random.default_rng(0)
    ious: dict[int, list[float]] = {1: [], 4: []}
    for i in range(40):
        x, y = rng.uniform(10, 90, 2)
        w, h = (16.0, 33.0) if i % 2 else (33.0, 16.0)  # 0.125 m/px
        truth = np.array([[x, y, x + w, y + h]])
        heat = _coarse_map(truth)
        for up in ious:
            cfg = HeatmapBoxConfig(threshold_mode="fixed", threshold=0.3, upsample=up)
            found = boxes_from_heatmap(heat, cfg, image_size=(128, 128))
            ious[up].append(max([_iou(b, truth[0]) for b in found.xyxy], default=0.0))
    raw, fine = np.array(ious[1]), np.array(ious[4])
    assert fine.mean() > raw.mean() + 0.15
    assert (fine >= 0.7).all() and (raw >= 0.7).mean() < 0.6
    with pytest.raises(InputError, match="upsample"):
        HeatmapBoxConfig(upsample=0).validate()


def test_peak_distance_counts_cells_of_the_map_as_given() -> None:
    """Two touching cars: split at 1 cell apart whether or not the map is resampled."""
    truth = np.array([[16.0, 40.0, 32.0, 72.0], [32.0, 40.0, 48.0, 72.0]])
    heat = _coarse_map(truth)
    heat[:, 4] *= 0.8  # a shallow valley between them
    for up in (1, 4):
        cfg = HeatmapBoxConfig(threshold_mode="fixed", threshold=0.2, upsample=up, split_peaks=True)
        assert len(boxes_from_heatmap(heat, cfg, image_size=(128, 128))) == 2, up


def _truth_map(split):
    """A map function that sees the split's boxes (a stand-in for a box-supervised model)."""
    by_bytes = {split.image(t.tile_id).tobytes(): split.labels(t.tile_id).xyxy for t in split.tiles}

    def fn(rgb: np.ndarray) -> np.ndarray:
        boxes = by_bytes[rgb.tobytes()]
        speckle = np.random.default_rng(int(rgb.sum())).uniform(0.0, 0.05, (16, 16))
        return _coarse_map(boxes * 128 / rgb.shape[1]) + speckle

    return fn


def test_chosen_readout_beats_the_default_rule_on_calibrated_coarse_maps(tmp_path) -> None:
    split = open_split(write_fake_split(tmp_path / "source-val", "madison_drone", 12, seed=2, weak=False, size=128))
    fn = memoised(_truth_map(split))
    readout, report = choose_readout(split, fn)
    default = evaluate_map_quality(split, fn)["scores"]["ap50"]
    chosen = evaluate_map_quality(split, fn, config=readout.config, normalise=readout.normalise)["scores"]["ap50"]
    assert chosen == pytest.approx(report["chosen"]["ap50"])
    assert chosen > default + 0.2
    # empty tiles have faint, speckled maps: min-max scaling would turn the speckle into boxes
    assert readout.normalise == "split" and readout.config.upsample == 4
    assert len(report["candidates"]) == len(readout_candidates())
    assert max(c["ap50"] for c in report["candidates"]) == pytest.approx(chosen)
    # what a report holds is a readout again
    assert MapReadout.from_dict(report["chosen"]) == readout


def test_the_map_source_is_the_one_whose_boxes_score_best_on_source_val(tmp_path) -> None:
    """Models x noise levels: the sharper maps win, a blurred copy loses, ties go to the first listed."""
    split = open_split(write_fake_split(tmp_path / "source-val", "madison_drone", 12, seed=2, weak=False, size=128))
    truth = memoised(_truth_map(split))

    def blurred(rgb: np.ndarray) -> np.ndarray:  # a model whose maps smear neighbouring vehicles together
        return cv2.GaussianBlur(truth(rgb), (0, 0), 2.5)

    def shuffled(rgb: np.ndarray) -> np.ndarray:  # maps that do not know where the vehicles are
        return np.roll(truth(rgb), 8, axis=(0, 1))

    sources = {"A@0.5": shuffled, "B@0.3": blurred, "C@0.1": truth, "C@0.3": truth}
    name, readout, report = choose_map_source(split, sources)
    scores = {k: v["ap50"] for k, v in report["sources"].items()}
    assert name == "C@0.1" and scores["C@0.1"] == scores["C@0.3"]  # the tie goes to the earlier one
    assert scores["C@0.1"] > scores["B@0.3"] > scores["A@0.5"]
    assert scores["A@0.5"] < 0.1 < 0.8 < scores["C@0.1"]
    # the readout returned is the winner's own, and scores what the report says
    again = evaluate_map_quality(split, truth, config=readout.config, normalise=readout.normalise)
    assert again["scores"]["ap50"] == pytest.approx(scores["C@0.1"])
    # a fixed readout is scored as given, for every source
    fixed = [MapReadout("minmax", HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5))]
    _, only, _ = choose_map_source(split, sources, candidates=fixed)
    assert only == fixed[0]
    with pytest.raises(InputError, match="no map source"):
        choose_map_source(split, {})


def test_readouts_are_chosen_on_source_tiles_only(tmp_path) -> None:
    root = tmp_path / "tiles"
    write_fake_split(
        root / "target-test", "kit_munich_aerial", 4, seed=1, weak=True, labels_dir=root / "evaluation" / "target-test"
    )
    target = open_evaluation_split(root, "target-test")
    with pytest.raises(InputError, match="source tiles only"):
        choose_readout(target, lambda rgb: np.zeros((16, 16)))
    with pytest.raises(InputError, match="source tiles only"):
        choose_readout(open_split(root / "target-test"), lambda rgb: np.zeros((16, 16)))
    with pytest.raises(InputError, match="normalise"):
        MapReadout.from_dict({"normalise": "softmax", "config": {}})
    with pytest.raises(InputError, match="not a map readout"):
        MapReadout.from_dict({"normalise": "none", "config": {"thresh": 0.3}})


def test_split_normalisation_is_blind_to_the_overall_strength_of_the_maps() -> None:
    rng = np.random.default_rng(0)
    maps = [rng.uniform(0, 0.5, (16, 16)) for _ in range(20)]
    weaker = normalise_maps([0.6 * m for m in maps], "split")
    for a, b in zip(normalise_maps(maps, "split"), weaker, strict=True):
        np.testing.assert_allclose(a, b)
        assert a.min() >= 0
    # maps above the percentile are not clipped: the strongest keep their order (and their boxes' confidences)
    peaks = [float(m.max()) for m in normalise_maps(maps, "split")]
    assert max(peaks) > 1 and sum(p >= 1 for p in peaks) <= 3
    top = np.argsort([float(m.max()) for m in maps])[-2:]
    assert peaks[top[1]] > peaks[top[0]]
    # one map alone cannot be split-normalised
    with pytest.raises(InputError, match="every map"):
        normalise_map(maps[0], "split")


def test_subset_keeps_labels_and_refuses_unknown_tiles(tmp_path) -> None:
    split = open_split(write_fake_split(tmp_path / "source-val", "madison_drone", 6, seed=3, weak=False))
    ids = [t.tile_id for t in split.tiles][::2]
    part = split.subset(ids)
    assert [t.tile_id for t in part.tiles] == ids and len(split.tiles) == 6
    for tile_id in ids:
        assert isinstance(part.labels(tile_id), Detections)
        np.testing.assert_array_equal(part.labels(tile_id).xyxy, split.labels(tile_id).xyxy)
    with pytest.raises(InputError, match="no tile"):
        split.subset(["nope"])


def test_flag_auc_reads_flags_only_and_sees_dead_maps() -> None:
    rng = np.random.default_rng(1)
    flags = [bool(i % 2) for i in range(40)]
    live = [rng.uniform(0, 0.2, (16, 16)) + (0.5 if f else 0.0) * (rng.uniform(size=(16, 16)) > 0.97) for f in flags]
    assert flag_auc(live, flags) > 0.9
    dead = [np.full((16, 16), 1e-6) for _ in flags]  # attends nowhere: every peak ties
    assert flag_auc(dead, flags) == pytest.approx(0.5)
    assert flag_auc(live, [True] * 40) is None
    with pytest.raises(InputError, match="flags"):
        flag_auc(live, flags[:3])
