"""``data prepare`` cuts a large raster window by window: the same tiles as the whole-image path, bounded reads."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.io import DatasetReader

from aerosynth.data import prepare
from aerosynth.data.domains import geotiff_domain
from aerosynth.data.flags import TargetFlags
from aerosynth.data.prepare import PrepareSpec, SplitSpec, prepare_dataset
from aerosynth.data.tiling import axis_taps, resample, resample_window, tile_offsets

CRS = "EPSG:32632"
LEFT, TOP = 690000.0, 5336000.0


def _write_raster(path: Path, size: int, gsd: float, seed: int = 0) -> Path:
    """A tiled 8-bit RGB GeoTIFF: smooth texture and noise, a nodata (0) corner, pixels 1..255 elsewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 128 + 90 * np.sin(xx / 17.0) * np.cos(yy / 11.0)
    rgb = np.clip(base[None] + rng.normal(0, 25, (3, size, size)), 1, 255).astype(np.uint8)
    rgb[:, : size // 5, : size // 3] = 0  # nodata: whole tiles dropped, others partly valid
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": CRS,
        "transform": Affine(gsd, 0, LEFT, 0, -gsd, TOP),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(rgb)
    return path


def _polygon(x0: float, y0: float, x1: float, y1: float) -> dict:
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}


def _collection(features: list[dict]) -> str:
    return json.dumps(
        {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": CRS}}, "features": features}
    )


def _domains(tmp_path: Path, size: int, gsd: float) -> tuple[Path, Path]:
    """A labelled folder (boxes as GeoJSON) and a flags-only folder (``flags.geojson``) on the same raster."""
    rng = np.random.default_rng(1)
    extent = size * gsd
    labelled, flagged = tmp_path / "labelled", tmp_path / "flagged"
    labelled.mkdir(parents=True)
    flagged.mkdir(parents=True)
    raster = _write_raster(labelled / "scene.tif", size, gsd)
    (flagged / "scene.tif").symlink_to(raster)
    boxes = []
    for x, y in rng.uniform(0.05 * extent, 0.95 * extent, (60, 2)):
        w, h = rng.uniform(1.5, 5.0, 2)
        boxes.append(_polygon(LEFT + x, TOP - y, LEFT + x + w, TOP - y - h))
    (labelled / "scene.geojson").write_text(_collection(boxes))
    marks = [
        _polygon(LEFT + x, TOP - y, LEFT + x + rng.uniform(0.1, 30), TOP - y - rng.uniform(0.1, 30))
        for x, y in rng.uniform(0, extent, (12, 2))
    ]
    points = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [LEFT + x, TOP - y]}, "properties": {}}
        for x, y in rng.uniform(0, extent, (25, 2))
    ]
    (flagged / "flags.geojson").write_text(_collection(marks + points))
    return labelled, flagged


def _spec(labelled: Path, flagged: Path) -> PrepareSpec:
    source, target = geotiff_domain(labelled), geotiff_domain(flagged)
    return PrepareSpec(
        "windowed",
        [
            SplitSpec("source-train", source, mode="cover"),
            SplitSpec("target-train", target, mode="grid", weak=True),
            SplitSpec("target-test", source, mode="grid", weak=True),
        ],
        target_gsd=0.125,
        tile_size=128,
        unflagged="error",
    )


