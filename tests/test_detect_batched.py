"""Batched window prediction: one forward pass per batch gives ultralytics' predictor boxes, also on Dask workers."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from scipy.optimize import linear_sum_assignment

from aerosynth.data.detections import Detections
from aerosynth.data.rasters import write_geotiff
from aerosynth.detection import prediction
from aerosynth.detection.slicing import detect_raster
from tests.test_detect_scale import feature_boxes, read_lines
from tests.test_detection_slicing import ORIGIN, _scene

CONF = 0.001  # a one-epoch detector: low confidences, many boxes per window (max_det binds)


def predictor_path(model_path, images, conf, imgsz, max_det=300, iou=0.7) -> list[Detections]:
    """The reference: ultralytics' predictor (``YOLO.predict`` on BGR arrays), as detect ran it before."""
    model = prediction.load_model(model_path)
    bgr = [np.ascontiguousarray(im[:, :, ::-1]) for im in images]
    results = model.predict(bgr, conf=conf, imgsz=imgsz, max_det=max_det, iou=iou, device="cpu", verbose=False)
    return [
        Detections(r.boxes.xyxy.numpy().astype(float), r.boxes.conf.numpy().astype(float), r.boxes.cls.numpy())
        for r in results
    ]


def assert_same_boxes(got: Detections, expected: Detections) -> None:
    """Same number of boxes; matched one to one, corners within 1 px and confidences within 1e-3."""
    assert len(got) == len(expected)
    if not len(expected):
        return
    diff = np.abs(got.xyxy[:, None, :] - expected.xyxy[None, :, :]).max(axis=2)
    diff += np.abs(got.confidence[:, None] - expected.confidence[None, :]) * 1000
    rows, cols = linear_sum_assignment(diff)
    assert np.abs(got.xyxy[rows] - expected.xyxy[cols]).max() <= 1.0
    assert np.abs(got.confidence[rows] - expected.confidence[cols]).max() <= 1e-3


