"""``aerosynth request --real``: a run's real target tiles exported with the labels the adapt flow gave them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pystac
import pytest
from affine import Affine

from aerosynth.annotation.real_target import label_real_tiles
from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.domains import yolo_folder_domain
from aerosynth.data.errors import InputError
from aerosynth.data.export_validation import validate_export
from aerosynth.data.geo import geojson_to_detections, read_geojson
from aerosynth.data.imageio import read_rgb
from aerosynth.data.rasters import read_raster
from aerosynth.data.tileset import read_tiles_file, tiles_document
from aerosynth.flows.request import request_tiles
from tests.test_generation_helpers import make_split

DAY = dt.date(2025, 6, 2)
TARGET = "kit_munich_aerial"
UTM32 = "EPSG:25832"
N_TILES, SIZE = 6, 32


def _make_run(root: Path, georeferenced: bool = True) -> Path:
    """A run folder: tiles manifest, a weak target-train split (UTM 32N transforms) and its heat-map labels."""
    work = root / "work"
    atomic_write_json(
        work / "tiles" / "manifest.json",
        {"target_gsd": 0.125, "tile_size": SIZE, "splits": {"target-train": {"domain": TARGET}}},
    )
    split_dir = make_split(work / "tiles", "target-train", TARGET, n=N_TILES, size=SIZE, seed=1)
    info, records = read_tiles_file(split_dir)
    for i, rec in enumerate(records):
        if georeferenced:
            rec.transform = tuple(Affine(0.125, 0.0, 691_000.0 + 8.0 * i, 0.0, -0.125, 5_334_000.0 - 2.0 * i)[:6])
            rec.crs = UTM32
    atomic_write_json(split_dir / "tiles.json", tiles_document(info, records))
    # made-up proposals: a confident and a weak box on every tile; flagged-empty tiles lose them
    proposals = [
        Detections(np.array([[2, 2, 10, 8], [20, 21, 28, 27]], float), np.array([0.9, 0.2]), np.zeros(2, int))
        for _ in records
    ]
    provenance = {"model": "ldm/stageC/model", "noise_fraction": 0.3}
    label_real_tiles(
        split_dir, proposals, 0.15, work / "annotation" / "real-heatmap" / "dataset", "heatmap", provenance=provenance
    )
    return work


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("request_real"))


@pytest.fixture(scope="module")
def export(run_dir) -> Path:
    return request_tiles(run_dir, run_dir.parent / "exports", "munich-real", "target", 100, real="heatmap", day=DAY)


def _dataset_labels(run_dir: Path) -> dict[str, Detections]:
    labels = run_dir / "annotation" / "real-heatmap" / "dataset" / "labels"
    return {p.stem: Detections.from_yolo(p.read_text(), SIZE, SIZE) for p in sorted(labels.glob("*.txt"))}


def test_real_tiles_keep_their_georeference_and_labels(run_dir, export):
    assert export.name == "2025-06-02_munich-real"
    request = json.loads((export / "request.json").read_text())
    summary = json.loads((run_dir / "annotation" / "real-heatmap" / "dataset" / "summary.json").read_text())
    assert request["real"]["method"] == "heatmap" and request["real"]["summary"] == summary
    assert request["real"]["threshold"] == 0.15 and request["real"]["summary"]["provenance"]["noise_fraction"] == 0.3
    assert request["request"]["real"] == "heatmap" and request["request"]["labels_from"] == "real-heatmap"
    assert request["domain"] == TARGET and request["crs"] == UTM32 and request["real"]["candidates"] == N_TILES
    _, records = read_tiles_file(run_dir / "tiles" / "target-train")
    ids = {f"munich-real_{r.tile_id}": r for r in records}
    assert request["source_tiles"] == {tile: r.tile_id for tile, r in ids.items()}  # count > tiles: all of them
    labels = _dataset_labels(run_dir)
    assert request["counts"] == {
        "tiles": N_TILES,
        "tiles_with_boxes": N_TILES // 2,
        "boxes": sum(len(d) for d in labels.values()),
        "flagged_tiles": N_TILES // 2,
    }
    yolo = yolo_folder_domain(export / "yolo")
    yolo_boxes = {im.image_id: yolo.load(im).detections for im in yolo.images}
    coco = json.loads((export / "coco.json").read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == sorted(f"tiles/{t}.tif" for t in ids)
    for tile, rec in ids.items():
        raster = read_raster(export / "tiles" / f"{tile}.tif")
        assert raster.transform.almost_equals(Affine(*rec.transform)) and raster.crs.to_epsg() == 25832
        split_png = run_dir / "tiles" / "target-train" / "images" / f"{rec.tile_id}.png"
        assert np.array_equal(raster.rgb, read_rgb(split_png))
        geo_doc = read_geojson(export / "labels" / f"{tile}.geojson")
        assert geo_doc["crs"]["properties"]["name"].endswith("25832")
        geo = geojson_to_detections(geo_doc, tile, raster.transform, raster.crs, SIZE, SIZE, raster.gsd)
        truth = labels[rec.tile_id]
        assert len(geo) == len(truth) == len(yolo_boxes[tile]) and (len(truth) > 0) == rec.has_vehicle
        np.testing.assert_allclose(geo.xyxy, truth.xyxy, atol=1e-3)
        np.testing.assert_allclose(yolo_boxes[tile].xyxy, truth.xyxy, atol=1e-3)
    assert len(read_geojson(export / "labels.geojson")["features"]) == request["counts"]["boxes"]

    assert validate_export(export) == {"catalogs": 3, "items": 2 * N_TILES, "label_items": N_TILES}
    catalog = pystac.Catalog.from_file(str(export / "catalog.json"))
    items = {it.id: it for it in catalog.get_items(recursive=True)}
    for tile, rec in ids.items():
        props = items[tile].properties
        assert props["aerosynth:synthetic"] is False and props["aerosynth:source_tile"] == rec.tile_id
        assert props["aerosynth:flagged_vehicle"] == rec.has_vehicle and "aerosynth:seed" not in props
        lon, lat = items[tile].geometry["coordinates"][0][0]
        assert 11 < lon < 12.5 and 47.5 < lat < 48.5  # Munich, not Null Island
    assert (export / "preview.png").is_file()
    for path in export.rglob("*.json"):
        assert ".partial" not in path.read_text()


def test_count_draws_the_same_tiles_for_the_same_seed(run_dir, tmp_path):
    def drawn(name: str, **kw) -> list[str]:
        folder = request_tiles(run_dir, tmp_path, name, TARGET, real="heatmap", day=DAY, **kw)
        return list(json.loads((folder / "request.json").read_text())["source_tiles"].values())

    first = drawn("a", count=3, seed=4)
    assert len(first) == 3 and first == drawn("b", count=3, seed=4) and first == sorted(first)
    assert {tuple(drawn(f"s{s}", count=3, seed=s)) for s in range(6)} != {tuple(first)}  # the seed matters
    flagged = {t for t, d in _dataset_labels(run_dir).items() if len(d)}
    assert set(drawn("cars", count=10, with_vehicles=True)) == flagged
    empty = drawn("empty", count=2, with_vehicles=False, seed=1)
    assert len(empty) == 2 and not set(empty) & flagged
    folder = tmp_path / f"{DAY.isoformat()}_empty"
    assert all(p.read_text() == "" for p in (folder / "yolo" / "labels").glob("*.txt"))
    assert validate_export(folder)["label_items"] == 2


def test_a_run_without_real_labels_is_one_clear_error(run_dir, tmp_path, capsys):
    with pytest.raises(InputError, match=r"real-self-training/dataset: .*aerosynth adapt.*real_target") as err:
        request_tiles(run_dir, tmp_path / "out", "x", "target", 2, real="self-training", day=DAY)
    assert "annotation" in err.value.where and not (tmp_path / "out").exists()
    from aerosynth.flows.cli import main

    args = ["request", "--run", str(run_dir), "--domain", "target", "--count", "2", "--name", "x"]
    rc = main([*args, "--out", str(tmp_path / "out"), "--real", "self-training"])
    err_text = capsys.readouterr().err
    lines = [ln for ln in err_text.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "real-self-training" in lines[0] and "aerosynth adapt" in lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_real_requests_are_refused_before_writing(run_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="unknown labelling method") as err:
        request_tiles(run_dir, out, "x", "target", 2, real="oracle", day=DAY)
    assert err.value.where == "real"
    with pytest.raises(InputError, match="real tiles are the run's target-train tiles") as err:
        request_tiles(run_dir, out, "x", "source", 2, real="heatmap", day=DAY)
    assert err.value.where == "domain"
    weights = tmp_path / "det.pt"
    weights.write_bytes(b"stub")
    with pytest.raises(InputError, match="cannot relabel") as err:
        request_tiles(run_dir, out, "x", "target", 2, real="heatmap", detector=weights, day=DAY)
    assert not out.exists()


def test_tiles_in_several_crs_or_none(tmp_path):
    plain = _make_run(tmp_path / "plain", georeferenced=False)
    folder = request_tiles(plain, tmp_path / "out", "plain", "target", 2, real="heatmap", day=DAY)
    request = json.loads((folder / "request.json").read_text())
    assert request["crs"] == "EPSG:3857" and request["georeference"].startswith("synthetic grid")
    assert validate_export(folder)["items"] == 4
    mixed = _make_run(tmp_path / "mixed")
    split_dir = mixed / "tiles" / "target-train"
    info, records = read_tiles_file(split_dir)
    records[1].crs = "EPSG:25833"
    atomic_write_json(split_dir / "tiles.json", tiles_document(info, records))
    with pytest.raises(InputError, match="2 coordinate systems"):
        request_tiles(mixed, tmp_path / "out", "mixed", "target", 10, real="heatmap", day=DAY)
    assert not (tmp_path / "out" / f"{DAY.isoformat()}_mixed").exists()
