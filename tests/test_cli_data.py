"""The data commands of the CLI, and bad input through them: one line, exit 2, nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aerosynth.flows.cli import main

FIXTURES = Path(__file__).parent / "data"


def run_cli(args, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    assert main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert "prepare" in out and "demo" in out


def test_demo_preset_prepares_all_splits(tmp_path, capsys):
    rc = main(["data", "prepare", "--preset", "demo", "--out", str(tmp_path / "tiles")])
    out = capsys.readouterr().out
    assert rc == 0
    for split in ("source-train", "source-val", "target-train", "target-test"):
        assert split in out and (tmp_path / "tiles" / split / "tiles.json").is_file()
    assert (tmp_path / "tiles-raw" / "arid_carpark" / "scene_00.tif").is_file()


def _copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _prepare(tmp_path, source, target, extra=()):
    return [
        "data",
        "prepare",
        "--source",
        source,
        "--target",
        target,
        "--source-gsd",
        "0.125",
        "--test-groups",
        "scene_1",
        "--out",
        tmp_path / "out",
        *extra,
    ]


def _break_corrupt_image(root: Path) -> Path:
    p = root / "images" / "a_0.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return p


def _break_truncated_image(root: Path) -> Path:
    p = root / "images" / "a_1.png"
    p.write_bytes(p.read_bytes()[:200])
    return p


def _break_orphan_label(root: Path) -> Path:
    p = root / "labels" / "ghost.txt"
    p.write_text("0 0.5 0.5 0.1 0.1\n")
    return p


def _break_bad_row(root: Path) -> Path:
    p = root / "labels" / "b_0.txt"
    p.write_text("0 0.5 0.5 0.1\n")
    return p


def _break_out_of_range(root: Path) -> Path:
    p = root / "labels" / "b_0.txt"
    p.write_text("0 1.5 0.5 0.1 0.1\n")
    return p


@pytest.mark.parametrize(
    "breaker, problem",
    [
        (_break_corrupt_image, "corrupt"),
        (_break_truncated_image, "corrupt"),
        (_break_orphan_label, "label file without image"),
        (_break_bad_row, "expected 5 values"),
        (_break_out_of_range, "outside [0, 1]"),
    ],
)
def test_bad_source_files_fail_cleanly(tmp_path, capsys, breaker, problem):
    src = _copy(tmp_path, "yolo_domain")
    bad = breaker(src)
    rc, err = run_cli(_prepare(tmp_path, src, FIXTURES / "geotiff_domain"), capsys)
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and bad.name in lines[-1] and problem in lines[-1]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_image_without_label_is_a_negative_only_when_allowed(tmp_path):
    from aerosynth.data.domains import yolo_folder_domain
    from aerosynth.data.errors import InputError

    src = _copy(tmp_path, "yolo_domain")
    (src / "labels" / "c_0.txt").unlink()
    with pytest.raises(InputError, match="image without label file"):
        yolo_folder_domain(src)
    dom = yolo_folder_domain(src, missing_labels="negative", gsd=0.1)
    assert len(dom.load(dom.images[-1]).detections) == 0


def test_labels_in_wrong_crs_fail(tmp_path, capsys):
    tgt = _copy(tmp_path, "geotiff_domain")
    geo = tgt / "scene_0.geojson"
    geo.write_text(geo.read_text().replace("EPSG::32632", "EPSG::32616"))
    rc, err = run_cli(_prepare(tmp_path, FIXTURES / "yolo_domain", tgt), capsys)
    assert rc == 2 and "scene_0.geojson" in err and "no label overlaps the raster" in err


def test_raster_without_crs_when_geo_labels_are_asked(tmp_path, capsys):
    tgt = tmp_path / "tgt"
    tgt.mkdir()
    for name in ("scene_0", "scene_1"):
        shutil.copy(FIXTURES / "rasters" / "no_crs.tif", tgt / f"{name}.tif")
        (tgt / f"{name}.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    rc, err = run_cli(_prepare(tmp_path, FIXTURES / "yolo_domain", tgt), capsys)
    assert rc == 2 and "scene_0.tif" in err and "no CRS" in err


def test_band_count_without_selection(tmp_path, capsys):
    tgt = tmp_path / "tgt"
    tgt.mkdir()
    shutil.copy(FIXTURES / "geotiff_domain" / "scene_0.tif", tgt / "scene_0.tif")
    shutil.copy(FIXTURES / "rasters" / "four_band.tif", tgt / "scene_1.tif")
    rc, err = run_cli(_prepare(tmp_path, FIXTURES / "yolo_domain", tgt, ["--unflagged", "empty"]), capsys)
    assert rc == 2 and "scene_1.tif" in err and "4 band" in err


def test_empty_domain(tmp_path, capsys):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    rc, err = run_cli(_prepare(tmp_path, tmp_path / "empty", FIXTURES / "geotiff_domain"), capsys)
    assert rc == 2 and "empty domain" in err


def test_tile_larger_than_image(tmp_path, capsys):
    args = _prepare(tmp_path, FIXTURES / "yolo_domain", FIXTURES / "geotiff_domain", ["--tile-size", "1024"])
    rc, err = run_cli(args, capsys)
    assert rc == 2 and "larger than" in err and not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    rc, err = run_cli(_prepare(tmp_path, FIXTURES / "yolo_domain", FIXTURES / "geotiff_domain"), capsys)
    assert rc == 2 and "already exists" in err and (tmp_path / "out" / "keep.txt").read_text() == "mine"
