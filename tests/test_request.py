"""The ``request`` flow: export layout and round trips, safe names, no overwrite, offline STAC validation."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pystac
import pytest
import torch
import yaml

from aerosynth.annotation.export import synthetic_transform
from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.domains import yolo_folder_domain
from aerosynth.data.errors import InputError
from aerosynth.data.export_validation import validate_export
from aerosynth.data.geo import geojson_to_detections, read_geojson
from aerosynth.data.imageio import read_rgb
from aerosynth.data.manifest import file_sha256
from aerosynth.data.rasters import read_raster
from aerosynth.data.stac_labels import check_label_item
from aerosynth.flows.request import request_flow, request_tiles, resolve_model
from aerosynth.generation.models import build_ldm, save_ldm

torch.set_num_threads(2)

DAY = dt.date(2025, 6, 1)
FAST = {"steps": 2, "batch_size": 4, "day": DAY}
SOURCE, TARGET = "madison_drone", "kit_munich_aerial"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An adapted run folder: an untrained tiny model as ldm/stageB/model and the tiles manifest."""
    work = tmp_path_factory.mktemp("request") / "work"
    save_ldm(build_ldm("tiny", domains=[SOURCE, TARGET]), work / "ldm" / "stageB" / "model")
    atomic_write_json(
        work / "tiles" / "manifest.json",
        {
            "target_gsd": 0.125,
            "tile_size": 128,
            "splits": {"source-train": {"domain": SOURCE}, "target-train": {"domain": TARGET}},
        },
    )
    return work


@pytest.fixture(scope="module")
def exports(run_dir) -> dict[str, Path]:
    out = run_dir.parent / "exports"
    cars = request_tiles(run_dir, out, "munich-cars", "target", 3, with_vehicles=True, seed=5, **FAST)
    empty = request_tiles(
        run_dir / "ldm" / "stageB" / "model", out, "munich_empty", TARGET, 2, with_vehicles=False, seed=9, **FAST
    )
    return {"root": out, "cars": cars, "empty": empty}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _coco_boxes(export: Path) -> dict[str, Detections]:
    coco = json.loads((export / "coco.json").read_text())
    out = {}
    for im in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        out[Path(im["file_name"]).stem] = Detections.from_coco(anns)
    return out


def test_run_folder_resolves_to_its_latest_stage(run_dir):
    model = resolve_model(run_dir)
    assert model.stage == "stageB" and model.model_dir == run_dir / "ldm" / "stageB" / "model"
    assert model.run_domains == {"source": SOURCE, "target": TARGET} and model.image_size == 32
    # a model folder inside a run finds the run too
    assert resolve_model(model.model_dir).run_dir == run_dir.resolve()


