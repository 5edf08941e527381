"""Loaders, tiling, weak labels and the prepare step on the tiny fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from aerosynth.data.detections import Detections
from aerosynth.data.domains import coco_domain, geotiff_domain, yolo_folder_domain
from aerosynth.data.errors import InputError
from aerosynth.data.exporters import LabelledImage, write_yolo_split
from aerosynth.data.prepare import PrepareSpec, SplitSpec, prepare_dataset
from aerosynth.data.tileset import LabelledTileSplit, WeakTileSplit, open_evaluation_split, open_split
from aerosynth.data.tiling import assign_boxes, resample, tile_offsets

FIXTURES = Path(__file__).parent / "data"


def test_tile_offsets_match_protocol_examples():
    assert tile_offsets(246, 128, "cover") == [0, 118]  # a 640x640 Madison frame at x0.384
    assert tile_offsets(1764, 128, "grid") == [i * 128 for i in range(13)]
    assert tile_offsets(128, 128, "cover") == [0]
    assert tile_offsets(100, 128, "grid") == []


def test_half_inside_rule_keeps_clips_or_ignores():
    dets = Detections([[120, 10, 140, 20], [110, 30, 140, 40], [-5, 50, 5, 60]])
    kept, ignore = assign_boxes(dets, 0, 0, 128, 128)
    # box 0: 8/20 inside -> ignore; box 1: 18/30 inside -> kept, clipped; box 2: exactly 50% -> kept
    np.testing.assert_allclose(kept.xyxy, [[110, 30, 128, 40], [0, 50, 5, 60]])
    np.testing.assert_allclose(ignore.xyxy, [[120, 10, 128, 20]])


def test_resample_size_and_labels_follow():
    img = np.zeros((640, 640, 3), np.uint8)
    assert resample(img, 0.384).shape == (246, 246, 3)


def test_yolo_coco_and_geotiff_loaders_agree_on_boxes():
    yolo = yolo_folder_domain(FIXTURES / "yolo_domain", gsd=0.1)
    coco = coco_domain(FIXTURES / "coco_domain" / "annotations.json", gsd=0.1)
    assert [i.group for i in yolo.images] == ["clipA", "clipA", "clipB", "clipC"]
    for a, b in zip(yolo.images, coco.images, strict=True):
        np.testing.assert_allclose(yolo.load(a).detections.xyxy, coco.load(b).detections.xyxy, atol=0.01)
    geo = geotiff_domain(FIXTURES / "geotiff_domain")
    poly = geo.load(geo.images[0])
    assert poly.gsd == pytest.approx(0.25)
    np.testing.assert_allclose(poly.detections.xyxy, [[20, 30, 38, 37], [120, 200, 127, 218]], atol=1e-6)
    point = geo.load(geo.images[1])  # a WGS84 point -> 5.3 m box centred on the vehicle
    np.testing.assert_allclose(point.detections.centers, [[69, 63.5]], atol=1e-3)
    np.testing.assert_allclose(point.detections.xyxy[0, 2] - point.detections.xyxy[0, 0], 5.3 / 0.25, atol=1e-3)


def _spec(tmp_domain=None) -> PrepareSpec:
    src = yolo_folder_domain(FIXTURES / "yolo_domain", gsd=0.125)
    tgt = geotiff_domain(FIXTURES / "geotiff_domain")
    return PrepareSpec(
        "fixture",
        [
            SplitSpec("source-train", src, exclude_groups=["clipC"], mode="cover"),
            SplitSpec("source-val", src, groups=["clipC"], mode="cover"),
            SplitSpec("target-train", tgt, groups=["scene_0"], mode="grid", weak=True),
            SplitSpec("target-test", tgt, groups=["scene_1"], mode="grid", weak=True),
        ],
        target_gsd=0.125,
        tile_size=128,
    )


def test_prepare_writes_splits_weak_flags_and_manifest(tmp_path):
    out = tmp_path / "tiles"
    manifest = prepare_dataset(_spec(), out)
    assert json.loads((out / "manifest.json").read_text())["splits"] == manifest["splits"]
    src = open_split(out / "source-train")
    assert isinstance(src, LabelledTileSplit)
    assert len(src) == manifest["splits"]["source-train"]["tiles"] == 3 * 4  # 200x180 -> 2x2 cover tiles
    boxes = sum(len(src.labels(t.tile_id)) for t in src)
    assert boxes == manifest["splits"]["source-train"]["boxes"] > 0
    # target: 256 px at 0.25 m -> 512 px at 0.125 m -> 4x4 grid; transform per tile
    tgt = open_split(out / "target-train")
    assert isinstance(tgt, WeakTileSplit) and len(tgt) == 16
    for attr in ("labels", "ignore_regions", "coco", "labels_dir"):
        assert not hasattr(tgt, attr)
    assert not (out / "target-train" / "labels").exists() and not (out / "target-train" / "annotations.json").exists()
    rec = tgt.record("scene_0_128_0")
    assert rec.crs == "EPSG:32632"
    assert Affine(*rec.transform) == Affine(0.125, 0, 690_000.0 + 16.0, 0, -0.125, 5_336_000.0)
    assert sum(tgt.weak_labels.values()) == manifest["splits"]["target-train"]["tiles_with_vehicles"] >= 1
    full = open_evaluation_split(out, "target-train")
    assert all(bool(len(full.labels(t.tile_id))) == t.has_vehicle for t in full)


def test_tile_images_match_the_resampled_source(tmp_path):
    out = tmp_path / "tiles"
    prepare_dataset(_spec(), out)
    split = open_split(out / "source-val")  # c_0 is a negative image
    assert [t.has_vehicle for t in split] == [False] * 4
    assert split.image(split.tiles[0].tile_id).shape == (128, 128, 3)


def test_prepare_is_deterministic(tmp_path):
    a = prepare_dataset(_spec(), tmp_path / "a")
    b = prepare_dataset(_spec(), tmp_path / "b")
    assert a["splits"] == b["splits"]


def test_failed_prepare_leaves_nothing(tmp_path):
    spec = _spec()
    spec.splits.append(SplitSpec("broken", spec.splits[0].domain, groups=["no-such-group"]))
    with pytest.raises(InputError, match="no-such-group"):
        prepare_dataset(spec, tmp_path / "tiles")
    assert list(tmp_path.iterdir()) == []


def test_yolo_export_loads_back_through_the_loader(tmp_path):
    img = np.zeros((64, 80, 3), np.uint8)
    item = LabelledImage("x", img, Detections([[4, 5, 20, 30]]))
    write_yolo_split(tmp_path / "ds", [item])
    dom = yolo_folder_domain(tmp_path / "ds", gsd=0.1)
    np.testing.assert_allclose(dom.load(dom.images[0]).detections.xyxy, [[4, 5, 20, 30]], atol=1e-3)
