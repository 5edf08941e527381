"""Sliced detection over a GeoTIFF: windows, merging across window edges, map coordinates, a real model."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from affine import Affine

from aerosynth.data.detections import Detections, box_iou
from aerosynth.data.errors import InputError
from aerosynth.data.rasters import write_geotiff
from aerosynth.detection.slicing import detect_array, detect_raster, detector_gsd, merge_boxes, window_origins, windows
from aerosynth.detection.toydata import background

torch.set_num_threads(2)

ORIGIN = (500_000.0, 5_400_000.0)  # UTM 32N, near 9 E 48.7 N


def _scene(width: int, height: int, scale: int = 1) -> tuple[np.ndarray, Detections]:
    """A scene with vehicles placed across window borders (tile 128, overlap 32: edges at 96, 128, 192...)."""
    rng = np.random.default_rng(0)
    img = background(height, width, rng)
    spots = [
        (90, 20, 22, 11),
        (120, 60, 11, 22),
        (10, 120, 22, 11),
        (185, 100, 22, 11),
        (230, 200, 11, 22),
        (40, 40, 22, 11),
        (150, 150, 22, 11),
        (60, 225, 11, 22),
    ]
    boxes = []
    for x, y, w, h in spots:
        x, y, w, h = x * scale, y * scale, w * scale, h * scale
        img[y : y + h, x : x + w] = 230 if (x // scale) % 2 else 20
        boxes.append([x, y, x + w, y + h])
    return img, Detections(np.array(boxes, float))


def stub_predictor(windows_seen: list | None = None):
    """Finds the planted vehicles by contrast with the window's median (confidence 0.9), ignoring padding."""

    def run(batch: list[np.ndarray]) -> list[Detections]:
        out = []
        for win in batch:
            if windows_seen is not None:
                windows_seen.append(win.shape)
            grey = win.astype(np.float32).mean(axis=2)
            inside = grey > 0  # zero padding of a window at the border is no vehicle
            mask = ((np.abs(grey - np.median(grey[inside])) > 50) & inside).astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            boxes = [[x, y, x + w, y + h] for x, y, w, h, area in stats[1:] if area >= 4]
            out.append(Detections(np.array(boxes, float).reshape(-1, 4), np.full(len(boxes), 0.9)))
        return out

    return run


def _matched(found: Detections, truth: Detections, min_iou: float = 0.9) -> None:
    assert len(found) == len(truth), f"{len(found)} boxes for {len(truth)} vehicles"
    iou = box_iou(found.xyxy, truth.xyxy)
    assert np.all(iou.max(axis=0) >= min_iou)


def test_windows_cover_the_image():
    assert window_origins(300, 128, 32) == [0, 96, 172]
    assert window_origins(128, 128, 32) == [0]
    assert window_origins(50, 128, 32) == [0]
    assert window_origins(224, 128, 32) == [0, 96]
    for length in (129, 200, 385, 1000):
        starts = window_origins(length, 128, 32)
        assert starts[-1] + 128 == length and all(b - a <= 96 for a, b in zip(starts, starts[1:], strict=False))
    assert len(windows(300, 260, 128, 32)) == 9
    with pytest.raises(InputError, match="overlap"):
        window_origins(300, 128, 128)


def test_merge_keeps_the_complete_box_and_neighbours():
    full = [100, 50, 122, 61]
    partial = [100, 50, 110, 61]  # the same vehicle cut by a window edge, higher score
    neighbour = [124, 50, 146, 61]
    dets = Detections([full, partial, neighbour], [0.8, 0.95, 0.7])
    merged = merge_boxes(dets, np.array([False, True, False]))
    assert merged.xyxy.tolist() == [full, neighbour]
    assert len(merge_boxes(Detections.empty(True))) == 0


def test_sliced_detection_finds_each_vehicle_once_across_window_edges():
    img, truth = _scene(300, 260)
    seen: list = []
    found = detect_array(img, stub_predictor(seen), tile=128, overlap=32)
    _matched(found, truth, 0.99)
    assert set(seen) == {(128, 128, 3)} and len(seen) == 9
    # a smaller-than-tile image is padded
    small, small_truth = img[:100, :90], Detections([[40, 40, 62, 51]])
    _matched(detect_array(small, stub_predictor(), tile=128, overlap=32), small_truth, 0.99)