class _ReadSpy:
    """Records the window (and output shape) of every pixel and mask read of any rasterio dataset."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[object, object]] = []
        for name in ("read", "read_masks"):
            original = getattr(DatasetReader, name)

            def spy(ds, *args, _original=original, **kwargs):
                self.reads.append((kwargs.get("window"), kwargs.get("out_shape")))
                return _original(ds, *args, **kwargs)

            monkeypatch.setattr(DatasetReader, name, spy)


def _both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, gsd: float) -> tuple[Path, Path, _ReadSpy]:
    labelled, flagged = _domains(tmp_path, size, gsd)
    whole, windowed = tmp_path / "whole", tmp_path / "windowed"
    monkeypatch.setattr(prepare, "WINDOWED_PIXELS", size * size)  # not over it: read whole
    manifest_whole = prepare_dataset(_spec(labelled, flagged), whole)
    monkeypatch.setattr(prepare, "WINDOWED_PIXELS", size * size - 1)
    spy = _ReadSpy(monkeypatch)
    manifest_windowed = prepare_dataset(_spec(labelled, flagged), windowed)
    assert manifest_windowed == manifest_whole  # counts, flag sources and content hashes of every split
    return whole, windowed, spy


def _same_files(a: Path, b: Path) -> int:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".png":  # pixel for pixel (tolerance 0: the window path replays OpenCV's resampling)
            assert np.array_equal(cv2.imread(str(a / rel)), cv2.imread(str(b / rel))), rel
        else:  # tiles.json (ids, offsets, transforms, flags), YOLO labels, COCO json with ignore regions
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    return len(files)


def test_windowed_tiles_equal_the_whole_image_tiles_and_reads_stay_small(tmp_path, monkeypatch):
    size = 2048
    whole, windowed, spy = _both_paths(tmp_path, monkeypatch, size, gsd=0.1)  # shrink 0.8: area resampling
    assert _same_files(whole, windowed) > 300
    tiles = json.loads((windowed / "target-train" / "tiles.json").read_text())["tiles"]
    flags = [t["has_vehicle"] for t in tiles]
    assert 0 < sum(flags) < len(flags)  # flags.geojson marks some tiles, not all
    # every read is a window, a small part of the raster: never the whole raster
    assert spy.reads and all(window is not None for window, _ in spy.reads)
    assert max(w.width * w.height for w, _ in spy.reads) < size * size / 8


def test_windowed_enlarging_matches_too(tmp_path, monkeypatch):
    whole, windowed, _ = _both_paths(tmp_path, monkeypatch, 512, gsd=0.15)  # enlarge 1.2: Lanczos
    assert _same_files(whole, windowed) > 20


def test_a_16_bit_raster_gets_the_same_stretch(tmp_path, monkeypatch):
    folder = tmp_path / "sixteen"
    folder.mkdir()
    rng = np.random.default_rng(3)
    data = rng.integers(100, 4000, (3, 600, 600), dtype=np.uint16)
    profile = {"driver": "GTiff", "width": 600, "height": 600, "count": 3, "dtype": "uint16", "crs": CRS}
    with rasterio.open(folder / "scene.tif", "w", transform=Affine(0.1, 0, LEFT, 0, -0.1, TOP), **profile) as ds:
        ds.write(data)
    (folder / "flags.json").write_text(json.dumps({"scene": False}))
    spec = PrepareSpec("sixteen", [SplitSpec("target-test", geotiff_domain(folder), mode="grid", weak=True)])
    monkeypatch.setattr(prepare, "WINDOWED_PIXELS", 600 * 600)
    prepare_dataset(spec, tmp_path / "whole")
    monkeypatch.setattr(prepare, "WINDOWED_PIXELS", 0)
    prepare_dataset(spec, tmp_path / "windowed")  # stretch limits from all pixels: the raster is under the sample
    assert _same_files(tmp_path / "whole", tmp_path / "windowed") > 10


def _windowed_peak(tmp_path: Path, size: int) -> int:
    """Peak traced memory (numpy arrays included) of a windowed ``prepare_dataset`` of a ``size`` px raster."""
    labelled, _ = _domains(tmp_path / str(size), size, 0.1)
    spec = PrepareSpec("windowed", [SplitSpec("target-test", geotiff_domain(labelled), mode="grid", weak=True)])
    tracemalloc.start()
    try:
        manifest = prepare_dataset(spec, tmp_path / str(size) / "tiles")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest["splits"]["target-test"]["tiles"] > 20
    return peak


def test_windowed_memory_does_not_grow_with_the_raster(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "WINDOWED_PIXELS", 0)
    small, large = _windowed_peak(tmp_path, 1024), _windowed_peak(tmp_path, 2048)
    assert large < 1.25 * small  # four times the pixels, about the same peak: one window at a time
    assert large < 2048 * 2048 * 3  # less than the raster's own 8-bit RGB pixels


@pytest.mark.parametrize("scale", [0.8, 0.5, 0.37, 1.0, 1.2, 2.0])
def test_a_window_of_the_resampling_is_the_window_of_opencvs(scale):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (300, 346, 3), dtype=np.uint8)
    whole = resample(image, scale)
    nh, nw = whole.shape[:2]
    for oy0, oy1, ox0, ox1 in [
        (0, nh, 0, nw),
        (nh // 3, nh // 3 + 50, nw // 4, nw // 4 + 90),
        (nh - 40, nh, nw - 60, nw),
    ]:
        rows = axis_taps(300, nh, oy0, oy1, scale >= 1)
        cols = axis_taps(346, nw, ox0, ox1, scale >= 1)
        (r0, r1), (c0, c1) = rows.span, cols.span
        got = resample_window(image[r0:r1, c0:c1], rows, cols, (r0, c0))
        assert np.array_equal(got, whole[oy0:oy1, ox0:ox1])


@pytest.mark.parametrize("mode", ["grid", "cover"])
def test_marked_tiles_are_the_tiles_the_whole_mask_marks(mode):
    rng = np.random.default_rng(4)
    width, height, tile = 700, 530, 64
    features = []
    for cx, cy in rng.uniform(-40, 740, (40, 2)):
        n, r = int(rng.integers(3, 8)), float(rng.choice([0.3, 2, 9, 25]))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        ring = [[float(cx + r * np.cos(a)), float(-(cy + r * np.sin(a)))] for a in angles]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]}})
    for x, y in rng.uniform(-5, 705, (30, 2)):
        features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(x), float(-y)]}})
    flags = TargetFlags(
        geojson={
            "type": "FeatureCollection",
            "crs": {"type": "name", "properties": {"name": CRS}},
            "features": features,
        }
    )
    transform = Affine(1, 0, 0, 0, -1, 0)
    xs, ys = tile_offsets(width, tile, mode), tile_offsets(height, tile, mode)
    mask = flags.vehicle_mask(transform, CRS, width, height, "img")
    expected = {(x, y) for y in ys for x in xs if mask[y : y + tile, x : x + tile].any()}
    assert 0 < len(expected) < len(xs) * len(ys)
    assert flags.marked_tiles(transform, CRS, width, height, "img", (xs, ys, tile)) == expected