def test_export_loads_back_as_geotiff_geojson_coco_yolo_and_stac(exports):
    export = exports["cars"]
    assert export.name == "2025-06-01_munich-cars"
    request = json.loads((export / "request.json").read_text())
    assert request["domain"] == TARGET and request["request"]["domain"] == "target"
    assert request["gsd"] == pytest.approx(0.125 * 128 / 32) and request["crs"] == "EPSG:3857"
    assert request["model"]["stage"] == "stageB" and "cars" in request["prompt"]
    ids = [f"munich-cars_{i:06d}" for i in range(3)]
    assert request["seeds"] == {tile: 5 + i for i, tile in enumerate(ids)}
    # every file is listed with its hash, request.json aside
    listed = request["files"]
    assert set(listed) == set(_tree(export)) - {"request.json"}
    assert all(file_sha256(export / rel) == digest for rel, digest in listed.items())

    coco = _coco_boxes(export)
    assert sorted(coco) == ids
    assert request["counts"]["boxes"] == sum(len(d) for d in coco.values()) > 0
    yolo = yolo_folder_domain(export / "yolo")
    yolo_boxes = {im.image_id: yolo.load(im) for im in yolo.images}
    assert sorted(yolo_boxes) == ids
    all_labels = read_geojson(export / "labels.geojson")
    assert len(all_labels["features"]) == request["counts"]["boxes"]
    for i, tile in enumerate(ids):
        raster = read_raster(export / "tiles" / f"{tile}.tif")
        assert raster.crs.to_epsg() == 3857 and raster.rgb.shape == (32, 32, 3)
        assert raster.transform.almost_equals(synthetic_transform(i, 3, 32, 32, request["gsd"]))
        assert raster.gsd == pytest.approx(request["gsd"])
        assert np.array_equal(raster.rgb, read_rgb(export / "yolo" / "images" / f"{tile}.png"))
        geo = geojson_to_detections(
            read_geojson(export / "labels" / f"{tile}.geojson"), tile, raster.transform, raster.crs, 32, 32, raster.gsd
        )
        assert len(geo) == len(coco[tile])
        np.testing.assert_allclose(geo.xyxy, coco[tile].xyxy, atol=1e-6)
        np.testing.assert_allclose(yolo_boxes[tile].detections.xyxy, coco[tile].xyxy, atol=1e-3)
    assert yaml.safe_load((export / "yolo" / "data.yaml").read_text()) == {
        "train": "images",
        "val": "images",
        "names": {0: "vehicle"},
    }  # no absolute path: the folder can move

    assert validate_export(export) == {"catalogs": 3, "items": 6, "label_items": 3}
    catalog = pystac.Catalog.from_file(str(export / "catalog.json"))
    items = {it.id: it for it in catalog.get_items(recursive=True)}
    assert set(items) == set(ids) | {f"{t}-labels" for t in ids}
    for tile in ids:
        label = items[f"{tile}-labels"]
        assert label.properties["label:type"] == "vector" and label.properties["label:tasks"] == ["detection"]
        assert label.properties["label:classes"] == [{"name": "class_name", "classes": ["vehicle"]}]
        (source,) = [link for link in label.links if link.rel == "source"]
        assert source.resolve_stac_object().target.id == tile
        assert Path(items[tile].assets["image"].get_absolute_href()) == (export / "tiles" / f"{tile}.tif").resolve()
    for path in export.rglob("*.json"):  # self-contained: no absolute or temporary path of the export
        text = path.read_text()
        assert ".partial" not in text and str(exports["root"]) not in text


def test_tiles_requested_without_vehicles_have_no_boxes(exports):
    export = exports["empty"]
    request = json.loads((export / "request.json").read_text())
    assert request["request"]["with_vehicles"] is False and "cars" not in request["prompt"]
    assert request["counts"] == {"tiles": 2, "tiles_with_boxes": 0, "boxes": 0, "detector_boxes_in_empty_tiles": 0}
    assert json.loads((export / "coco.json").read_text())["annotations"] == []
    assert all(p.read_text() == "" for p in (export / "yolo" / "labels").glob("*.txt"))
    assert read_geojson(export / "labels.geojson")["features"] == []
    assert validate_export(export)["label_items"] == 2


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", "x" * 100, "-lead", "a b", "a.b", None])
def test_bad_names_are_refused_with_nothing_written(run_dir, tmp_path, name):
    with pytest.raises(InputError) as err:
        request_tiles(run_dir, tmp_path / "out", name, TARGET, 1, **FAST)
    assert err.value.where == "name"
    assert list(tmp_path.iterdir()) == []


def test_unknown_domain_and_missing_model_are_clear_errors(run_dir, tmp_path):
    with pytest.raises(InputError, match=f"unknown domain 'atlantis'.*{TARGET}") as err:
        request_tiles(run_dir, tmp_path / "out", "x", "atlantis", 1, **FAST)
    assert err.value.where == "domain"
    with pytest.raises(InputError, match="neither an adapted run folder"):
        request_tiles(tmp_path, tmp_path / "out", "x", TARGET, 1, **FAST)
    with pytest.raises(InputError, match="no trained model"):
        (tmp_path / "run" / "ldm").mkdir(parents=True)
        request_tiles(tmp_path / "run", tmp_path / "out", "x", TARGET, 1, **FAST)
    with pytest.raises(InputError) as err:
        request_tiles(run_dir, tmp_path / "out", "x", TARGET, 0, **FAST)
    assert err.value.where == "count"
    with pytest.raises(InputError, match="detector weights not found"):
        request_tiles(run_dir, tmp_path / "out", "x", TARGET, 1, detector=tmp_path / "none.pt", **FAST)
    assert not (tmp_path / "out").exists()