def test_detect_raster_writes_vehicles_at_their_map_coordinates(tmp_path):
    img, truth = _scene(300, 260)
    gsd = 0.125
    raster = write_geotiff(tmp_path / "scene.tif", img, Affine(gsd, 0, ORIGIN[0], 0, -gsd, ORIGIN[1]), "EPSG:32632")
    out = tmp_path / "vehicles.geojson"
    n = detect_raster(raster, "unused.pt", out, tile=128, overlap=32, conf=0.5, predictor=stub_predictor())
    doc = json.loads(out.read_text())
    assert n == len(truth) == len(doc["features"])
    assert doc["crs"]["properties"]["name"].endswith("EPSG::32632")
    bounds = []
    for f in doc["features"]:
        ring = np.array(f["geometry"]["coordinates"][0])
        bounds.append([ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()])
        assert f["properties"]["confidence"] == pytest.approx(0.9) and f["properties"]["class_name"] == "vehicle"
    for x1, y1, x2, y2 in truth.xyxy:
        expected = [ORIGIN[0] + x1 * gsd, ORIGIN[1] - y2 * gsd, ORIGIN[0] + x2 * gsd, ORIGIN[1] - y1 * gsd]
        assert min(np.abs(np.array(bounds) - expected).max(axis=1)) < 1e-6
    # in WGS84 the vehicles lie near 9 E, 48.7 N
    detect_raster(raster, "unused.pt", out, predictor=stub_predictor(), to_wgs84=True)
    lon, lat = np.array(json.loads(out.read_text())["features"][0]["geometry"]["coordinates"][0]).mean(axis=0)
    assert 8.99 < lon < 9.01 and 48.7 < lat < 48.8


def test_detect_raster_resamples_to_the_detector_gsd(tmp_path):
    img, truth = _scene(600, 520, scale=2)  # 0.0625 m/px: vehicles twice as large in pixels
    raster = write_geotiff(
        tmp_path / "fine.tif", img, Affine(0.0625, 0, ORIGIN[0], 0, -0.0625, ORIGIN[1]), "EPSG:32632"
    )
    seen: list = []
    out = tmp_path / "v.geojson"
    n = detect_raster(raster, "unused.pt", out, target_gsd=0.125, predictor=stub_predictor(seen))
    assert n == len(truth)
    assert len(seen) == 9  # 600x520 px at 0.0625 -> 300x260 at 0.125 -> 3x3 windows
    bounds = np.array(
        [
            np.r_[np.min(r, axis=0), np.max(r, axis=0)]
            for r in (np.array(f["geometry"]["coordinates"][0]) for f in json.loads(out.read_text())["features"])
        ]
    )
    for x1, y1, x2, y2 in truth.xyxy:
        expected = [ORIGIN[0] + x1 * 0.0625, ORIGIN[1] - y2 * 0.0625, ORIGIN[0] + x2 * 0.0625, ORIGIN[1] - y1 * 0.0625]
        assert min(np.abs(bounds - expected).max(axis=1)) <= 0.13  # within a detector pixel


def test_detect_raster_input_errors(tmp_path):
    img, _ = _scene(200, 200)
    plain = write_geotiff(tmp_path / "plain.tif", img, None, None)
    with pytest.raises(InputError, match="no CRS"):
        detect_raster(plain, "unused.pt", tmp_path / "o.geojson", predictor=stub_predictor())
    geo = write_geotiff(tmp_path / "g.tif", img, Affine(0.1, 0, ORIGIN[0], 0, -0.1, ORIGIN[1]), "EPSG:32632")
    with pytest.raises(InputError, match="not found"):
        detect_raster(geo, tmp_path / "missing.pt", tmp_path / "o.geojson")
    with pytest.raises(InputError, match="target_gsd"):
        detect_raster(geo, "unused.pt", tmp_path / "o.geojson", target_gsd=0, predictor=stub_predictor())


def test_detect_raster_with_a_real_model(tmp_path, tiny_detector):
    weights = tiny_detector
    assert detector_gsd(weights) == 0.125  # detect_raster resamples to it when target_gsd is None
    img, _ = _scene(200, 150)
    raster = write_geotiff(tmp_path / "r.tif", img, Affine(0.125, 0, ORIGIN[0], 0, -0.125, ORIGIN[1]), "EPSG:32632")
    out = tmp_path / "det.geojson"
    n = detect_raster(raster, weights, out, tile=64, overlap=16, conf=0.0001)
    doc = json.loads(out.read_text())
    assert n == len(doc["features"]) and doc["type"] == "FeatureCollection"
    for f in doc["features"]:
        ring = np.array(f["geometry"]["coordinates"][0])
        assert ORIGIN[0] - 1e-6 <= ring[:, 0].min() and ring[:, 0].max() <= ORIGIN[0] + 200 * 0.125 + 1e-6
        assert f["properties"]["confidence"] >= 0.0001
