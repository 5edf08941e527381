"""Pixel <-> map coordinates, GeoJSON in and out, rasters: the half-pixel and axis-order traps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.geo import (
    detections_to_geojson,
    geojson_to_detections,
    map_to_pixel,
    pixel_size_m,
    pixel_to_map,
    transformer,
)
from aerosynth.data.rasters import read_raster, write_geotiff

FIXTURES = Path(__file__).parent / "data"
T = Affine(0.25, 0, 690_000.0, 0, -0.25, 5_336_000.0)


def test_pixel_corner_is_the_transform_origin_and_centre_is_half_a_pixel_in():
    x, y = pixel_to_map(T, np.array([0.0, 0.5]), np.array([0.0, 0.5]))
    assert (x[0], y[0]) == (690_000.0, 5_336_000.0)
    assert (x[1], y[1]) == (690_000.125, 5_335_999.875)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4), st.floats(0.01, 5), st.floats(-0.2, 0.2))
def test_pixel_map_round_trip(px, py, gsd, rot):
    t = Affine(gsd, rot, 500_000.0, rot, -gsd, 4_000_000.0)
    mx, my = pixel_to_map(t, np.array([px]), np.array([py]))
    bx, by = map_to_pixel(t, mx, my)
    np.testing.assert_allclose([bx[0], by[0]], [px, py], atol=1e-5)


def test_wgs84_output_is_lon_lat_not_lat_lon():
    doc = detections_to_geojson(Detections([[0, 0, 4, 4]]), T, "EPSG:32632", to_wgs84=True)
    lon, lat = doc["features"][0]["geometry"]["coordinates"][0][0]
    assert 11 < lon < 12.5 and 48 < lat < 48.3  # Munich
    assert "crs" not in doc


def test_geojson_round_trip_in_raster_crs_and_in_wgs84():
    dets = Detections([[10, 20, 30, 28], [100.5, 3, 110, 40]], confidence=[0.9, 0.4])
    for wgs in (False, True):
        doc = json.loads(json.dumps(detections_to_geojson(dets, T, "EPSG:32632", to_wgs84=wgs)))
        back = geojson_to_detections(doc, "x.geojson", T, "EPSG:32632", 256, 256, gsd=0.25)
        np.testing.assert_allclose(back.xyxy, dets.xyxy, atol=1e-3 if wgs else 1e-9)


def test_point_labels_become_fixed_size_boxes_in_metres():
    lon, lat = transformer("EPSG:32632", "EPSG:4326").transform(*(T @ (50, 60)))
    doc = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [lon, lat]}, "properties": {}}],
    }
    box = geojson_to_detections(doc, "p.geojson", T, "EPSG:32632", 256, 256, gsd=0.25, point_box_m=5.3).xyxy[0]
    np.testing.assert_allclose(box, [50 - 10.6, 60 - 10.6, 50 + 10.6, 60 + 10.6], atol=1e-4)


def test_labels_in_a_crs_that_misses_the_raster_are_an_error():
    doc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [-89.4, 43.07]}, "properties": {}}
        ],
    }
    with pytest.raises(InputError, match="no label overlaps the raster"):
        geojson_to_detections(doc, "madison.geojson", T, "EPSG:32632", 256, 256, gsd=0.25)


def test_gsd_from_projected_and_geographic_transforms():
    assert pixel_size_m(T, "EPSG:32632") == pytest.approx(0.25)
    deg = Affine(1e-5, 0, 11.5, 0, -1e-5, 48.1)
    assert pixel_size_m(deg, "EPSG:4326") == pytest.approx(1e-5 * 111_320 * np.cos(np.radians(48.1)))


def test_geotiff_write_read_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    write_geotiff(tmp_path / "r.tif", rgb, T, "EPSG:32632")
    r = read_raster(tmp_path / "r.tif")
    assert np.array_equal(r.rgb, rgb) and r.transform == T and r.gsd == pytest.approx(0.25)
    assert r.crs.to_epsg() == 32632


def test_16bit_single_band_is_stretched_and_nodata_masked():
    r = read_raster(FIXTURES / "rasters" / "single_band_16bit.tif", bands=[1])
    assert r.rgb.dtype == np.uint8 and r.rgb.shape == (160, 160, 3)
    assert not r.valid[:20, :20].any() and r.valid[20:, 20:].all()
    assert r.rgb[:20, :20].max() == 0 and r.rgb[20:, 20:].max() == 255


def test_band_count_other_than_three_needs_a_selection():
    with pytest.raises(InputError, match="4 band"):
        read_raster(FIXTURES / "rasters" / "four_band.tif")
    assert read_raster(FIXTURES / "rasters" / "four_band.tif", bands=[3, 2, 1]).rgb.shape == (160, 160, 3)