def test_an_export_is_never_overwritten(run_dir, exports, monkeypatch):
    root, first = exports["root"], exports["cars"]
    before = _tree(first)
    with pytest.raises(InputError, match="already exists"):
        request_tiles(run_dir, root, "munich-cars", "target", 3, with_vehicles=True, seed=5, **FAST)
    assert _tree(first) == before
    # another request of that name busy building it: refused by the lock
    lock = root / ".2025-06-01_other.lock"
    lock.write_text("123\n")
    with pytest.raises(InputError, match="another request is writing"):
        request_tiles(run_dir, root, "other", TARGET, 1, **FAST)
    lock.unlink()
    # a failure while building leaves neither a folder nor debris
    import aerosynth.data.stac

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(aerosynth.data.stac, "write_stac_catalog", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        request_tiles(run_dir, root, "other", TARGET, 1, **FAST)
    assert sorted(p.name for p in root.iterdir()) == ["2025-06-01_munich-cars", "2025-06-01_munich_empty"]


def test_detector_labels_replace_heatmaps(run_dir, tmp_path, monkeypatch):
    import aerosynth.detection.prediction

    weights = tmp_path / "det" / "detector.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"stub")
    atomic_write_json(weights.with_name("detector.json"), {"config": {"imgsz": 128}, "gsd": 0.125})
    seen = {}

    def fake_predict(model_path, images, conf=0.001, imgsz=128, **kwargs):
        seen.update(model=Path(model_path), sizes=[im.shape for im in images], conf=conf, imgsz=imgsz)
        # boxes in pixels of the 128 px input (tiles are resampled from 0.5 to the detector's 0.125 m/px)
        return [Detections([[8, 8, 40, 24], [60, 60, 80, 80]], [0.9, 0.3], [2, 0]) for _ in images]

    monkeypatch.setattr(aerosynth.detection.prediction, "predict", fake_predict)
    cars = request_tiles(run_dir, tmp_path / "out", "det", TARGET, 2, detector=weights, **FAST)
    assert seen["model"] == weights and seen["sizes"] == [(128, 128, 3)] * 2 and seen["conf"] == 0.25
    for dets in _coco_boxes(cars).values():
        np.testing.assert_allclose(dets.xyxy, [[2, 2, 10, 6], [15, 15, 20, 20]])
        assert dets.class_id.tolist() == [0, 0]
    request = json.loads((cars / "request.json").read_text())
    assert request["request"]["labels_from"] == "detector" and request["counts"]["boxes"] == 4
    validate_export(cars)
    # tiles requested without vehicles stay empty; what the detector saw there is reported
    empty = request_tiles(
        run_dir, tmp_path / "out", "det-empty", TARGET, 2, with_vehicles=False, detector=weights, **FAST
    )
    request = json.loads((empty / "request.json").read_text())
    assert request["counts"]["boxes"] == 0 and request["counts"]["detector_boxes_in_empty_tiles"] == 2


def _corrupt(export: Path, tmp_path: Path, rel: str, change) -> Path:
    copy_dir = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
    shutil.copytree(export, copy_dir)
    doc = json.loads((copy_dir / rel).read_text())
    change(doc)
    (copy_dir / rel).write_text(json.dumps(doc))
    return copy_dir


def test_validator_rejects_broken_exports_offline(exports, tmp_path):
    export = exports["cars"]
    label = "stac/labels/munich-cars_000001.json"
    image = "stac/images/munich-cars_000001.json"
    cases = [
        (label, lambda d: d["properties"].pop("label:type"), "label:type missing"),
        (label, lambda d: d["properties"].update({"label:type": "polygon"}), "vector or raster"),
        (label, lambda d: d["properties"].update({"label:colour": 1}), "unknown field label:colour"),
        (label, lambda d: d["properties"]["label:overviews"][0]["counts"][0].update(count=99), "label:overviews"),
        (label, lambda d: d.update(links=[lk for lk in d["links"] if lk["rel"] != "source"]), "source link"),
        (image, lambda d: d.pop("geometry"), "Validation failed"),
        (image, lambda d: d["assets"]["image"].update(href="/etc/passwd"), "not a relative path"),
        (image, lambda d: d["assets"]["image"].update(href="../../tiles/gone.tif"), "not a relative path"),
        (
            "catalog.json",
            lambda d: d["links"].append({"rel": "child", "href": "https://example.com/c.json"}),
            "non-relative href",
        ),
        (
            image,
            lambda d: d.update(stac_extensions=["https://stac-extensions.github.io/eo/v1.1.0/schema.json"]),
            "cannot be validated offline",
        ),
    ]
    for rel, change, message in cases:
        broken = _corrupt(export, tmp_path, rel, change)
        with pytest.raises(InputError, match=message):
            validate_export(broken)
    # hrefs that leave the folder and come back in by its name resolve, but only until the folder is renamed
    # (a temporary export folder always is): refused, so a check before publishing holds after it
    for rel, kind, message in [(image, "asset", "not a relative path"), (label, "source", "leaves the export")]:
        broken = _corrupt(export, tmp_path, rel, lambda d: None)
        doc = json.loads((broken / rel).read_text())
        if kind == "asset":
            href = doc["assets"]["image"]["href"] = f"../../../{broken.name}/tiles/munich-cars_000001.tif"
        else:
            (link,) = [lk for lk in doc["links"] if lk["rel"] == "source"]
            href = link["href"] = f"../../../{broken.name}/stac/images/munich-cars_000001.json"
        (broken / rel).write_text(json.dumps(doc))
        assert (broken / rel).parent.joinpath(href).resolve().is_file()
        with pytest.raises(InputError, match=message):
            validate_export(broken)
    ok = json.loads((export / label).read_text())
    check_label_item(ok, label)
    bad = copy.deepcopy(ok)
    bad["properties"]["label:classes"] = [{"name": "class_name", "classes": ["car", 3]}]
    with pytest.raises(InputError, match="all strings or all numbers"):
        check_label_item(bad, label)


def test_relative_out_and_run_folders_give_a_catalog_that_opens_from_anywhere(run_dir, tmp_path, monkeypatch):
    """`aerosynth request` with the default (relative) --out: the hrefs were once built from the temporary path."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    folder = request_tiles(Path(os.path.relpath(run_dir, work)), Path("exports"), "rel", "target", 2, **FAST)
    assert folder == Path("exports/2025-06-01_rel") and sorted(p.name for p in Path("exports").iterdir()) == [
        "2025-06-01_rel"
    ]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    export = (work / folder).resolve()
    assert validate_export(Path("..") / "cwd" / folder) == {"catalogs": 3, "items": 4, "label_items": 2}
    catalog = pystac.Catalog.from_file(os.path.relpath(export / "catalog.json"))
    assets = [asset for item in catalog.get_items(recursive=True) for asset in item.assets.values()]
    assert len(assets) == 4
    for asset in assets:
        target = Path(asset.get_absolute_href())
        assert target.is_file() and target.resolve().is_relative_to(export)
        assert not Path(asset.href).is_absolute() and ".partial" not in asset.href
    for path in export.rglob("*.json"):
        assert ".partial" not in path.read_text() and str(work) not in path.read_text()


def test_an_export_that_fails_validation_is_not_published_and_the_request_can_be_repeated(
    run_dir, tmp_path, monkeypatch
):
    import aerosynth.data.stac

    write_stac_catalog = aerosynth.data.stac.write_stac_catalog
    built: list[Path] = []

    def climbing_href(export, *args, **kwargs):
        """The catalog as written, then one label href that resolves only under the temporary name."""
        write_stac_catalog(export, *args, **kwargs)
        item = export.root / "stac" / "labels" / "again_000001.json"
        doc = json.loads(item.read_text())
        doc["assets"]["labels"]["href"] = f"../../../{export.root.name}/labels/again_000001.geojson"
        item.write_text(json.dumps(doc))
        built.append(export.root)

    out = tmp_path / "out"
    monkeypatch.setattr(aerosynth.data.stac, "write_stac_catalog", climbing_href)
    with pytest.raises(InputError, match=r"2025-06-01_again: not published, the export is invalid: stac/labels/"):
        request_tiles(run_dir, out, "again", "target", 2, **FAST)
    assert built and built[0].name.endswith(".partial") and not built[0].exists()
    assert list(out.iterdir()) == []  # no folder under the final name, no temporary folder, no lock
    monkeypatch.setattr(aerosynth.data.stac, "write_stac_catalog", write_stac_catalog)
    folder = request_tiles(run_dir, out, "again", "target", 2, **FAST)
    assert validate_export(folder)["label_items"] == 2 and [p.name for p in out.iterdir()] == [folder.name]


def test_prefect_flow_wraps_the_request(prefect_harness, run_dir, tmp_path):
    path = request_flow(str(run_dir), str(tmp_path / "out"), "flowreq", "source", 1, steps=2)
    export = Path(path)
    assert export.name.endswith("_flowreq") and export.parent == tmp_path / "out"
    assert json.loads((export / "request.json").read_text())["domain"] == SOURCE
    assert validate_export(export)["items"] == 2
