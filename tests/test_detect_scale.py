"""Detection over large rasters: windowed reading, a merge that scales, streamed and resumable output."""

from __future__ import annotations

import json
import threading
import tracemalloc

import numpy as np
import pyogrio
import pytest
from affine import Affine

from aerosynth.data.detections import Detections, box_iou
from aerosynth.data.errors import InputError
from aerosynth.data.rasters import RasterSource, read_raster, write_geotiff
from aerosynth.detection import slicing
from aerosynth.detection.slicing import BoxMerger, detect_array, detect_raster, merge_boxes
from tests.test_detection_slicing import ORIGIN, _scene, stub_predictor


def dense_merge(dets: Detections, cut: np.ndarray | None = None, iou: float = 0.5, ios: float = 0.7) -> Detections:
    """The whole-raster merge as it was: n x n matrices over every box (the reference)."""
    n = len(dets)
    if n == 0:
        return dets
    conf = dets.confidence if dets.confidence is not None else np.ones(n)
    cut = np.zeros(n, bool) if cut is None else np.asarray(cut, bool)
    order = np.lexsort((-conf, cut))
    area = dets.area
    ious = box_iou(dets.xyxy, dets.xyxy)
    inter = ious * (area[:, None] + area[None, :]) / (1 + ious)
    smaller = np.maximum(np.minimum(area[:, None], area[None, :]), 1e-12)
    same = (ious > iou) | (inter / smaller > ios)
    suppressed = np.zeros(n, bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= same[i]
    return dets[np.array(sorted(keep), dtype=np.int64)]


def whole_raster_boxes(path, predictor, target_gsd=None, conf=0.25) -> np.ndarray:
    """The detect path before windowed reading: read whole, resample whole, merge densely (raster pixels)."""
    raster = read_raster(path)
    rgb, valid = raster.rgb, raster.valid
    if target_gsd is not None and abs(raster.gsd / target_gsd - 1) > 1e-3:
        rgb, valid = slicing._resample(rgb, valid, raster.gsd / target_gsd)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slicing, "merge_boxes", dense_merge)
        dets = detect_array(rgb, predictor, 128, 32, valid).filter_confidence(conf)
    sx, sy = raster.width / rgb.shape[1], raster.height / rgb.shape[0]
    return dets.scale(sx, sy).clip(raster.width, raster.height).xyxy


def feature_boxes(features, transform: Affine) -> np.ndarray:
    """Feature polygons back to raster pixel boxes, sorted."""
    boxes = []
    for f in features:  # north-up rasters
        ring = np.array(f["geometry"]["coordinates"][0])
        xs, ys = (ring[:, 0] - transform.c) / transform.a, (ring[:, 1] - transform.f) / transform.e
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return np.array(sorted(boxes)).reshape(-1, 4)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tiled_scene(tmp_path, gsd=0.125, scale=1, repeat=2):
    """A scene of repeated vehicle patterns, written as a tiled GeoTIFF."""
    img, _ = _scene(300 * scale, 260 * scale, scale)
    big = np.tile(img, (repeat, repeat, 1))
    transform = Affine(gsd, 0, ORIGIN[0], 0, -gsd, ORIGIN[1])
    path = write_geotiff(tmp_path / f"scene{scale}.tif", big, transform, "EPSG:32632")
    return path, transform


@pytest.mark.parametrize("scale", [1, 2])
def test_windowed_detection_equals_the_whole_raster_path(tmp_path, scale):
    path, transform = _tiled_scene(tmp_path, gsd=0.125 / scale, scale=scale)
    old = np.array(sorted(whole_raster_boxes(path, stub_predictor(), 0.125).tolist()))
    out = tmp_path / "v.geojsonl"
    n = detect_raster(path, "unused.pt", out, target_gsd=0.125, block=2, predictor=stub_predictor())
    new = feature_boxes(read_lines(out), transform)
    assert n == len(old) == len(new) and n >= 30
    assert np.abs(new - old).max() <= 1.0 * scale  # within one detector pixel
    assert not out.with_name(out.name + ".state.json").exists()


def test_the_merge_is_linear_in_memory_and_equals_the_dense_merge():
    rng = np.random.default_rng(0)
    g = 300  # 90,000 vehicles, each seen by up to three windows: 200k boxes or more
    ys, xs = np.mgrid[0:g, 0:g] * 30.0
    base = np.c_[xs.ravel(), ys.ravel(), xs.ravel() + 22, ys.ravel() + 11]
    copies = [base, base + rng.uniform(-0.8, 0.8, base.shape), base[::2] + np.array([0, 0, -12, 0])]
    xyxy = np.concatenate(copies)
    dets = Detections(xyxy, rng.random(len(xyxy)))
    cut = np.r_[np.zeros(len(base) * 2, bool), np.ones(len(base[::2]), bool)]
    assert len(dets) > 200_000
    tracemalloc.start()
    merged = merge_boxes(dets, cut)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(merged) == len(base)  # one box per vehicle
    assert peak < 2e9  # n x n float64 would be over 300 GB
    # the same as the dense merge on a corner of the grid
    corner = np.flatnonzero((xyxy[:, 0] < 300) & (xyxy[:, 1] < 300))
    assert merge_boxes(dets[corner], cut[corner]) == dense_merge(dets[corner], cut[corner])


