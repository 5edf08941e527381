"""A target with flags only, end to end: flags held out and scored, one detector trained, the same as with boxes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from aerosynth.data.manifest import file_sha256
from tests.conftest import TINY_ADAPT
from tests.data.make_fixtures import write_demo_targets


def _config(work: Path, source: Path, target: Path, **extra) -> dict:
    """The smoke preset on the demo's domains given as a custom source and target (scene_02 held out)."""
    cfg = copy.deepcopy(TINY_ADAPT)
    cfg["work_dir"] = str(work)
    cfg["data"] = {
        "preset": "custom",
        "source": str(source),
        "target": str(target),
        "val_groups": ["scene_02"],
        "test_groups": ["scene_02"],
        **extra.pop("data", {}),
    }
    cfg["detection"] = {**cfg["detection"], **extra.pop("detection", {})}
    return cfg


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_demo_targets(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def boxless_run(prefect_harness, domains, tmp_path_factory):
    """The adapt flow on the flags-only target with the defaults: 0.2 of the flags held out, no comparisons."""
    from aerosynth.flows.adapt import run_adapt

    source, _, flagged = domains
    work = tmp_path_factory.mktemp("boxless") / "run"
    cfg = _config(work, source, flagged, detection={"seeds": [0, 1]})
    report = run_adapt(cfg)
    return work, cfg, report


def _state_dict(weights: Path) -> dict:
    return torch.load(weights, map_location="cpu", weights_only=False)["model"].state_dict()


def _tile_ids(split: Path) -> set[str]:
    return {t["tile_id"] for t in json.loads((split / "tiles.json").read_text())["tiles"]}


@pytest.mark.slow
def test_a_boxless_target_gets_a_flag_level_report_and_one_detector(boxless_run):
    work, cfg, report = boxless_run
    tiles = work / "tiles"
    manifest = json.loads((tiles / "manifest.json").read_text())
    assert manifest["target_boxes"] is False and not (tiles / "evaluation").exists()
    held = _tile_ids(tiles / "target-holdout")
    train = _tile_ids(tiles / "target-train")
    # held out by group (target-train has two scenes): whole scenes, none split, none left in training
    assert manifest["splits"]["target-holdout"]["held_out"]["by"] == "group"
    held_groups = set(manifest["splits"]["target-holdout"]["groups"])
    assert held and not held & train and not held_groups & set(manifest["splits"]["target-train"]["groups"])
    # no training view and no labelled set holds a held-out tile
    viewed = [p for p in work.rglob("*.png") if "view" in p.parts or "dataset" in p.parts]
    assert viewed and not any(p.stem in held or "target-holdout" in str(p.resolve()) for p in viewed)
    labelled = {p.stem for p in (work / "annotation").glob("real-*/dataset/images/*.png")}
    assert labelled and labelled <= train
    # one seed (the first of detection.seeds), the recipe's variants, no oracle and no comparison
    trained = {p.name: sorted(q.name for q in p.iterdir() if q.is_dir()) for p in (work / "detectors").iterdir()}
    assert all(seeds == ["seed0"] for seeds in trained.values())
    rounds = {f"real-heatmap-r{k}+source" for k in range(2, 3)}
    assert {"source-only", "real-heatmap+source"} <= set(trained) <= {"source-only", "real-heatmap+source", *rounds}
    handed = json.loads((work / "detector.json").read_text())
    assert handed["variant"] == max(set(trained) - {"source-only"}, key=len) and handed["target_test_ap50"] is None
    # the variant's weights, handed over without the paths of this machine
    weights = work / "detectors" / handed["variant"] / "seed0" / "train" / "detector.pt"
    assert handed["trained_sha256"] == file_sha256(weights) and handed["sha256"] == file_sha256(work / "detector.pt")
    mine, theirs = _state_dict(work / "detector.pt"), _state_dict(weights)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert str(work).encode() not in (work / "detector.pt").read_bytes()
    # each detector says its figures are flag-level, measured on every held-out tile
    for variant in trained:
        metrics = json.loads((work / "detectors" / variant / "seed0" / "metrics.json").read_text())
        assert metrics["figures"] == "flags" and "ap50" not in metrics
        assert metrics["flag_scores"]["tiles"] == len(held)
        predictions = json.loads((work / "detectors" / variant / "seed0" / "predictions_holdout.json").read_text())
        assert set(predictions) == held
    # the report opens with the answer in flag-level figures and says why there is no AP50
    text = report.read_text()
    first = text.splitlines()[0]
    doc = json.loads((report.parent / "report.json").read_text())
    rows = {r["variant"]: r for r in doc["flag_scores"]["variants"]}
    mine, base = rows[handed["variant"]]["tile_ap"]["mean"], rows["source-only"]["tile_ap"]["mean"]
    assert first == (
        f"# Handed over `{handed['variant']}`: tile-level AP {mine:.3f} against source-only {base:.3f} "
        f"on {len(held)} held-out flagged tiles (no target boxes: no AP50)"
    )
    assert doc["target_boxes"] is False and doc["variants"] == [] and set(rows) == set(trained)
    assert "| variant | role | seeds | tile AP | AUROC | vehicles per tile |" in text
    assert "AP50:95" not in text and "oracle" not in rows and "No oracle" in text
    # the rounds' label agreement, the held-out grid, the wall time
    assert set(doc["label_agreement"]) == {n.removesuffix("+source") for n in rounds if "heatmap" in n}
    assert (report.parent / "predictions_holdout_grid.png").stat().st_size > 1000
    assert 0 < doc["wall_time"]["run_s"] and "Wall time: this run took" in text


@pytest.mark.slow
def test_the_terminal_shows_the_flag_level_table_of_a_boxless_run(boxless_run, capsys):
    """What ``aerosynth adapt`` prints at the end: the flag-level table (the AP50 table would be empty)."""
    from aerosynth.flows.cli_run import _print_ap50_table

    work, _, report = boxless_run
    _print_ap50_table(Path(report))
    text = capsys.readouterr().out
    assert "no target boxes" in text and "tile AP" in text and "AP50 on target-test" not in text
    doc = json.loads((Path(report).parent / "report.json").read_text())
    for row in doc["flag_scores"]["variants"]:
        assert row["variant"] in text


def test_boxes_or_their_flags_hand_over_the_same_detector(boxless_run, domains, tmp_path):
    """The equivalence at fixture scale: the target with boxes, same holdout and no comparisons, same file."""
    from aerosynth.flows.adapt import run_adapt

    work, _, _ = boxless_run
    source, boxed, _ = domains
    cfg = _config(
        tmp_path / "run",
        source,
        boxed,
        data={"flags_holdout": 0.2},
        detection={"seeds": [0, 1], "comparisons": False},
    )
    report = run_adapt(cfg)
    other = tmp_path / "run"
    for split in ("target-train", "target-holdout"):
        assert _tile_ids(other / "tiles" / split) == _tile_ids(work / "tiles" / split)
    handed, theirs = (json.loads((w / "detector.json").read_text()) for w in (other, work))
    assert handed["variant"] == theirs["variant"] and handed["target_test_ap50"] is not None

    assert (other / "detector.pt").read_bytes() == (work / "detector.pt").read_bytes()  # byte-identical
    same = json.loads((other / "detectors" / handed["variant"] / "seed0" / "metrics.json").read_text())
    assert same["figures"] == "ap50+flags"
    assert (
        same["flag_scores"]
        == json.loads((work / "detectors" / handed["variant"] / "seed0" / "metrics.json").read_text())["flag_scores"]
    )
    # with boxes both kinds of figures are reported, and the oracle is trained
    text = report.read_text()
    assert text.splitlines()[0].startswith(f"# Handed over `{handed['variant']}`: AP50 ")
    assert "### Flag-level figures" in text and (other / "detectors" / "oracle" / "seed0").is_dir()


def _records(groups: dict[str, list[bool]]):
    from aerosynth.data.tileset import TileRecord

    return [
        TileRecord(f"{g}_{i * 32}_0", f"{g}.tif", g, i * 32, 0, 32, 32, flag)
        for g, flags in groups.items()
        for i, flag in enumerate(flags)
    ]


def test_holdout_takes_whole_groups_or_tiles_of_each_flag():
    from aerosynth.data.errors import InputError
    from aerosynth.data.prepare import holdout_tiles

    groups = {f"g{k}": [True, False, True, True] for k in range(5)}
    held, by = holdout_tiles(_records(groups), 0.2)
    assert by == "group" and len(held) == 4 and len({t.split("_")[0] for t in held}) == 1
    assert holdout_tiles(_records(groups), 0.2) == (held, by)  # a fixed seed: the same tiles every time
    held, _ = holdout_tiles(_records(groups), 0.5)
    assert len(held) == 12  # whole groups until half the tiles
    assert len(holdout_tiles(_records(groups), 0.99)[0]) == 16  # one group always stays for training
    one = {"g0": [True] * 10 + [False] * 5}
    held, by = holdout_tiles(_records(one), 0.2)
    flags = {r.tile_id: r.has_vehicle for r in _records(one)}
    assert by == "tile" and sorted(flags[t] for t in held) == [False, True, True]  # a share of each flag
    with pytest.raises(InputError, match="none can be held out"):
        holdout_tiles(_records({"g0": [True]}), 0.2)


def test_without_comparisons_the_plan_keeps_the_recipe_only(tmp_path):
    from aerosynth.flows.adapt_tiles import plan_run, recipe
    from aerosynth.flows.config import build_config

    boxless, boxed = tmp_path / "boxless", tmp_path / "boxed"
    for folder, extra in ((boxless, {"target_boxes": False}), (boxed, {})):
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"kind": "aerosynth.tiles", "splits": {}, **extra}))
    doc = {"detection": {"seeds": [3, 4, 5]}, "annotation": {"copy_paste": {"enabled": True}}}
    cfg = build_config(doc)
    assert recipe(cfg) == "real-heatmap-r3+source"
    plan = plan_run(cfg, boxless)
    d, a = plan.detection, plan.annotation
    assert d.seeds == [3] and not d.oracle and not d.continued and d.adapted_seeds is None
    assert a.real_target.methods == ["heatmap"] and a.real_target.rounds == 3 and plan.generation.enabled
    assert not (a.relay.enabled or a.threshold.enabled or a.copy_paste.enabled or plan.generation.translation.enabled)
    assert cfg.detection.seeds == [3, 4, 5]  # the config itself is left as it is
    # with boxes (or asked for) the whole study, as before
    assert plan_run(cfg, boxed) == cfg
    asked = build_config({**doc, "detection": {**doc["detection"], "comparisons": True}})
    assert plan_run(asked, boxless).detection.seeds == [3, 4, 5] and not plan_run(asked, boxless).detection.oracle
    # a recipe that needs no LDM trains none
    st = build_config({"annotation": {"real_target": {"methods": ["self-training"], "rounds": 2}}})
    plan = plan_run(st, boxless)
    assert recipe(st) == "real-self-training-r2+source" and not plan.generation.enabled
    assert plan.annotation.real_target.methods == ["self-training"]
