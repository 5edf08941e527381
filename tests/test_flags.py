"""Targets without boxes: weak flags from flags.json / flags.csv / flags.geojson, and nothing silently empty."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from aerosynth.data.errors import InputError
from aerosynth.flows.cli import main

FIXTURES = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
# the yolo_domain target (200 x 180 px) at 0.1 m/px cut to 32 px tiles at 0.125 m/px: scale 0.8, 20 tiles an image
TARGET_GSD, GSD, TILE = 0.1, 0.125, 32


def _script():
    """benchmarks/flags_only_target.py: flags made from boxes outside the product (its own tile rule)."""
    spec = importlib.util.spec_from_file_location("flags_only_target", REPO / "benchmarks" / "flags_only_target.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prepare(capsys, target: Path, out: Path, *extra) -> tuple[int, str]:
    args = ["data", "prepare", "--source", FIXTURES / "yolo_domain", "--source-gsd", "0.125", "--target", target]
    args += ["--target-gsd", TARGET_GSD, "--gsd", GSD, "--tile-size", TILE, "--test-groups", "clipC", "--out", out]
    rc = main([str(a) for a in [*args, *extra]])
    return rc, capsys.readouterr().err


def _flags_only(tmp_path: Path, flags: dict | None = None) -> Path:
    """The yolo_domain images and groups.json without labels/, with ``flags`` as flags.json (same domain name)."""
    dst = tmp_path / "flags_only" / "yolo_domain"
    shutil.copytree(FIXTURES / "yolo_domain" / "images", dst / "images")
    shutil.copy(FIXTURES / "yolo_domain" / "groups.json", dst / "groups.json")
    if flags is not None:
        (dst / "flags.json").write_text(json.dumps(flags))
    return dst


def _tiles(root: Path, split: str) -> dict:
    return json.loads((root / split / "tiles.json").read_text())


def _weak(root: Path, split: str) -> dict[str, bool]:
    return {t["tile_id"]: t["has_vehicle"] for t in _tiles(root, split)["tiles"]}


def _box_flags() -> dict[str, bool]:
    return _script().flags_from_boxes(FIXTURES / "yolo_domain", TARGET_GSD / GSD, TILE, {0})


def test_flags_only_target_gives_the_target_tiles_of_its_boxes(tmp_path, capsys):
    flags = _box_flags()
    assert len(flags) == 4 * 20 and 0 < sum(flags.values()) < len(flags)
    rc, err = _prepare(capsys, FIXTURES / "yolo_domain", tmp_path / "boxes")
    assert rc == 0, err
    rc, err = _prepare(capsys, _flags_only(tmp_path, flags), tmp_path / "flags")
    assert rc == 0, err
    boxes_m = json.loads((tmp_path / "boxes" / "manifest.json").read_text())
    flags_m = json.loads((tmp_path / "flags" / "manifest.json").read_text())
    for split in ("target-train", "target-test"):
        assert _tiles(tmp_path / "boxes", split) == _tiles(tmp_path / "flags", split)
        assert boxes_m["splits"][split]["content_sha256"] == flags_m["splits"][split]["content_sha256"]
        assert flags_m["splits"][split]["flag_sources"] == {"flags.json": boxes_m["splits"][split]["tiles"]}
        assert "flag_sources" not in boxes_m["splits"][split]  # a target labelled by boxes: the manifest as before
    assert _weak(tmp_path / "flags", "target-train") == {k: v for k, v in flags.items() if not k.startswith("c_0")}
    assert boxes_m["splits"]["target-train"]["tiles_with_vehicles"] > 0
    # the boxes of a boxless target are nowhere: no evaluation split, and the manifest says so
    assert "target_boxes" not in boxes_m and flags_m["target_boxes"] is False
    assert (tmp_path / "boxes" / "evaluation" / "target-test").is_dir()
    assert not (tmp_path / "flags" / "evaluation").exists()


def test_a_boxless_target_is_not_scored_on_boxes(tmp_path, capsys):
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.flows.adapt_tiles import plan_run, target_has_boxes
    from aerosynth.flows.config import build_config

    assert _prepare(capsys, _flags_only(tmp_path, _box_flags()), tmp_path / "out")[0] == 0
    with pytest.raises(InputError, match="target-test: no boxes: the target was prepared from weak flags only"):
        open_evaluation_split(tmp_path / "out", "target-test")
    assert not target_has_boxes(tmp_path / "out")
    plan = plan_run(build_config({"detection": {"seeds": [0, 1]}}), tmp_path / "out")  # no oracle, one seed
    assert not plan.detection.oracle and plan.detection.seeds == [0]
    assert open_evaluation_split(tmp_path / "out", "source-train").info.weak is False  # the source still has boxes


def test_no_labels_and_no_flags_is_refused_in_one_line(tmp_path, capsys):
    target = _flags_only(tmp_path)
    rc, err = _prepare(capsys, target, tmp_path / "out")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {target}: target without boxes") and "--unflagged" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_tile_the_flags_miss_is_named_unless_a_rule_is_chosen(tmp_path, capsys):
    flags = _box_flags()
    missing = "a_1_64_32"
    flags.pop(missing)
    target = _flags_only(tmp_path, flags)
    rc, err = _prepare(capsys, target, tmp_path / "out")
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the progress bars
    assert rc == 2 and len(errors) == 1 and errors[0] == err.strip().splitlines()[-1]
    assert f"a_1.png: tile {missing} has no flag in flags.json" in errors[0] and not (tmp_path / "out").exists()
    # an image no flag reaches is named before any pixel is read
    (target / "flags.json").write_text(json.dumps({k: v for k, v in flags.items() if not k.startswith("b_0_")}))
    rc, err = _prepare(capsys, target, tmp_path / "out")
    assert rc == 2 and "b_0.png: no flag for this image or its tiles in flags.json" in err
    (target / "flags.json").write_text(json.dumps(flags))
    rc, err = _prepare(capsys, target, tmp_path / "empty", "--unflagged", "empty")
    assert rc == 0, err
    weak = _weak(tmp_path / "empty", "target-train")
    assert weak[missing] is False and weak == {**{k: v for k, v in flags.items() if k[0] in "ab"}, missing: False}
    rc, err = _prepare(capsys, target, tmp_path / "skip", "--unflagged", "skip")
    assert rc == 0, err
    skipped = _weak(tmp_path / "skip", "target-train")
    assert missing not in skipped and len(skipped) == 59
    assert json.loads((tmp_path / "skip" / "manifest.json").read_text())["splits"]["target-train"]["flag_sources"] == {
        "flags.json": 59,
        "unflagged (skip)": 1,
    }
    rc, err = _prepare(capsys, target, tmp_path / "x", "--unflagged", "maybe")
    assert rc == 2 and "unknown rule 'maybe'" in err


def test_flags_decide_over_boxes_which_stay_for_evaluation(tmp_path, capsys):
    target = tmp_path / "both"
    shutil.copytree(FIXTURES / "yolo_domain", target)
    flags = _box_flags()
    flipped = next(k for k, v in flags.items() if v and k.startswith("a_"))
    (target / "flags.json").write_text(json.dumps({flipped: False, "b_0.png": True}))
    rc, err = _prepare(capsys, target, tmp_path / "out")
    assert rc == 0, err
    weak = _weak(tmp_path / "out", "target-train")
    assert weak[flipped] is False  # the tile entry
    assert all(v for k, v in weak.items() if k.startswith("b_0_"))  # the image entry flags all of its tiles
    assert {k: v for k, v in weak.items() if k.startswith("a_") and k != flipped} == {
        k: v for k, v in flags.items() if k.startswith("a_") and k != flipped
    }  # boxes elsewhere
    labels = tmp_path / "out" / "evaluation" / "target-train" / "labels" / f"{flipped}.txt"
    assert labels.read_text().strip()  # its box is still there for scoring


def test_flags_csv_and_bad_flag_files(tmp_path, capsys):
    flags = _box_flags()
    target = _flags_only(tmp_path)
    word = {True: "vehicle", False: "0"}
    rows = ["id,flag"] + [f"{k},{word[v]}" for k, v in flags.items()]
    (target / "flags.csv").write_text("\n".join(rows) + "\n")
    rc, err = _prepare(capsys, target, tmp_path / "csv")
    assert rc == 0, err
    assert _weak(tmp_path / "csv", "target-train") == {k: v for k, v in flags.items() if k[0] in "ab"}
    key = next(iter(flags))
    (target / "flags.json").write_text(json.dumps({key: not flags[key]}))
    rc, err = _prepare(capsys, target, tmp_path / "x")
    assert rc == 2 and f"flags.csv: '{key}' is" in err and "in flags.json" in err
    (target / "flags.json").unlink()
    (target / "flags.csv").write_text("a_0.png,maybe\n")
    rc, err = _prepare(capsys, target, tmp_path / "x")
    assert rc == 2 and "flags.csv:1: flag must be 1/0, true/false or vehicle/empty" in err
    (target / "flags.csv").unlink()
    (target / "flags.json").write_text(json.dumps({**flags, "z_9_0_0": True}))
    rc, err = _prepare(capsys, target, tmp_path / "x")
    assert rc == 2 and "flags.json: 'z_9_0_0' names no image of the target" in err
    (target / "flags.json").write_text(json.dumps({**flags, "a_0_16_0": True}))  # another grid
    rc, err = _prepare(capsys, target, tmp_path / "x")
    assert rc == 2 and "a_0_16_0 is not a tile of a_0.png" in err


def test_a_source_without_labels_is_refused(tmp_path, capsys):
    source = _flags_only(tmp_path, _box_flags())
    args = ["data", "prepare", "--source", source, "--source-gsd", "0.125", "--target", FIXTURES / "yolo_domain"]
    rc = main([str(a) for a in [*args, "--target-gsd", "0.125", "--test-groups", "clipC", "--out", tmp_path / "o"]])
    err = capsys.readouterr().err
    assert rc == 2 and "split source-train needs boxes: the domain has no labels" in err


def test_flags_geojson_points_and_polygons(tmp_path, capsys):
    """Points (WGS84) and polygons (UTM) mark vehicles: a tile holding one is a vehicle tile, the rest empty."""
    from pyproj import Transformer

    target = tmp_path / "geo"
    target.mkdir()
    for name in ("scene_0.tif", "scene_1.tif"):
        shutil.copy(FIXTURES / "geotiff_domain" / name, target / name)
    to_wgs = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True)
    points = [(690_003.3, 5_335_990.1), (690_131.0, 5_335_980.0)]  # scene_0 (x 0..64 m), scene_1 (x 100..164 m)
    polygon = [(690_041.0, 5_335_961.0), (690_043.0, 5_335_961.0), (690_043.0, 5_335_963.0), (690_041.0, 5_335_961.0)]
    features = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": list(to_wgs.transform(x, y))}}
        for x, y in points
    ]
    doc = {"type": "FeatureCollection", "features": features}
    (target / "flags.geojson").write_text(json.dumps(doc))
    utm = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32632"}},
        "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in polygon]]}}],
    }
    args = ["data", "prepare", "--source", FIXTURES / "yolo_domain", "--source-gsd", "0.125", "--target", target]
    args += ["--gsd", "0.25", "--tile-size", "32", "--test-groups", "scene_1", "--out"]
    rc = main([str(a) for a in [*args, tmp_path / "points"]])
    assert rc == 0, capsys.readouterr().err
    (target / "flags.geojson").write_text(json.dumps({**utm, "features": [utm["features"][0]]}))
    rc = main([str(a) for a in [*args, tmp_path / "polygon"]])
    assert rc == 0, capsys.readouterr().err

    def holds(tile: dict, x: float, y: float) -> bool:
        col, row = ~Affine(*tile["transform"]) @ (x, y)
        return 0 <= col < tile["width"] and 0 <= row < tile["height"]

    for out, shapes in (("points", points), ("polygon", polygon[:3])):
        tiles = [t for s in ("target-train", "target-test") for t in _tiles(tmp_path / out, s)["tiles"]]
        assert len(tiles) == 2 * 64
        expected = {t["tile_id"]: any(holds(t, x, y) for x, y in shapes) for t in tiles}
        assert {t["tile_id"]: t["has_vehicle"] for t in tiles} == expected
        assert sum(expected.values()) == (2 if out == "points" else 1)
    # a plain image cannot be placed on the map
    plain = _flags_only(tmp_path)
    (plain / "flags.geojson").write_text(json.dumps(doc))
    rc, err = _prepare(capsys, plain, tmp_path / "x")
    assert rc == 2 and "a_0.png: no flag for this image or its tiles in flags.geojson; flags.geojson flags" in err


def test_config_rule_for_unflagged_tiles():
    from aerosynth.flows.config import DataSettings

    assert DataSettings().unflagged == "error"
    assert DataSettings(unflagged="skip").unflagged == "skip"
    with pytest.raises(ValueError, match="unflagged"):
        DataSettings(unflagged="maybe")


def test_vehicle_mask_marks_the_pixels_of_points_and_polygons():
    from aerosynth.data.flags import TargetFlags

    crs = "EPSG:32632"
    doc = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": crs}},
        "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10.5, -3.5]}},
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[20, -20], [30, -20], [30, -25]]]}},
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [500, -3]}},  # off the image
        ],
    }
    mask = TargetFlags(geojson=doc).vehicle_mask(Affine(1, 0, 0, 0, -1, 0), crs, 40, 40, "img")
    assert mask[3, 10] and mask[22, 28] and not mask[24, 21] and not mask[10, 10]
    assert mask[:, :15].sum() == 1 and np.all(mask[20:25, 20:31].any(axis=1))


def test_adapt_tiles_step_reads_the_flags_and_rebuilds_when_they_change(tmp_path):
    from aerosynth.flows.adapt_tiles import prepare_tiles, target_has_boxes
    from aerosynth.flows.config import build_config

    flags = _box_flags()
    flags.pop("a_0_0_0")
    target = _flags_only(tmp_path, flags)
    data = {"preset": "custom", "source": str(FIXTURES / "yolo_domain"), "source_gsd": 0.125, "target": str(target)}
    data.update({"target_gsd": TARGET_GSD, "gsd": GSD, "tile_size": TILE, "test_groups": ["clipC"]})
    with pytest.raises(InputError, match="a_0.png: tile a_0_0_0 has no flag in flags.json"):
        prepare_tiles(build_config({"data": data}), tmp_path / "work")
    tiles = prepare_tiles(build_config({"data": {**data, "unflagged": "empty"}}), tmp_path / "work")
    # without boxes a share of target-train (one of its two groups) is held out, scored against its flags
    train, held = _weak(tiles, "target-train"), _weak(tiles, "target-holdout")
    assert {k[0] for k in train} | {k[0] for k in held} == {"a", "b"} and not set(train) & set(held)
    assert {**train, **held} == {**{k: v for k, v in flags.items() if k[0] in "ab"}, "a_0_0_0": False}
    assert not target_has_boxes(tiles)
    (target / "flags.json").write_text(json.dumps({**flags, "a_0_0_0": True}))  # the analyst flags on
    tiles = prepare_tiles(build_config({"data": {**data, "unflagged": "empty"}}), tmp_path / "work")
    assert {**_weak(tiles, "target-train"), **_weak(tiles, "target-holdout")}["a_0_0_0"] is True