def test_streamed_merge_equals_the_merge_of_everything():
    rng = np.random.default_rng(3)
    for _ in range(5):
        xy = rng.random((1500, 2)) * 500
        dets = Detections(np.c_[xy, xy + rng.random((1500, 2)) * 30 + 4], rng.random(1500))
        cut = rng.random(1500) < 0.3
        expected = dense_merge(dets, cut)
        merger, parts = BoxMerger(), []
        top = dets.xyxy[:, 1]
        for y in range(0, 500, 60):  # rows of boxes arrive in order of their top edge
            rows = np.flatnonzero((top >= y) & (top < y + 60))
            merger.add(dets[rows], cut[rows])
            parts.append(merger.flush(frontier=y + 60))
        parts.append(merger.flush())
        got = Detections.merge(parts)
        assert sorted(map(tuple, got.xyxy.tolist())) == sorted(map(tuple, expected.xyxy.tolist()))


def test_a_car_across_the_seam_of_two_files_is_one_feature(tmp_path):
    img, truth = _scene(300, 260)
    transform = Affine(0.125, 0, ORIGIN[0], 0, -0.125, ORIGIN[1])
    seam = 100  # the vehicle at x 90..112 is cut by the file edge
    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "a.tif", img[:, :seam], transform, "EPSG:32632")
    write_geotiff(folder / "b.tif", img[:, seam:], transform @ Affine.translation(seam, 0), "EPSG:32632")
    for inputs in (folder, sorted(folder.glob("*.tif"))):
        source = RasterSource(inputs)
        assert (source.width, source.height) == (300, 260) and source.transform == transform
        out = tmp_path / "v.geojson"
        n = detect_raster(inputs, "unused.pt", out, target_gsd=0.125, block=1, predictor=stub_predictor())
        boxes = feature_boxes(json.loads(out.read_text())["features"], transform)
        assert n == len(truth)
        assert box_iou(boxes, truth.xyxy).max(axis=0).min() > 0.99
    # a gap in the mosaic is nodata: its windows are skipped
    write_geotiff(tmp_path / "far.tif", img[:100, :100], transform @ Affine.translation(600, 0), "EPSG:32632")
    mosaic = RasterSource([folder / "a.tif", tmp_path / "far.tif"])
    rgb, valid = mosaic.read(0, 0, mosaic.width, mosaic.height)
    assert mosaic.width == 700 and not valid[:, 100:600].any() and valid[:, :100].all()
    with pytest.raises(InputError, match="grid"):
        write_geotiff(tmp_path / "off.tif", img[:50, :50], transform @ Affine.translation(0.5, 0), "EPSG:32632")
        RasterSource([folder / "a.tif", tmp_path / "off.tif"])


def test_a_killed_run_resumes_and_ends_with_the_same_features(tmp_path, monkeypatch):
    path, transform = _tiled_scene(tmp_path)
    full = tmp_path / "full.geojsonl"
    detect_raster(path, "unused.pt", full, target_gsd=0.125, block=1, predictor=stub_predictor())
    expected = feature_boxes(read_lines(full), transform)

    calls = {"n": 0}
    inner = stub_predictor()

    def dies_midway(batch):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # the run is stopped in block row 3 of 6
        return inner(batch)

    out = tmp_path / "resumed.geojsonl"
    with pytest.raises(KeyboardInterrupt):
        detect_raster(path, "unused.pt", out, target_gsd=0.125, block=1, predictor=dies_midway)
    state = json.loads(out.with_name(out.name + ".state.json").read_text())
    assert 0 < state["rows_done"] < 6 and not out.exists()
    seen: list = []
    detect_raster(path, "unused.pt", out, target_gsd=0.125, block=1, predictor=stub_predictor(seen))
    assert len(seen) == 36 - 6 * state["rows_done"]  # only the rows not done ran again
    assert np.array_equal(feature_boxes(read_lines(out), transform), expected)
    assert not out.with_name(out.name + ".state.json").exists()


def _read_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("aerosynth-read")]


