"""Direct method: planted heat maps give exactly the expected boxes; the export loads back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aerosynth.annotation.fake_data import write_fake_synthetic_set
from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig, annotate_direct, boxes_from_heatmap, otsu_threshold
from aerosynth.annotation.synthetic_set import open_synthetic_set
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError


def _planted(shape=(64, 64)) -> np.ndarray:
    heat = np.zeros(shape)
    heat[10:20, 5:15] = 0.9  # 10x10 block, peak 0.9
    heat[12, 8] = 1.0  # its peak pixel
    heat[40:44, 30:46] = 0.6  # 4x16 block
    heat[2, 60] = 0.95  # a single hot pixel: below min_area
    return heat


def test_fixed_threshold_gives_tight_component_boxes() -> None:
    cfg = HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5, min_area_px=4)
    dets = boxes_from_heatmap(_planted(), cfg)
    np.testing.assert_array_equal(dets.xyxy, [[5, 10, 15, 20], [30, 40, 46, 44]])
    np.testing.assert_allclose(dets.confidence, [1.0, 0.6])
    assert dets.class_id.tolist() == [0, 0]


def test_threshold_above_weak_blob_and_mean_confidence() -> None:
    cfg = HeatmapBoxConfig(threshold_mode="fixed", threshold=0.7, confidence="mean")
    dets = boxes_from_heatmap(_planted(), cfg)
    np.testing.assert_array_equal(dets.xyxy, [[5, 10, 15, 20]])
    assert dets.confidence[0] == pytest.approx((99 * 0.9 + 1.0) / 100)


def test_max_fraction_and_otsu_are_per_image() -> None:
    heat = _planted() * 0.5  # the same map, weaker: a fixed 0.5 threshold would find nothing
    assert len(boxes_from_heatmap(heat, HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5))) == 0
    frac = boxes_from_heatmap(heat, HeatmapBoxConfig(threshold_mode="max_fraction", max_fraction=0.5))
    np.testing.assert_array_equal(frac.xyxy, [[5, 10, 15, 20], [30, 40, 46, 44]])
    otsu = boxes_from_heatmap(heat, HeatmapBoxConfig(threshold_mode="otsu"))
    np.testing.assert_array_equal(otsu.xyxy, frac.xyxy)
    assert 0.0 < otsu_threshold(heat) <= 0.3


def test_min_threshold_floor_drops_flat_noise() -> None:
    rng = np.random.default_rng(0)
    noise = rng.random((32, 32)) * 0.1
    cfg = HeatmapBoxConfig(threshold_mode="max_fraction", max_fraction=0.5, min_threshold=0.3)
    assert len(boxes_from_heatmap(noise, cfg)) == 0
    assert len(boxes_from_heatmap(np.zeros((16, 16)), HeatmapBoxConfig())) == 0


def test_fixed_size_boxes_centred_on_peak_with_gsd() -> None:
    cfg = HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5, box_mode="fixed", box_side_m=5.3)
    heat = np.zeros((128, 128))
    heat[60:66, 40:50] = 0.8
    heat[62, 44] = 1.0
    dets = boxes_from_heatmap(heat, cfg, gsd=0.125)
    side = 5.3 / 0.125  # 42.4 px, AGenDA's box at 0.125 m/px
    cx, cy = 44.5, 62.5
    np.testing.assert_allclose(dets.xyxy, [[cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]])


def test_fixed_boxes_are_clipped_and_nms_merges_neighbours() -> None:
    heat = np.zeros((64, 64))
    heat[1:4, 1:4] = 1.0  # near the corner: box clipped to the image
    heat[30:33, 30:33] = 0.9
    heat[30:33, 34:37] = 0.8  # 4 px to the right: two boxes of 16 px overlap heavily (IoU 0.6)
    cfg = HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5, box_mode="fixed", box_side_m=4.0, min_area_px=4)
    dets = boxes_from_heatmap(heat, cfg, gsd=0.25)
    assert len(dets) == 2
    np.testing.assert_allclose(dets.xyxy[0], [0, 0, 1.5 + 8, 1.5 + 8])  # peak pixel (1, 1), clipped
    np.testing.assert_allclose(dets.xyxy[1], [30.5 - 8, 30.5 - 8, 30.5 + 8, 30.5 + 8])
    no_nms = boxes_from_heatmap(heat, HeatmapBoxConfig(**{**cfg.to_dict(), "nms_iou": None}), gsd=0.25)
    assert len(no_nms) == 3


def test_split_peaks_separates_touching_vehicles() -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    heat = np.maximum(
        np.exp(-((xx - 22) ** 2 + (yy - 32) ** 2) / 30.0), np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / 30.0)
    )
    joined = boxes_from_heatmap(heat, HeatmapBoxConfig(threshold_mode="fixed", threshold=0.3))
    assert len(joined) == 1
    split = boxes_from_heatmap(
        heat, HeatmapBoxConfig(threshold_mode="fixed", threshold=0.3, split_peaks=True, peak_min_distance_px=4)
    )
    assert len(split) == 2
    centres = sorted(split.centers[:, 0])
    assert centres[0] < 27 < centres[1]
    assert split.xyxy[:, 2].min() <= split.xyxy[:, 0].max() + 1  # the halves meet in the middle


def test_area_filters_and_max_boxes() -> None:
    heat = _planted()
    big_only = boxes_from_heatmap(heat, HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5, min_area_px=80))
    np.testing.assert_array_equal(big_only.xyxy, [[5, 10, 15, 20]])
    small_only = boxes_from_heatmap(heat, HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5, max_area_px=64))
    np.testing.assert_array_equal(small_only.xyxy, [[30, 40, 46, 44]])
    top1 = boxes_from_heatmap(heat, HeatmapBoxConfig(threshold_mode="fixed", threshold=0.5, max_boxes=1))
    np.testing.assert_array_equal(top1.xyxy, [[5, 10, 15, 20]])


def test_low_resolution_map_is_scaled_to_the_image() -> None:
    heat = np.zeros((16, 16))
    heat[4:6, 8:12] = 1.0
    dets = boxes_from_heatmap(heat, HeatmapBoxConfig(threshold_mode="fixed", min_area_px=1), image_size=(64, 64))
    np.testing.assert_array_equal(dets.xyxy, [[32, 16, 48, 24]])


def test_bad_input_is_reported() -> None:
    with pytest.raises(InputError, match="threshold_mode"):
        boxes_from_heatmap(np.zeros((4, 4)), HeatmapBoxConfig(threshold_mode="magic"))
    with pytest.raises(InputError, match="heatmap"):
        boxes_from_heatmap(np.zeros((4, 4, 3)))
    bad = np.zeros((4, 4))
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        boxes_from_heatmap(bad)


def test_synthetic_set_reader(tmp_path) -> None:
    d = write_fake_synthetic_set(tmp_path / "s", "target_cars", "kit_munich_aerial", 3, seed=1, raw_maps=True)
    s = open_synthetic_set(d)
    assert len(s) == 3 and s.with_vehicles and s.info.gsd == 0.25
    png = s.heatmap("000000", "cars")
    raw = s.heatmap("000000", "cars", raw=True)
    assert png.shape == (64, 64) and np.abs(png - raw).max() < 1e-2
    assert np.abs(s.heatmap("000000", "foreground") - s.heatmap("000000", "foreground", raw=True)).max() < 1e-2
    (d / "heatmaps" / "000002.png").unlink()
    with pytest.raises(InputError, match="000002.png"):
        open_synthetic_set(d)
    with pytest.raises(InputError, match="not a synthetic set"):
        open_synthetic_set(tmp_path)


def test_annotate_direct_exports_loadable_dataset(tmp_path) -> None:
    from pycocotools.coco import COCO

    cars = write_fake_synthetic_set(tmp_path / "cars", "target_cars", "kit_munich_aerial", 6, seed=2)
    empty = write_fake_synthetic_set(tmp_path / "empty", "target_empty", "kit_munich_aerial", 3, seed=3)
    cfg = HeatmapBoxConfig(threshold_mode="max_fraction", max_fraction=0.5, min_threshold=0.3)
    out = annotate_direct([cars, empty], tmp_path / "out", cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 9 and summary["method"] == "direct"
    assert summary["sets"]["target_empty"]["boxes"] == 0
    assert summary["images_without_boxes"] >= 3

    # every planted vehicle is found (heat maps have a blob per vehicle)
    s = open_synthetic_set(cars)
    coco = COCO(str(out / "annotations.json"))
    by_file = {img["file_name"]: img["id"] for img in coco.dataset["images"]}
    total = 0
    for name in s.names:
        text = (out / "labels" / f"target_cars_{name}.txt").read_text()
        yolo = Detections.from_yolo(text, 64, 64)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[by_file[f"images/target_cars_{name}.png"]]))
        from_coco = Detections.from_coco(anns)
        np.testing.assert_allclose(yolo.xyxy, from_coco.xyxy, atol=1e-3)
        total += len(yolo)
    assert total == summary["sets"]["target_cars"]["boxes"] > 0
    for name in ("target_empty_000000", "target_empty_000002"):
        assert (out / "labels" / f"{name}.txt").read_text() == ""

    geo = json.loads((out / "boxes.geojson").read_text())
    assert len(geo["features"]) == summary["boxes"]
    assert geo["crs"]["properties"]["name"].endswith("3857")
    # polygons are the pixel boxes through the image's synthetic transform (EPSG:3857, pixel = GSD)
    georef = json.loads((out / "georef.json").read_text())
    assert georef["crs"] == "EPSG:3857" and georef["gsd"] == 0.25
    feat = geo["features"][0]
    a, b, c, d, e, f = georef["transforms"][feat["properties"]["image"]]
    x1, y1, x2, y2 = feat["properties"]["pixel_xyxy"]
    ring = np.array(feat["geometry"]["coordinates"][0])
    assert (a, b, d, e) == (0.25, 0.0, 0.0, -0.25)
    np.testing.assert_allclose(ring.min(axis=0), [a * x1 + c, e * y2 + f])
    np.testing.assert_allclose(ring.max(axis=0), [a * x2 + c, e * y1 + f])
    origins = {(t[2], t[5]) for t in georef["transforms"].values()}
    assert len(origins) == 9  # images do not overlap on the map

    from aerosynth.data.imageio import read_rgb

    preview = read_rgb(out / "preview.png")
    assert preview.shape[0] >= 128 and preview.shape[1] == 4 * (2 * 128 + 8)
    assert (preview == [0, 255, 0]).all(axis=2).any()  # boxes drawn in green

    manifest = json.loads((out / "manifest.json").read_text())
    assert "preview.png" in manifest["files"] and "data.yaml" in manifest["files"]
    assert [i["set"] for i in manifest["inputs"]] == ["target_cars", "target_empty"]

    # rerun: same bytes (atomic replace of the folder)
    before = {p.name: p.read_bytes() for p in out.glob("*.json")}
    annotate_direct([cars, empty], tmp_path / "out", cfg)
    assert before == {p.name: p.read_bytes() for p in out.glob("*.json")}
