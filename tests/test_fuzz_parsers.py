"""Fuzzing the YOLO, COCO and GeoJSON label parsers: nothing escapes but InputError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aerosynth.data.detections import Detections
from aerosynth.data.domains import coco_domain
from aerosynth.data.errors import InputError
from aerosynth.data.geo import geojson_to_detections, read_geojson

FIXTURES = Path(__file__).parent / "data"
T = Affine(0.25, 0, 690_000.0, 0, -0.25, 5_336_000.0)

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**6), 10**6))
tokens = st.one_of(numbers.map(str), st.text(max_size=6), st.sampled_from(["nan", "inf", "-1", "0", "1", "1e308", ""]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(tokens, max_size=7).map(" ".join), max_size=6).map("\n".join),
    st.integers(1, 500),
    st.integers(1, 500),
)
def test_yolo_parser(text, w, h):
    try:
        dets = Detections.from_yolo(text, w, h, where="fuzz.txt")
    except InputError as exc:
        assert str(exc).startswith("fuzz.txt")
        return
    assert np.all(np.isfinite(dets.xyxy))
    assert np.all(dets.xyxy[:, [0, 2]] >= 0) and np.all(dets.xyxy[:, [0, 2]] <= w)


def _geometry():
    coords = st.lists(numbers, min_size=0, max_size=3)
    return st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(["Point", "Polygon", "MultiPolygon", "LineString"]),
                "coordinates": st.one_of(coords, st.lists(st.lists(coords, max_size=5), max_size=2), json_values),
            }
        ),
    )


features = st.lists(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"type": st.just("Feature"), "geometry": _geometry(), "properties": st.one_of(st.none(), json_values)}
        ),
    ),
    max_size=4,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries({"type": st.just("FeatureCollection"), "features": features}),
        st.fixed_dictionaries(
            {
                "type": st.just("FeatureCollection"),
                "features": features,
                "crs": st.one_of(json_values, st.just({"type": "name", "properties": {"name": "EPSG:4326"}})),
            }
        ),
    )
)
def test_geojson_parser(doc):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "labels.geojson"
        path.write_text(json.dumps(doc, allow_nan=True))
        try:
            parsed = read_geojson(path)
            dets = geojson_to_detections(parsed, str(path), T, "EPSG:32632", 256, 256, gsd=0.25)
        except InputError:
            return
    assert np.all(np.isfinite(dets.xyxy))


coco_anns = st.lists(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "id": numbers,
                "image_id": st.sampled_from([1, 2, 99]),
                "category_id": st.sampled_from([1, 2, "x"]),
                "bbox": st.one_of(st.lists(numbers, min_size=0, max_size=5), json_values),
            }
        ),
    ),
    max_size=4,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "images": st.one_of(
                    json_values, st.just([{"id": 1, "file_name": "a_0.png"}, {"id": 2, "file_name": "b_0.png"}])
                ),
                "annotations": st.one_of(json_values, coco_anns),
                "categories": st.one_of(json_values, st.just([{"id": 1, "name": "vehicle"}])),
            }
        ),
    )
)
def test_coco_parser(doc):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "coco.json"
        path.write_text(json.dumps(doc, allow_nan=True))
        try:
            dom = coco_domain(path, image_dir=FIXTURES / "coco_domain", gsd=0.1)
            for item in dom.images:
                dets = dom.load(item).detections
                assert np.all(np.isfinite(dets.xyxy))
        except InputError:
            return