def test_blocks_read_ahead_are_the_blocks_read_in_turn(tmp_path, monkeypatch):
    path, _ = _tiled_scene(tmp_path)
    source = RasterSource(path)
    grid = slicing.BlockGrid(source.width, source.height, 128, 32, 1)
    jobs = [(r, c) for r in range(grid.rows) for c in range(grid.cols)]
    ahead = list(slicing._read_ahead_results(source, grid, jobs, stub_predictor(), 32))
    assert [(r, c) for r, c, _ in ahead] == jobs
    for r, c, (dets, cut, ran) in ahead:
        expected, expected_cut, expected_ran = slicing.detect_block(source, grid, r, c, stub_predictor())
        assert dets == expected and np.array_equal(cut, expected_cut) and ran == expected_ran
    assert sum(len(d) for _, _, (d, _, _) in ahead) > 0 and not _read_threads()
    # an unreadable block fails where its result would be, and the read thread ends with the run
    read, calls = RasterSource.read, {"n": 0}

    def fails_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise InputError(path, "unreadable block")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(RasterSource, "read", fails_third)
    got = []
    with pytest.raises(InputError, match="unreadable block"):
        for item in slicing._read_ahead_results(source, grid, jobs, stub_predictor(), 32):
            got.append(item)
    assert len(got) == 2 and not _read_threads()
    calls["n"] = 0
    with pytest.raises(InputError, match="unreadable block"):
        detect_raster(path, "unused.pt", tmp_path / "v.geojsonl", target_gsd=0.125, block=1, predictor=stub_predictor())
    assert not _read_threads()


def test_a_raster_without_nodata_is_read_without_its_mask(tmp_path):
    path, _ = _tiled_scene(tmp_path)
    source = RasterSource(path)
    assert not source._masked  # GDAL: every band all valid
    rgb, valid = source.read(10, 20, 300, 200)
    assert valid.shape == (200, 300) and valid.all()
    assert np.array_equal(rgb, read_raster(path).rgb[20:220, 10:310])
    # a mosaic with a gap has a mask, and reads it
    img, _ = _scene(100, 100)
    transform = Affine(0.125, 0, ORIGIN[0], 0, -0.125, ORIGIN[1])
    a = write_geotiff(tmp_path / "a.tif", img, transform, "EPSG:32632")
    b = write_geotiff(tmp_path / "b.tif", img, transform @ Affine.translation(200, 0), "EPSG:32632")
    mosaic = RasterSource([a, b])
    _, valid = mosaic.read(0, 0, mosaic.width, mosaic.height)
    assert mosaic._masked and valid[:, :100].all() and not valid[:, 100:200].any()


def test_the_heap_is_made_steady_once_on_glibc():
    import ctypes

    glibc = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    assert slicing._steady_heap() is glibc
    assert slicing._steady_heap() is glibc  # set once per process


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb", ".geojson", ".geojsonl"])
def test_streamed_formats_read_back(tmp_path, suffix):
    path, _ = _tiled_scene(tmp_path)
    out = tmp_path / f"v{suffix}"
    n = detect_raster(path, "unused.pt", out, target_gsd=0.125, predictor=stub_predictor())
    info = pyogrio.read_info(out)
    assert info["features"] == n > 0 and info["geometry_type"] == "Polygon"
    if suffix != ".geojsonl":  # GeoJSON Lines carry no CRS
        assert "32632" in info["crs"]
    _, _, _, fields = pyogrio.raw.read(out)
    assert fields[list(info["fields"]).index("confidence")] == pytest.approx(0.9)
    with pytest.raises(InputError, match="output format"):
        detect_raster(path, "unused.pt", tmp_path / "v.shp", predictor=stub_predictor())


def test_two_dask_workers_give_the_same_features(tmp_path):
    path, transform = _tiled_scene(tmp_path)
    one, two = tmp_path / "one.geojsonl", tmp_path / "two.geojsonl"
    detect_raster(path, "unused.pt", one, target_gsd=0.125, block=2, predictor=stub_predictor())
    detect_raster(path, "unused.pt", two, target_gsd=0.125, block=2, predictor=stub_predictor(), workers=2)
    assert np.array_equal(feature_boxes(read_lines(one), transform), feature_boxes(read_lines(two), transform))


def test_out_of_memory_and_disk_errors_are_one_error_line(tmp_path, monkeypatch, capsys):
    from aerosynth.detection import prediction, vector_output
    from aerosynth.flows.cli import main

    path, _ = _tiled_scene(tmp_path)
    model = tmp_path / "m.pt"
    model.write_bytes(b"")
    monkeypatch.setattr(prediction, "check_detector_file", lambda p: p)
    monkeypatch.setattr(prediction, "load_model", lambda p: None)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(prediction, "predict", no_memory)
    out = tmp_path / "v.geojson"
    assert main(["detect", str(path), "--model", str(model), "--gsd", "0.125", "--out", str(out)]) == 2
    err = capsys.readouterr()
    lines = [line for line in (err.out + err.err).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "out of memory" in lines[0] and "Traceback" not in err.err

    def disk_full(self, dets):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vector_output.FeatureStream, "write", disk_full)
    with pytest.raises(InputError, match="no space left on device"):
        detect_raster(path, "unused.pt", out, target_gsd=0.125, predictor=stub_predictor())
