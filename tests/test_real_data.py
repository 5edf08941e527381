"""Protocol aerial-v1 on the real imagery in ../shared/data/aerial (skips when absent)."""

from __future__ import annotations

import json

import pytest

from aerosynth.data.prepare import prepare_dataset
from aerosynth.data.presets import AERIAL_V1_EXPECTED_TILES, aerial_v1
from aerosynth.data.tileset import WeakTileSplit, open_evaluation_split, open_split

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def aerial_v1_tiles(aerial_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("aerial") / "aerial-v1"
    manifest = prepare_dataset(aerial_v1(aerial_root), out)
    return out, manifest


def test_counts_match_protocol_and_manifest(aerial_v1_tiles):
    out, manifest = aerial_v1_tiles
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["splits"] == manifest["splits"]
    for name, expected in AERIAL_V1_EXPECTED_TILES.items():
        split = open_split(out / name)
        assert len(split) == manifest["splits"][name]["tiles"] == expected
        assert len(list((out / name / "images").glob("*.png"))) == expected
        assert manifest["splits"][name]["tiles_with_vehicles"] > 0
        assert manifest["splits"][name]["tiles_with_vehicles"] < expected  # negatives are kept


def test_splits_are_by_group(aerial_v1_tiles):
    _, manifest = aerial_v1_tiles
    s = manifest["splits"]
    assert s["source-val"]["groups"] == ["Drone1_clip9"] and "Drone1_clip9" not in s["source-train"]["groups"]
    assert s["target-test"]["groups"] == ["MOS74-93"]
    assert s["target-train"]["groups"] == ["MOS155-179", "MunichStreet02"]


def test_target_train_offers_no_boxes(aerial_v1_tiles):
    out, manifest = aerial_v1_tiles
    split = open_split(out / "target-train")
    assert isinstance(split, WeakTileSplit)
    assert not hasattr(split, "labels") and not (out / "target-train" / "labels").exists()
    full = open_evaluation_split(out, "target-train")
    n_boxes = sum(len(full.labels(t.tile_id)) for t in full)
    assert n_boxes == manifest["splits"]["target-train"]["boxes"]
    assert sum(split.weak_labels.values()) == manifest["splits"]["target-train"]["tiles_with_vehicles"]