def _windows(shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Windows of a toy scene (vehicles, background) of the given ``(height, width)``, and one of noise."""
    img, _ = _scene(200, 150)
    corners = [(0, 0), (70, 0), (136, 40), (0, 86), (70, 86)]
    shapes = (shapes * 5)[:5]
    wins = [np.ascontiguousarray(img[y : y + h, x : x + w]) for (x, y), (h, w) in zip(corners, shapes, strict=True)]
    h, w = shapes[0]
    return [*wins, np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)]


@pytest.mark.parametrize(
    ("shapes", "imgsz", "conf"),
    [([(64, 64)], 64, CONF), ([(64, 64)], 64, 0.01), ([(48, 48)], 48, CONF), ([(48, 64)], 64, CONF)]
    + [([(64, 64), (48, 64)], 64, CONF)],
    ids=["model-size", "conf-0.01", "resized", "letterboxed", "mixed-shapes"],
)
def test_batched_prediction_equals_the_ultralytics_predictor(tiny_detector, shapes, imgsz, conf):
    wins = _windows(shapes)
    expected = predictor_path(tiny_detector, wins, conf, imgsz)
    got = prediction.predict(tiny_detector, wins, conf=conf, imgsz=imgsz, max_det=300)
    assert sum(len(d) for d in expected) >= len(wins)  # boxes to compare, not empty windows
    for g, e in zip(got, expected, strict=True):
        assert_same_boxes(g, e)
        assert g.xyxy.dtype == np.float64 and (g.class_id == 0).all()
    # a window predictor is one forward pass per call, whatever its batch
    window_predictor = prediction.WindowPredictor(str(tiny_detector), conf=conf, imgsz=imgsz)
    for g, e in zip(window_predictor(wins), expected, strict=True):
        assert_same_boxes(g, e)
    assert prediction.predict(tiny_detector, []) == []


def _raster(tmp_path):
    img, _ = _scene(200, 150)
    transform = Affine(0.125, 0, ORIGIN[0], 0, -0.125, ORIGIN[1])
    return write_geotiff(tmp_path / "r.tif", img, transform, "EPSG:32632"), transform


def test_detect_raster_gives_the_predictor_paths_features(tmp_path, tiny_detector):
    raster, transform = _raster(tmp_path)
    settings = {"tile": 64, "overlap": 16, "conf": CONF, "target_gsd": 0.125, "block": 2}
    old = tmp_path / "old.geojsonl"

    def ultralytics_predictor(windows):
        return predictor_path(tiny_detector, windows, CONF, 64)

    detect_raster(raster, tiny_detector, old, predictor=ultralytics_predictor, **settings)
    new = tmp_path / "new.geojsonl"
    n = detect_raster(raster, tiny_detector, new, **settings)
    expected = feature_boxes(read_lines(old), transform)  # raster pixels
    got = feature_boxes(read_lines(new), transform)
    assert n == len(expected) > 10
    conf_old = np.array(sorted(f["properties"]["confidence"] for f in read_lines(old)))
    conf_new = np.array(sorted(f["properties"]["confidence"] for f in read_lines(new)))
    assert np.abs(conf_new - conf_old).max() <= 1e-3
    assert_same_boxes(Detections(got, np.zeros(n)), Detections(expected, np.zeros(n)))


def test_two_dask_workers_load_the_model_once_and_match_one_process(tmp_path, tiny_detector):
    from distributed import Client, LocalCluster

    raster, transform = _raster(tmp_path)
    settings = {"tile": 64, "overlap": 16, "conf": CONF, "target_gsd": 0.125, "block": 1}  # 12 blocks
    one, two = tmp_path / "one.geojsonl", tmp_path / "two.geojsonl"
    n = detect_raster(raster, tiny_detector, one, **settings)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        assert detect_raster(raster, tiny_detector, two, dask_address=cluster.scheduler_address, **settings) == n

        def worker_state() -> tuple[int, int, int]:
            import torch

            from aerosynth.detection import prediction as p

            info = p._inference_model.cache_info()
            return info.misses, info.hits, torch.get_num_threads()

        states = list(client.run(worker_state).values())
    assert len(states) == 2
    for misses, _, threads in states:
        assert misses == 1 and threads == 1  # loaded once per worker, whatever the blocks it ran
    assert sum(hits for _, hits, _ in states) >= 12  # every block's predictor call found it loaded
    assert np.array_equal(feature_boxes(read_lines(one), transform), feature_boxes(read_lines(two), transform))


def test_inference_keeps_the_thread_count_of_its_process(tiny_detector):
    """ultralytics' ``select_device`` sets torch to cores - 1 threads; loading for inference must not change it."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(9)  # above the 8 that select_device sets at most: a reset cannot go unseen
        prediction._inference_model.cache_clear()
        prediction.predict(tiny_detector, [np.zeros((64, 64, 3), np.uint8)], imgsz=64)
        assert torch.get_num_threads() == 9
    finally:
        torch.set_num_threads(before)
        prediction._inference_model.cache_clear()


def test_the_detect_command_runs_the_detector_on_every_core_unless_told(tmp_path, tiny_detector, monkeypatch):
    """Importing ultralytics sets OMP_NUM_THREADS to cores - 1 (torch then defaults to one thread on 2 cores):
    ``aerosynth detect`` sets torch to every core the process may use, or to ``--threads``."""
    import torch

    from aerosynth.detection import slicing
    from aerosynth.flows.cli import main

    raster, _ = _raster(tmp_path)
    seen = []
    real = slicing.detect_raster
    monkeypatch.setattr(slicing, "detect_raster", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(5)), raising=False)
    before = torch.get_num_threads()
    try:
        base = ["detect", str(raster), "--model", str(tiny_detector), "--gsd", "0.125", "--conf", "0.5"]
        assert main([*base, "--out", str(tmp_path / "a.geojsonl")]) == 0
        assert main([*base, "--out", str(tmp_path / "b.geojsonl"), "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [5, 2]
