"""Heat-map box quality on real labelled tiles: maps of real images from the LDM, scored by the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aerosynth.annotation.fake_data import write_fake_split
from aerosynth.data.errors import InputError
from aerosynth.flows.cli import main
from aerosynth.generation.models import build_ldm, save_ldm
from aerosynth.generation.real_maps import cars_map_function


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mq")
    return save_ldm(build_ldm("tiny", domains=["madison_drone"]), root / "model")


def test_map_of_a_real_image_is_repeatable_and_sized(tiny_model):
    fn = cars_map_function(tiny_model, "madison_drone", noise_fraction=0.3)
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a, b = fn(rgb), fn(rgb)
    assert a.ndim == 2 and a.shape[0] == a.shape[1] and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    other = fn(np.zeros_like(rgb))
    assert not np.array_equal(a, other)  # the map depends on the image


def test_bad_arguments(tiny_model):
    with pytest.raises(InputError, match="noise_fraction"):
        cars_map_function(tiny_model, "madison_drone", noise_fraction=0)
    with pytest.raises(InputError):
        cars_map_function(tiny_model, "atlantis")


def test_map_quality_command_writes_scores(tiny_model, tmp_path, capsys):
    tiles = tmp_path / "tiles"
    write_fake_split(tiles / "source-val", "madison_drone", 6, seed=0, weak=False, size=64)
    out = tmp_path / "q.json"
    rc = main(["map-quality", "--model", str(tiny_model), "--tiles", str(tiles), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["tiles"] == 6 and report["ground_truth_boxes"] > 0
    for key in ("precision", "recall", "ap50"):
        assert 0.0 <= report["scores"][key] <= 1.0
    assert "AP50" in capsys.readouterr().out


def _kit_target_test(tmp_path, count: int):
    """A prepared root with a weak KIT target-test split (boxes under evaluation/) and a tiny KIT model."""
    tiles = tmp_path / "tiles"
    labels = tiles / "evaluation" / "target-test"
    write_fake_split(tiles / "target-test", "kit_munich_aerial", count, seed=3, weak=True, labels_dir=labels)
    return tiles, save_ldm(build_ldm("tiny", domains=["kit_munich_aerial"]), tmp_path / "model")


def test_map_quality_on_a_weak_target_split_at_several_noise_levels(tiny_model, tmp_path, capsys):
    """target-test is weak: its boxes come from evaluation/ (the evaluation API); one entry per noise level."""
    tiles, model = _kit_target_test(tmp_path, 5)
    out = tmp_path / "q.json"
    args = ["map-quality", "--model", str(model), "--tiles", str(tiles), "--split", "target-test", "--out", str(out)]
    rc = main([*args, "--noise", "0.1,0.3,0.5"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["split"] == "target-test" and report["weak_split"] and "diagnostic" in report["note"]
    assert report["tiles"] == 5 and report["ground_truth_boxes"] > 0
    assert report["noise_levels"] == [0.1, 0.3, 0.5]
    assert [e["noise"] for e in report["by_noise"]] == [0.1, 0.3, 0.5]
    for e in report["by_noise"]:
        assert 0.0 <= e["scores"]["ap50"] <= 1.0
    assert capsys.readouterr().out.count("AP50") == 3
    # one level: the flat report, the same scores as that level's entry
    single = tmp_path / "q1.json"
    assert main([*args[:-1], str(single), "--noise", "0.3"]) == 0
    flat = json.loads(single.read_text())
    assert flat["noise"] == 0.3 and flat["scores"] == report["by_noise"][1]["scores"]


def test_map_quality_refuses_an_opened_weak_split(tmp_path):
    """Passing a WeakTileSplit object is one clear error, not a TypeError."""
    from aerosynth.annotation.fake_data import write_fake_root
    from aerosynth.annotation.map_quality import evaluate_map_quality
    from aerosynth.data.tileset import open_split

    root = write_fake_root(tmp_path / "tiles", count=4)
    with pytest.raises(InputError, match="evaluation API"):
        evaluate_map_quality(open_split(root / "target-test"), lambda rgb: np.zeros(rgb.shape[:2]))


def test_readout_chosen_on_source_val_is_applied_to_target_test(tmp_path, capsys):
    """--choose-readout on source-val records the readout; --readout scores target-test with it unchanged."""
    tiles, model = _kit_target_test(tmp_path, 4)
    write_fake_split(tiles / "source-val", "kit_munich_aerial", 5, seed=0, weak=False, size=64)
    base = ["map-quality", "--model", str(model), "--tiles", str(tiles)]
    val_out, test_out = tmp_path / "val.json", tmp_path / "test.json"
    assert main([*base, "--out", str(val_out), "--noise", "0.1,0.3", "--choose-readout"]) == 0, capsys.readouterr()
    chosen = json.loads(val_out.read_text())["readout"]
    assert set(chosen) == {"0.1", "0.3"} and all(e["chosen_on"] == "source-val" for e in chosen.values())
    assert "readout chosen on source-val" in capsys.readouterr().out
    args = [*base, "--split", "target-test", "--out", str(test_out), "--noise", "0.3", "--readout", str(val_out)]
    assert main(args) == 0, capsys.readouterr().err
    applied = json.loads(test_out.read_text())["readout"]["0.3"]
    assert applied["config"] == chosen["0.3"]["config"] and applied["normalise"] == chosen["0.3"]["normalise"]
    assert 0.0 <= applied["ap50"] <= 1.0
    # readouts are never chosen on target tiles, and a report without one is named
    assert main([*base, "--split", "target-test", "--out", str(test_out), "--choose-readout"]) == 2
    assert "source tiles only" in capsys.readouterr().err
    assert main([*base, "--out", str(test_out), "--readout", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
