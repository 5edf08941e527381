"""``data.flags: none``: the target's flags derived from F_S at a threshold chosen on source-val, no flag read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from aerosynth.annotation.tile_flags import DERIVED_FLAGS_FILE, choose_flag_threshold, derive_target_flags
from aerosynth.data.errors import InputError
from tests.data.make_fixtures import write_demo_targets
from tests.test_boxless_target import _config


def test_the_threshold_is_the_lowest_score_that_keeps_the_precision():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0])
    truth = [True, True, False, True, False, True, True]
    # flagged at >= 0.6: 3 of 4 right (0.75); at >= 0.4: 4 of 6 (0.67); at >= 0.8: 2 of 2
    chosen = choose_flag_threshold(scores, truth, precision=0.75)
    assert (chosen.threshold, chosen.precision, chosen.recall, chosen.reached) == (0.6, 0.75, 0.6, True)
    assert choose_flag_threshold(scores, truth, precision=0.6).threshold == 0.4
    assert choose_flag_threshold(scores, truth, precision=1.0).threshold == 0.8
    # unreachable: the threshold of the best precision, and it says so
    worst = choose_flag_threshold(np.array([0.9, 0.5]), [False, True], precision=0.9)
    assert (worst.threshold, worst.reached, worst.precision) == (0.5, False, 0.5)
    with pytest.raises(InputError, match="no tile holds a vehicle"):
        choose_flag_threshold(scores, [False] * 7)
    with pytest.raises(InputError, match="finds nothing"):
        choose_flag_threshold(np.zeros(3), [True, False, True])


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_demo_targets(tmp_path_factory.mktemp("demo"))


@pytest.mark.slow
def test_a_target_without_any_flag_is_flagged_by_the_source_only_detector(prefect_harness, domains, tmp_path):
    """No flag file is read (the target's flags.json is there, and ignored); F_S flags target-train; every step
    after it reads the flagged tiles; the derived flags ignore the flags the tiles carry (flipped: same flags)."""
    from aerosynth.data.tileset import read_tiles_file
    from aerosynth.detection.prediction import predict
    from aerosynth.flows.adapt import run_adapt

    source, _, flagged = domains
    work = tmp_path / "run"
    cfg = _config(work, source, flagged, data={"flags": "none"})
    # no LDM (seconds saved): F_S's own labels follow the flags as the heat-map labels do
    cfg["generation"] = {**cfg["generation"], "enabled": False}
    cfg["annotation"] = {**cfg["annotation"], "real_target": {"rounds": 1, "methods": ["self-training"]}}
    report = run_adapt(cfg)
    assert report.is_file()
    given = read_tiles_file(work / "tiles" / "target-train")[1]
    assert not any(t.has_vehicle for t in given)  # flags.json not read: every tile a placeholder "empty"
    derived = json.loads((work / "tiles-flagged" / DERIVED_FLAGS_FILE).read_text())
    records = read_tiles_file(work / "tiles-flagged" / "target-train")[1]
    threshold = derived["source_val"]["threshold"]
    assert {t.tile_id: t.has_vehicle for t in records} == {t: s >= threshold for t, s in derived["scores"].items()}
    # the scores are F_S's best box per tile
    fs = work / "detectors" / "source-only" / "seed0" / "train" / "detector.pt"
    images = [work / "tiles-flagged" / "target-train" / "images" / f"{t.tile_id}.png" for t in records]
    best = [float(d.confidence.max()) if len(d) else 0.0 for d in predict(fs, images, conf=0.001)]
    assert np.allclose(best, [derived["scores"][t.tile_id] for t in records], atol=1e-4)
    # the real-tile labels follow the derived flags: a box on every tile flagged vehicle (best-box), none elsewhere
    labels = work / "annotation" / "real-self-training" / "dataset" / "labels"
    boxes = {
        t.tile_id: bool((labels / f"{t.tile_id}.txt").is_file() and (labels / f"{t.tile_id}.txt").read_text().strip())
        for t in records
    }
    assert boxes == {t.tile_id: t.has_vehicle for t in records}
    handed = json.loads((work / "detector.json").read_text())
    metrics = json.loads((work / "detectors" / handed["variant"] / "seed0" / "metrics.json").read_text())
    assert metrics["figures"] == "none"
    assert report.read_text().splitlines()[0].startswith(f"# Handed over `{handed['variant']}`: not scored")
    # the target-train flags the tiles carry (placeholders here) flipped: the derived flags are the same
    poisoned = tmp_path / "poisoned"
    shutil.copytree(work / "tiles", poisoned, symlinks=True)
    index = json.loads((poisoned / "target-train" / "tiles.json").read_text())
    for tile in index["tiles"]:
        tile["has_vehicle"] = not tile["has_vehicle"]
    (poisoned / "target-train" / "tiles.json").write_text(json.dumps(index))
    again = derive_target_flags(fs, poisoned, tmp_path / "again", derived["source_val"]["target_precision"])
    assert json.loads((again / DERIVED_FLAGS_FILE).read_text())["scores"] == derived["scores"]


def test_a_flag_budget_draws_that_share_of_the_tiles_with_a_seed():
    from aerosynth.data.flags import sample_tiles

    ids = [f"t{i:03d}" for i in range(40)]
    quarter = sample_tiles(ids, 0.25, seed=0)
    assert len(quarter) == 10 and quarter == sorted(quarter) and set(quarter) <= set(ids)
    assert quarter == sample_tiles(list(reversed(ids)), 0.25, seed=0)[::-1]  # the draw, not the order
    assert quarter != sample_tiles(ids, 0.25, seed=1)
    assert sample_tiles(ids, 1.0) == ids and len(sample_tiles(ids, 0.001)) == 1
    with pytest.raises(InputError, match="flag_budget"):
        sample_tiles(ids, 0.0)


@pytest.mark.parametrize("rest", ["skip", "derived"])
def test_a_flag_budget_keeps_the_given_flags_of_its_tiles_and_leaves_out_or_derives_the_rest(
    domains, tiny_detector, tmp_path, rest
):
    """``data.flag_budget``: the drawn tiles keep their given flags; the others are left out of target-train,
    or flagged by F_S (then the source-only detector must come first)."""
    from aerosynth.data.flags import sample_tiles
    from aerosynth.data.tileset import read_tiles_file
    from aerosynth.flows.adapt_tiles import derive_flags, needs_flag_step, prepare_tiles
    from aerosynth.flows.config import build_config

    source, _, flagged = domains
    doc = _config(tmp_path / "run", source, flagged, data={"flag_budget": 0.5, "flag_budget_rest": rest})
    cfg = build_config(doc)
    assert needs_flag_step(cfg) == (True, rest == "derived")
    assert needs_flag_step(build_config({**doc, "data": {**doc["data"], "flag_budget": 1.0}})) == (False, False)
    tiles = prepare_tiles(cfg, tmp_path / "run")
    given = {t.tile_id: t.has_vehicle for t in read_tiles_file(tiles / "target-train")[1]}
    assert any(given.values()) and not all(given.values())  # the fixture's flags, read from flags.json
    kept = sample_tiles(list(given), 0.5, cfg.seed)
    if rest == "skip":  # the flow's step (no detector needed)
        out = derive_flags(cfg, tmp_path / "run", tiles, None)
    else:  # the flow's step with F_S is tests above; here a small real detector stands in for F_S
        out = derive_target_flags(tiny_detector, tiles, tmp_path / "flagged", imgsz=64, keep=kept, rest="derived")
    now = {t.tile_id: t.has_vehicle for t in read_tiles_file(out / "target-train")[1]}
    assert {t: now[t] for t in kept} == {t: given[t] for t in kept}  # the analyst's flags stay
    record = json.loads((out / DERIVED_FLAGS_FILE).read_text())
    if rest == "skip":
        assert set(now) == set(kept) and record["source_val"] is None
    else:
        assert set(now) == set(given)
        threshold = record["source_val"]["threshold"]
        assert {t: now[t] for t in now if t not in kept} == {
            t: record["scores"][t] >= threshold for t in now if t not in kept
        }
    assert record["given_kept"] == len(kept)


def test_tiles_no_flag_covers_are_flagged_by_the_source_only_detector_with_unflagged_derived(
    domains, tiny_detector, tmp_path
):
    """``data.unflagged: derived`` (an analyst who flagged a share): the tiles no flag covers are kept with a
    placeholder, listed in ``unflagged.json``, never held out, and flagged by F_S; the given flags stay."""
    from aerosynth.data.flags import UNFLAGGED_FILE, read_unflagged
    from aerosynth.data.tileset import read_tiles_file
    from aerosynth.flows.adapt_tiles import derive_flags, needs_flag_step, prepare_tiles
    from aerosynth.flows.config import build_config
    from aerosynth.flows.stage_cache import run_stage

    source, _, flagged = domains
    partial = tmp_path / "partial"
    shutil.copytree(flagged, partial)
    every = json.loads((flagged / "flags.json").read_text())
    given = {t: f for i, (t, f) in enumerate(sorted(every.items())) if i % 2 == 0}  # half the tiles flagged
    (partial / "flags.json").write_text(json.dumps(given))
    work = tmp_path / "run"
    cfg = build_config(_config(work, source, partial, data={"unflagged": "derived"}))
    assert needs_flag_step(cfg) == (True, True)
    tiles = prepare_tiles(cfg, work)
    train = {t.tile_id: t.has_vehicle for t in read_tiles_file(tiles / "target-train")[1]}
    held = {t.tile_id: t.has_vehicle for t in read_tiles_file(tiles / "target-holdout")[1]}
    unflagged = read_unflagged(tiles / "target-train")
    assert unflagged == {t for t in train if t not in given} and unflagged and len(unflagged) < len(train)
    assert held and all(t in given for t in held) and held == {t: given[t] for t in held}  # scored on real flags
    assert {t: f for t, f in train.items() if t not in unflagged} == {t: given[t] for t in train if t in given}
    # an unflagged tile of the held-out group is in neither part (its image removed too)
    held_groups = {t.rsplit("_", 2)[0] for t in held}
    lost = {t for t in every if t not in given and t.rsplit("_", 2)[0] in held_groups}
    assert lost and not lost & set(train)
    assert not any((tiles / "target-train" / "images" / f"{t}.png").exists() for t in lost)
    manifest = json.loads((tiles / "manifest.json").read_text())
    assert manifest["splits"]["target-train"]["flag_sources"]["unflagged (derived)"] == len(unflagged)

    def stand_in(out):  # the flow's F_S stage folder; a small real detector stands in for F_S
        (out / "train").mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_detector, out / "train" / "detector.pt")

    source_only, _ = run_stage("source-only", tmp_path / "source-only", {}, {}, stand_in)
    out = derive_flags(cfg, work, tiles, source_only)
    now = {t.tile_id: t.has_vehicle for t in read_tiles_file(out / "target-train")[1]}
    record = json.loads((out / DERIVED_FLAGS_FILE).read_text())
    threshold = record["source_val"]["threshold"]
    assert set(now) == set(train) and record["given_kept"] == len(train) - len(unflagged)
    assert {t: now[t] for t in train if t not in unflagged} == {t: given[t] for t in train if t not in unflagged}
    assert {t: now[t] for t in unflagged} == {t: record["scores"][t] >= threshold for t in unflagged}
    assert not (out / "target-train" / UNFLAGGED_FILE).exists()  # every tile has its flag now
