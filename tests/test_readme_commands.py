"""The README's commands as a user types them: the installed ``aerosynth``, a fresh working folder, relative paths.

Every command runs as a subprocess in a new folder (no Prefect server configured, as on a fresh install) and is
checked by its exit status and by what it wrote. One ``aerosynth demo --quick`` run (``runs/smoke``) serves
``request``, ``detect`` and ``retrain``. Exports are opened again from another working folder: their STAC hrefs
must not depend on where the command was run (issue #36: a relative ``--out`` gave hrefs through the
temporary folder, and the broken export was left under its final name).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pystac
import pytest

from aerosynth.data.export_validation import validate_export
from aerosynth.data.manifest import file_sha256

pytestmark = pytest.mark.slow


def _console_script() -> str | None:
    here = Path(sys.executable).parent / "aerosynth"
    return str(here) if here.is_file() else shutil.which("aerosynth")


def aerosynth(cwd: Path, *args: str, expect: int = 0, timeout: float = 420) -> subprocess.CompletedProcess:
    """Run ``aerosynth ARGS`` in ``cwd`` and check its exit status (the output tail is the failure message)."""
    script = _console_script()
    if script is None:
        pytest.skip("the aerosynth console script is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}  # as typed: no server set
    proc = subprocess.run([script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, f"aerosynth {' '.join(args)}: exit {proc.returncode}\n" + (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    return proc


@pytest.fixture(scope="module")
def cwd(readme_demo) -> Path:
    """A fresh working folder holding ``runs/smoke`` (``aerosynth demo --quick``) and ``demo_rasters/``."""
    folder, _ = readme_demo
    return folder


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """Another working folder (the test's cwd from here on)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _only(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern))
    assert len(found) == 1, f"{root}/{pattern}: {found}"
    return found[0]


def _no_debris(out_root: Path) -> None:
    """No temporary export folder or lock file is left beside the exports."""
    debris = [p.name for p in out_root.iterdir() if p.name.endswith((".partial", ".lock", ".old"))]
    assert debris == []


def _check_export(export: Path, tiles: int) -> None:
    """The export validates and opens with pystac from the current (another) working folder; COCO and counts agree."""
    export = export.resolve()
    assert not Path.cwd().resolve().is_relative_to(export.parent)
    assert validate_export(os.path.relpath(export)) == {"catalogs": 3, "items": 2 * tiles, "label_items": tiles}
    catalog = pystac.Catalog.from_file(os.path.relpath(export / "catalog.json"))
    items = list(catalog.get_items(recursive=True))
    assert len(items) == 2 * tiles
    for item in items:
        for asset in item.assets.values():
            assert not os.path.isabs(asset.href) and ".partial" not in asset.href
            target = Path(asset.get_absolute_href())
            assert target.is_file() and target.resolve().is_relative_to(export), asset.href
        for link in item.links:
            if link.rel == "source":
                assert Path(link.get_absolute_href()).resolve().is_file()
    request = json.loads((export / "request.json").read_text())
    coco = json.loads((export / "coco.json").read_text())
    assert len(coco["images"]) == request["counts"]["tiles"] == tiles
    assert len(coco["annotations"]) == request["counts"]["boxes"]
    assert all((export / im["file_name"]).is_file() for im in coco["images"])
    assert all(file_sha256(export / rel) == digest for rel, digest in request["files"].items())
    for path in export.rglob("*.json"):
        assert ".partial" not in path.read_text()


def test_data_prepare_writes_the_tiles_the_readme_shows(cwd):
    aerosynth(cwd, "data", "prepare", "--preset", "demo", "--out", "work/demo")
    prepared = cwd / "work" / "demo"
    splits = {"source-train", "source-val", "target-train", "target-test"}
    assert splits <= set(json.loads((prepared / "manifest.json").read_text())["splits"])
    for split in splits:
        tiles = json.loads((prepared / split / "tiles.json").read_text())["tiles"]
        assert tiles and all((prepared / split / "images" / f"{t['tile_id']}.png").is_file() for t in tiles)


def test_demo_quick_hands_over_a_detector_and_a_report(cwd):
    run = cwd / "runs" / "smoke"
    assert (run / "detector.pt").is_file() and (run / "report" / "report.md").is_file()
    handed = json.loads((run / "detector.json").read_text())
    assert handed["sha256"] == file_sha256(run / "detector.pt")


def test_request_with_the_default_out(cwd, elsewhere):
    aerosynth(cwd, "request", "--run", "runs/smoke", "--domain", "target", "--count", "3", "--name", "my-cars")
    exports = cwd / "exports"
    _check_export(_only("*_my-cars", exports), 3)
    _no_debris(exports)


def test_request_real_detector_from_another_folder_fails_cleanly_and_can_be_repeated(cwd, elsewhere):
    """``--real detector`` with a relative ``--run`` and ``--out``: a corrupt tile fails it, leaving nothing."""
    from aerosynth.flows.request import label_with_run_detector

    run = cwd / "runs" / "smoke"
    images = label_with_run_detector(run) / "images"  # what the request makes first, made here to break a tile
    tile = sorted(images.glob("*.png"))[0]
    good = tile.read_bytes()
    other = elsewhere / "analyst"
    other.mkdir()
    command = ["request", "--run", os.path.relpath(run, other), "--domain", "target", "--count", "20", "--name", "own"]
    command += ["--real", "detector", "--out", "exports_rel"]
    tile.unlink()  # the labelled folder's copy only
    tile.write_bytes(b"not a png")
    try:
        failed = aerosynth(other, *command, expect=2)
    finally:
        tile.unlink()
        tile.write_bytes(good)
    assert tile.name in failed.stdout + failed.stderr
    out = other / "exports_rel"
    assert not list(out.glob("*_own")) and not list(out.glob(".*_own*"))  # nothing under the final name
    _no_debris(out)

    aerosynth(other, *command)  # the same command, once the tile is readable again
    labelled = len(list(images.glob("*.png")))
    _check_export(_only("*_own", out), min(20, labelled))
    _no_debris(out)


def test_detect_on_a_geotiff(cwd):
    proc = aerosynth(
        cwd, "detect", "demo_rasters/arid_carpark/scene_00.tif", "--run", "runs/smoke", "--out", "cars.geojson"
    )
    geo = json.loads((cwd / "cars.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and isinstance(geo["features"], list)
    assert geo["crs"]["properties"]["name"].startswith("urn:ogc:def:crs:EPSG::")
    assert f"{len(geo['features'])} vehicles" in proc.stdout + proc.stderr


def test_retrain_with_a_relative_registry_and_watched_folder(cwd, elsewhere):
    from aerosynth.detection.registry import Registry

    aerosynth(cwd, "data", "demo", "--out", "new_rasters", "--scenes", "2", "--size", "256", "--seed", "7")
    incoming = cwd / "incoming"
    shutil.copytree(cwd / "new_rasters" / "arid_carpark", incoming)
    command = ["retrain", "--registry", "reg", "--watch", "incoming/", "--tiles", "runs/smoke/tiles"]
    aerosynth(cwd, *command, "--baseline", "runs/smoke", "--preset", "smoke", timeout=600)
    registry = Registry(os.path.relpath(cwd / "reg"))  # read back from another working folder
    assert [v.name for v in registry.list_versions()] == ["v0001", "v0002"]
    production = registry.production()
    assert production is not None and production.detector.is_file() and registry.evaluation.tiles.is_dir()
    assert file_sha256(registry.version("v0001").detector) == file_sha256(cwd / "runs" / "smoke" / "detector.pt")
    assert set(registry.seen()) == {file_sha256(p) for p in incoming.glob("*.tif")}
