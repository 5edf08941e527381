"""The adapt flow end to end on the tiny preset, under one Prefect test harness."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from aerosynth.data.manifest import file_sha256
from aerosynth.flows.config import build_config, load_config
from aerosynth.flows.stage_cache import STAGE_RECORD
from tests.conftest import TINY_ADAPT

pytestmark = pytest.mark.slow


def _records(work: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(work)): json.loads(p.read_text()) for p in sorted(work.rglob(STAGE_RECORD))}


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, tmp_path_factory):
    """``aerosynth demo --quick`` end to end (the smoke preset: every stage, seconds each)."""
    from aerosynth.flows.cli import main

    work = tmp_path_factory.mktemp("adapt") / "run"
    assert main(["demo", "--quick", "--work-dir", str(work)]) == 0
    cfg = copy.deepcopy(TINY_ADAPT)
    cfg["work_dir"] = str(work)
    return work, cfg, work / "report" / "report.md"


def _poison_target_boxes(tiles: Path) -> None:
    """Replace every target box under ``tiles/evaluation`` by a wrong one, in both forms it is kept in.

    The YOLO label files and the COCO ``annotations.json`` that ``open_evaluation_split`` reads: a labelling
    that read either would change.
    """
    poisoned = 0
    for labels in (tiles / "evaluation").rglob("labels"):
        for path in labels.glob("*.txt"):
            path.write_text("0 0.5 0.5 0.9 0.9\n")
            poisoned += 1
    for coco in (tiles / "evaluation").rglob("annotations.json"):
        doc = json.loads(coco.read_text())
        for ann in doc["annotations"]:
            ann["bbox"] = [1.0, 1.0, 100.0, 100.0]
            ann["area"] = 10000.0
        coco.write_text(json.dumps(doc))
        poisoned += len(doc["annotations"])
    assert poisoned, "no target box to poison"


def test_adapt_writes_every_stage_and_a_report(tiny_run):
    work, tiny_config, report = tiny_run
    records = _records(work)
    expected = {
        "tiles",
        "ldm/stage0",
        "ldm/stageA",
        "ldm/stageB",
        "ldm/stageC",
        "synthetic/source_cars",
        "synthetic/target_cars",
        "synthetic/target_empty",
        "synthetic/translation",
        "annotation/relay",
        "annotation/threshold",
        "annotation/real-self-training",
        "annotation/real-heatmap",
        "annotation/real-self-training-r2",
        "annotation/real-heatmap-r2",
    }
    assert expected <= set(records)
    # round 2 is trained unless its labels already agree with round 1's (the label-free stop rule)
    rounds = set()
    for method in ("self-training", "heatmap"):
        agreement = json.loads((work / "annotation" / f"real-{method}-r2" / "agreement.json").read_text())
        assert agreement["with"] == f"real-{method}" and 0.0 <= agreement["f1"] <= 1.0
        if agreement["f1"] < 0.95:
            rounds.add(f"real-{method}-r2+source")
    # the copy-paste baseline needs target tiles flagged empty: the smoke data has none, and says so
    skipped = json.loads((work / "annotation" / "skipped.json").read_text())
    assert "no target tile is flagged empty" in skipped["copy-paste"]
    variants = {
        "source-only",
        "continued",
        *rounds,
        "relay+source",
        "threshold+source",
        "translation+source",
        "real-self-training+source",
        "real-heatmap+source",
        "oracle",
    }
    assert {k.split("/")[1] for k in records if k.startswith("detectors/")} == variants
    doc = json.loads((report.parent / "report.json").read_text())
    assert {r["variant"] for r in doc["variants"]} == variants
    assert all(0.0 <= r["ap50"]["mean"] <= 1.0 for r in doc["variants"])
    assert (report.parent / "pr_curves.png").stat().st_size > 1000
    assert (report.parent / "synthetic_samples.png").stat().st_size > 1000
    assert "synthetic_samples.png" in report.read_text()
    assert "gap closure" in report.read_text()
    # paired design: every variant but source-only fine-tuned from the seed's source-only detector
    source_only = work / "detectors" / "source-only" / "seed0" / "train" / "detector.pt"
    for variant in variants - {"source-only"}:
        trained = json.loads((work / "detectors" / variant / "seed0" / "train" / "detector.json").read_text())
        assert Path(trained["config"]["model"]) == source_only, variant
    # one adapted detector handed over, chosen by the fixed order (no target label), named in the report
    handed = json.loads((work / "detector.json").read_text())
    recommend = build_config(tiny_config).detection.recommend
    handed_over = next(v for v in recommend if v in variants)  # the first of the fixed order the run built
    assert handed["variant"] == handed_over and handed["seed"] == 0
    trained = work / "detectors" / handed_over / "seed0" / "train" / "detector.pt"
    assert handed["trained_sha256"] == file_sha256(trained)  # its weights, as a portable copy
    given, own = (torch.load(f, map_location="cpu", weights_only=False) for f in (work / "detector.pt", trained))
    assert given["date"] is None and str(work).encode() not in (work / "detector.pt").read_bytes()
    assert all(torch.equal(v, own["model"].state_dict()[k]) for k, v in given["model"].state_dict().items())
    # the report opens with it: variant and AP50 against source-only (means over seeds) in one short line
    first = report.read_text().splitlines()[0]
    rows = {r["variant"]: r["ap50"]["mean"] for r in doc["variants"]}
    mine, base = rows[handed_over], rows["source-only"]
    assert len(first) <= 200 and first.startswith(f"# Handed over `{handed_over}`: AP50 {mine:.3f}")
    assert f"against source-only {base:.3f} ({mine - base:+.3f})" in first
    assert f"`{work / 'detector.pt'}` is seed 0 of `{handed_over}`" in report.read_text()
    assert "## How it was chosen" in report.read_text()
    # the real target-train tiles were labelled from flags + proposals: tiles flagged empty have no box
    for method in ("self-training", "heatmap"):
        dataset = work / "annotation" / f"real-{method}" / "dataset"
        summary = json.loads((dataset / "summary.json").read_text())
        flags = json.loads((work / "tiles" / "target-train" / "tiles.json").read_text())
        assert summary["tiles"] == len(list((dataset / "labels").glob("*.txt"))) > 0
        assert summary["boxes"] >= summary["flagged_tiles_with_boxes"]
        assert "source_val_at_threshold" in summary["provenance"]
        empty = [t["tile_id"] for t in flags["tiles"] if not t["has_vehicle"]]
        assert all((dataset / "labels" / f"{tid}.txt").read_text() == "" for tid in empty)
    # the heat maps come from the stage model and noise level with the best boxes on real source-val
    provenance = json.loads((work / "annotation" / "real-heatmap" / "dataset" / "summary.json").read_text())[
        "provenance"
    ]
    sources = provenance["map_sources"]
    assert set(sources) == {f"stage{s}@{n}" for s in "ABC" for n in (0.1, 0.3, 0.5)}
    chosen = provenance["chosen"]
    winner = f"{Path(chosen['model']).parent.name}@{chosen['noise_fraction']:g}"
    # the first of the best pairs, in the order stage A, B, C and noise 0.1, 0.3, 0.5
    assert winner == next(k for k, v in sources.items() if v == max(sources.values()))


def test_rerun_skips_finished_stages(tiny_run):
    from aerosynth.flows.adapt import adapt_flow

    work, cfg, _ = tiny_run
    before = _records(work)
    mtimes = {k: (work / k / STAGE_RECORD).stat().st_mtime_ns for k in before}
    adapt_flow(cfg)
    assert _records(work) == before
    assert {k: (work / k / STAGE_RECORD).stat().st_mtime_ns for k in before} == mtimes


def test_until_stops_after_a_step_and_trains_nothing_more(tiny_run, tmp_path):
    from aerosynth.flows.adapt import adapt_flow

    work, cfg, _ = tiny_run
    before = _records(work)
    # on a finished run: every step up to it is current, the folder of the step is returned
    assert adapt_flow(cfg, until="ldm") == str(work / "ldm" / "stageC" / "model")
    assert adapt_flow(cfg, until="annotation") == str(work / "annotation")
    assert _records(work) == before
    # on a new run: nothing after the LDM is made
    fresh = copy.deepcopy(cfg)
    fresh["work_dir"] = str(tmp_path / "partial")
    assert adapt_flow(fresh, until="tiles") == str(tmp_path / "partial" / "tiles")
    assert set(_records(tmp_path / "partial")) == {"tiles"}


def test_config_change_reruns_only_dependants(tiny_run):
    from aerosynth.flows.adapt import adapt_flow

    work, cfg, _ = tiny_run
    before = _records(work)
    changed = copy.deepcopy(cfg)
    changed["annotation"]["threshold"] = {"options": {"max_fraction": 0.6}}
    adapt_flow(changed)
    after = _records(work)
    rebuilt = {k for k in before if after[k]["key"] != before[k]["key"]}
    assert rebuilt == {"annotation/threshold", "detectors/threshold+source/seed0"}


def test_unknown_config_key_is_named():
    from aerosynth.data.errors import InputError

    with pytest.raises(InputError, match=r"config.detection.epochz: unknown key"):
        build_config({"preset": "demo", "detection": {"epochz": 3}})
    with pytest.raises(InputError, match="unknown preset"):
        build_config({"preset": "nope"})


def test_presets_validate():
    for preset in ("demo", "cpu-bench", "gpu"):
        assert load_config(preset=preset).name


def test_demo_preset_tests_on_over_100_target_tiles():
    """The demo's AP50 rests on >= 100 target-test tiles; small demos hold out one scene per domain."""
    from aerosynth.data.demo import held_out_scenes

    d = build_config({"preset": "demo"}).data
    _, n_test = held_out_scenes(d.demo_scenes, d.demo_scenes)
    assert n_test * (d.demo_size // d.tile_size) ** 2 >= 100  # target scenes are drawn at the tile GSD
    assert held_out_scenes(2, 2) == (1, 1)
    assert held_out_scenes(4, 4) == (1, 1)
    assert held_out_scenes(12, 12) == (2, 4)


def test_demo_note_explains_the_table_and_names_the_report(tiny_run):
    from aerosynth.flows.cli import _demo_note

    _, _, report = tiny_run
    note = _demo_note(report, quick=True)
    assert "target-test tiles of arid_carpark" in note and "oracle" in note
    assert note.splitlines()[-1].endswith(str(report))


def test_flow_publishes_report_table_image_and_progress_artifacts(tiny_run):
    import asyncio

    from prefect.client.orchestration import get_client

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    found = asyncio.run(keys())
    assert {"adapt-report", "adapt-ap50", "adapt-pr-curves", "adapt-predictions-grid"} <= found
    assert {"progress-stage-a", "progress-stage-b", "progress-stage-c"} <= found


def test_custom_data_config_prepares_tiles(tmp_path):
    from aerosynth.flows.adapt import prepare_tiles

    fixtures = Path(__file__).parent / "data"
    cfg = build_config(
        {
            "data": {
                "preset": "custom",
                "source": str(fixtures / "yolo_domain"),
                "source_gsd": 0.125,
                "target": str(fixtures / "geotiff_domain"),
                "val_groups": ["clipC"],
                "test_groups": ["scene_1"],
            }
        }
    )
    manifest = json.loads((prepare_tiles(cfg, tmp_path) / "manifest.json").read_text())
    assert {k: v["tiles"] for k, v in manifest["splits"].items()} == {
        "source-train": 12,
        "source-val": 4,
        "target-train": 16,
        "target-test": 16,
    }
    with pytest.raises(Exception, match="config.data.test_groups"):
        prepare_tiles(
            build_config(
                {
                    "data": {
                        "preset": "custom",
                        "source": str(fixtures / "yolo_domain"),
                        "target": str(fixtures / "geotiff_domain"),
                    }
                }
            ),
            tmp_path / "x",
        )


def test_model_trained_elsewhere_is_imported_as_a_stage(tiny_run, tmp_path):
    """``generation.init_model`` with every stage at 0 steps: the model is copied in and keyed on its content."""
    from aerosynth.data.errors import InputError
    from aerosynth.data.manifest import tree_sha256
    from aerosynth.flows.adapt import train_ldm

    work, cfg, _ = tiny_run
    model = work / "ldm" / "stageC" / "model"
    doc = copy.deepcopy(cfg)
    doc["work_dir"] = str(tmp_path / "w")
    doc["generation"]["init_model"] = str(model)
    for stage in ("stage0", "stage_a", "stage_b", "stage_c"):
        doc["generation"][stage]["steps"] = 0
    config = build_config(doc)
    imported = train_ldm(config, tmp_path / "w", work / "tiles")
    assert imported == tmp_path / "w" / "ldm" / "imported" / "model"
    assert tree_sha256(imported) == tree_sha256(model)
    assert json.loads((imported / "ldm.json").read_text())["spec"]["tokens_trained"] is True
    record = imported.parent / STAGE_RECORD
    stamp = record.stat().st_mtime_ns
    assert train_ldm(config, tmp_path / "w", work / "tiles") == imported
    assert record.stat().st_mtime_ns == stamp
    doc["generation"]["init_model"] = str(tmp_path)  # not a model folder
    with pytest.raises(InputError, match="no ldm.json"):
        train_ldm(build_config(doc), tmp_path / "w2", work / "tiles")


def _current_copy(tiny_run, dest: Path) -> tuple[Path, dict, dict[str, dict]]:
    """The tiny run made current for its config (whatever other tests changed), copied to ``dest``: the
    copy, the config and the copy's stage records."""
    import shutil

    from aerosynth.flows.adapt import adapt_flow

    work, cfg, _ = tiny_run
    adapt_flow(copy.deepcopy(cfg))
    shutil.copytree(work, dest)
    return dest, cfg, _records(dest)


def test_moved_run_folder_is_still_current(tiny_run, tmp_path):
    """Stage keys name paths inside the work folder relatively: a copied run skips every stage."""
    from aerosynth.flows.adapt import adapt_flow

    moved, cfg, before = _current_copy(tiny_run, tmp_path / "moved")
    adapt_flow({**copy.deepcopy(cfg), "work_dir": str(moved)})
    assert _records(moved) == before


def test_the_readme_example_config_is_valid_and_means_what_it_says():
    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```yaml\npreset: cpu-bench") + len("```yaml\n")
    cfg = build_config(yaml.safe_load(readme[start : readme.index("```", start)]))
    g = cfg.generation
    assert g.stage_a.learning_rate == 2e-4 and g.stage_a.steps == 2000
    assert (g.stage_b.steps, g.stage_c.steps) == (150, 100)
    # stage C keeps the preset's gentle rate; stage B learns its tokens only unless told otherwise
    assert g.stage_c.learning_rate == 1e-5 and g.stage_b.train_unet is None
    assert cfg.annotation.real_target.noise_levels() == [0.1, 0.3, 0.5]
    assert cfg.annotation.real_target.heatmap_models == "chosen"


def test_detect_takes_the_detector_the_run_handed_over(tiny_run, tmp_path):
    """A user's last step: the run's detector.pt over a whole GeoTIFF, GeoJSON in the raster's CRS."""
    import rasterio

    from aerosynth.flows.cli import main

    work, _, _ = tiny_run
    raster = sorted((work / "demo-raw").rglob("*.tif"))[0]
    out = tmp_path / "cars.geojson"
    assert main(["detect", str(raster), "--run", str(work), "--out", str(out), "--conf", "0.001"]) == 0
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection"
    with rasterio.open(raster) as src:
        crs, bounds = src.crs, src.bounds
    assert doc["crs"]["properties"]["name"].endswith(crs.to_string().replace(":", "::"))
    assert doc["features"], "a detector at confidence 0.001 finds something"
    for feature in doc["features"]:
        x, y = feature["geometry"]["coordinates"][0][0]
        assert bounds.left - 1 <= x <= bounds.right + 1 and bounds.bottom - 1 <= y <= bounds.top + 1
    assert main(["detect", str(raster), "--run", str(tmp_path), "--out", str(out)]) == 2  # no detector.pt there


def test_request_real_detector_labels_the_run_tiles_with_the_handed_over_detector(tiny_run, tmp_path):
    from aerosynth.data.export_validation import validate_export
    from aerosynth.flows.request import request_tiles

    work, _, _ = tiny_run
    folder = request_tiles(work, tmp_path / "exports", "real-det", "target", 3, real="detector")
    assert validate_export(folder)["items"] > 0
    summary = json.loads((work / "annotation" / "real-detector" / "dataset" / "summary.json").read_text())
    assert summary["provenance"]["detector_sha256"] == file_sha256(work / "detector.pt")
    assert summary["provenance"]["variant"] == json.loads((work / "detector.json").read_text())["variant"]
    flags = json.loads((work / "tiles" / "target-train" / "tiles.json").read_text())["tiles"]
    labels = work / "annotation" / "real-detector" / "dataset" / "labels"
    assert all((labels / f"{t['tile_id']}.txt").read_text() == "" for t in flags if not t["has_vehicle"])
    record = json.loads((folder / "request.json").read_text())
    assert record["labels_from"].startswith("real-detector labels")


@pytest.mark.parametrize("image_level", [False, True], ids=["best-box", "image-level"])
def test_a_relabelling_round_reads_no_target_box(tiny_run, tmp_path, image_level):
    import shutil

    from aerosynth.annotation.real_target import RealTargetConfig
    from aerosynth.flows.adapt_annotation import label_real_split

    work, _, _ = tiny_run
    tiles = tmp_path / "tiles"
    shutil.copytree(work / "tiles", tiles)
    detector = work / "detectors" / "real-self-training+source" / "seed0" / "train" / "detector.pt"
    rule = RealTargetConfig(image_level=image_level)

    def relabel(out: Path) -> dict[str, bytes]:
        label_real_split(
            "self-training",
            tiles / "target-train",
            tiles / "source-val",
            out,
            detector,
            threshold_on="flagged",
            flag_rule=rule,
        )
        assert json.loads((out / "summary.json").read_text())["config"]["image_level"] is image_level
        files = [*sorted((out / "labels").glob("*.txt")), out / "image_level.json"]
        return {p.name: p.read_bytes() for p in files if p.is_file()}

    before = relabel(tmp_path / "a")
    _poison_target_boxes(tiles)
    assert relabel(tmp_path / "b") == before and before


def test_fused_labels_keep_the_flags_and_read_no_target_box(tiny_run, tmp_path):
    """F_S's detections and the heat-map boxes fused: flags obeyed, the heat-map choice reused, no target box read."""
    import shutil

    from aerosynth.flows.adapt_annotation import _heatmap_choice, label_real_split

    work, _, _ = tiny_run
    tiles = tmp_path / "tiles"
    shutil.copytree(work / "tiles", tiles)
    detector = work / "detectors" / "source-only" / "seed0" / "train" / "detector.pt"
    models = sorted((work / "ldm").glob("stage[ABC]/model"))
    chosen, (level, readout) = _heatmap_choice(work / "annotation" / "real-heatmap" / "dataset", models)
    assert len(chosen) == 1

    def label(out: Path) -> dict[str, bytes]:
        label_real_split(
            "fused", tiles / "target-train", tiles / "source-val", out, chosen, level,
            detector=detector, readout=readout, threshold_on="flagged",
        )  # fmt: skip
        return {p.name: p.read_bytes() for p in sorted((out / "labels").glob("*.txt"))}

    before = label(tmp_path / "a")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["method"] == "fused" and summary["provenance"]["fusion"]["iou"] == 0.55
    assert summary["provenance"]["source_val_at_threshold"]["readout"] == readout
    flags = json.loads((tiles / "target-train" / "tiles.json").read_text())["tiles"]
    assert all(before[f"{t['tile_id']}.txt"] == b"" for t in flags if not t["has_vehicle"])
    assert summary["flagged_tiles_with_boxes"] == summary["flagged_tiles"] > 0  # the flag keeps the best box
    _poison_target_boxes(tiles)
    assert label(tmp_path / "b") == before
    with pytest.raises(Exception, match="F_S"):
        label_real_split("fused", tiles / "target-train", tiles / "source-val", tmp_path / "c", chosen, level)


def test_fused_labels_read_back_the_stored_proposals_of_the_run(tiny_run, tmp_path):
    """Fused labels from the proposals the F_S and heat-map stages stored equal those computed afresh."""
    from aerosynth.data.detections import Detections, load_detection_lists, save_detection_lists
    from aerosynth.flows.adapt_annotation import PROPOSALS_FILE, _heatmap_choice, label_real_split

    work, _, _ = tiny_run
    tiles = work / "tiles"
    detector = work / "detectors" / "source-only" / "seed0" / "train" / "detector.pt"
    models = sorted((work / "ldm").glob("stage[ABC]/model"))
    chosen, (level, readout) = _heatmap_choice(work / "annotation" / "real-heatmap" / "dataset", models)
    stored = {
        k: work / "annotation" / f"real-{m}" / PROPOSALS_FILE
        for k, m in (("detector", "self-training"), ("heatmap", "heatmap"))
    }
    assert all(p.is_file() for p in stored.values())

    def label(out: Path, reuse: dict | None) -> tuple[dict[str, bytes], dict]:
        label_real_split(
            "fused", tiles / "target-train", tiles / "source-val", out, chosen, level,
            detector=detector, readout=readout, reuse=reuse,
        )  # fmt: skip
        labels = {p.name: p.read_bytes() for p in sorted((out / "labels").glob("*.txt"))}
        return labels, json.loads((out / "summary.json").read_text())["provenance"]

    fresh, fresh_prov = label(tmp_path / "fresh", None)
    assert label(tmp_path / "reused", stored) == (fresh, fresh_prov)
    # the file is read: the same record with every heat-map box dropped changes the labels ...
    lists, meta = load_detection_lists(stored["heatmap"])
    blank = {name: [Detections.empty(with_confidence=True) for _ in dets] for name, dets in lists.items()}
    save_detection_lists(tmp_path / "blank.npz", blank, meta)
    assert label(tmp_path / "blank", {**stored, "heatmap": tmp_path / "blank.npz"})[0] != fresh
    # ... and a file made with another noise level is not
    save_detection_lists(tmp_path / "other.npz", blank, {**meta, "record": {**meta["record"], "noise_fraction": 0.99}})
    assert label(tmp_path / "other", {**stored, "heatmap": tmp_path / "other.npz"})[0] == fresh


def test_mixes_train_one_detector_each_from_the_run_sets_with_their_shares_and_budget(tiny_run, tmp_path):
    """``detection.mixes`` adds only the mixes' detectors; a mix's own budget sets its number of images."""
    from aerosynth.data.errors import InputError
    from aerosynth.flows.adapt import adapt_flow

    mixed, cfg, before = _current_copy(tiny_run, tmp_path / "mixed")
    mixes = [
        ["real-heatmap", "threshold"],
        {"real-self-training": 0.5, "relay": 0.25},
        {"shares": {"real-self-training": 0.25, "relay": 0.25}, "images": 48},
    ]
    config = {**copy.deepcopy(cfg), "work_dir": str(mixed)}
    # a mix of a set no method of this config builds is refused before any work (it used to be skipped)
    config["detection"] = {**config.get("detection", {}), "mixes": [*mixes, ["real-heatmap", "not-built-by-this-run"]]}
    with pytest.raises(InputError, match="not-built-by-this-run"):
        adapt_flow(config)
    assert _records(mixed) == before
    config["detection"]["mixes"] = mixes
    adapt_flow(config)
    after = _records(mixed)
    added = {k.split("/")[1] for k in set(after) - set(before)}
    assert added == {
        "real-heatmap+threshold+source",
        "real-self-training@50+relay@25+source",
        "real-self-training@25+relay@25+source-48img",
    }
    assert {k: after[k]["key"] for k in before if k.startswith(("tiles", "ldm", "annotation"))} == {
        k: before[k]["key"] for k in before if k.startswith(("tiles", "ldm", "annotation"))
    }
    images = build_config(cfg).detection.finetune.images
    expected = {
        "real-heatmap+threshold+source": {"real-heatmap": images // 4, "threshold": images // 4, "source": images // 2},
        "real-self-training@50+relay@25+source": {
            "real-self-training": images // 2,
            "relay": images // 4,
            "source": images // 4,
        },
        "real-self-training@25+relay@25+source-48img": {"real-self-training": 12, "relay": 12, "source": 24},
    }
    for name, counts in expected.items():
        (view,) = (mixed / "detectors" / name / "seed0").rglob("view.json")
        assert json.loads(view.read_text())["counts"] == counts, name
    reported = {r["variant"] for r in json.loads((mixed / "report" / "report.json").read_text())["variants"]}
    assert set(expected) <= reported


def test_relabelling_with_every_seed_fuses_their_boxes_keeps_the_flags_and_reads_no_target_box(tiny_run, tmp_path):
    """``relabel_with: all-seeds``: the detectors' boxes fused per tile, thresholded on source-val, flags obeyed."""
    import shutil

    from aerosynth.annotation.fusion import fuse_proposers
    from aerosynth.annotation.real_target import source_threshold
    from aerosynth.data.tileset import open_split
    from aerosynth.detection.prediction import predict_split
    from aerosynth.flows.adapt_annotation import label_real_split

    work, _, _ = tiny_run
    tiles = tmp_path / "tiles"
    shutil.copytree(work / "tiles", tiles)
    detectors = [
        work / "detectors" / v / "seed0" / "train" / "detector.pt" for v in ("real-self-training+source", "continued")
    ]

    def relabel(out: Path, proposer) -> tuple[dict[str, bytes], dict]:
        label_real_split(
            "self-training", tiles / "target-train", tiles / "source-val", out, proposer, threshold_on="flagged"
        )
        labels = {p.name: p.read_bytes() for p in sorted((out / "labels").glob("*.txt"))}
        return labels, json.loads((out / "summary.json").read_text())

    fused, summary = relabel(tmp_path / "a", detectors)
    assert summary["provenance"]["fusion"]["detectors"] == [str(d) for d in detectors]
    # the threshold is the fused boxes' own, F1-optimal on the source-val tiles holding a vehicle
    val = open_split(tiles / "source-val")
    boxes = fuse_proposers([predict_split(d, val) for d in detectors], 0.55)
    threshold, _ = source_threshold(boxes, val, tiles="flagged")
    assert summary["threshold"] == threshold
    assert threshold != source_threshold(predict_split(detectors[0], val), val, tiles="flagged")[0]
    # not the first detector's labels alone, and tiles flagged empty hold no box
    assert fused != relabel(tmp_path / "one", detectors[0])[0]
    flags = json.loads((tiles / "target-train" / "tiles.json").read_text())["tiles"]
    assert all(fused[f"{t['tile_id']}.txt"] == b"" for t in flags if not t["has_vehicle"])
    assert any(fused[f"{t['tile_id']}.txt"] for t in flags if t["has_vehicle"])
    _poison_target_boxes(tiles)
    assert relabel(tmp_path / "b", detectors)[0] == fused


def test_flagged_tiles_without_a_confident_box_reach_the_detector_image_level(tiny_run, tmp_path):
    """``flagged_without_box: image-level`` reaches the labels (no forced box: the tiles listed instead) and their
    detectors (the view's image-level images); the tiny run's tiles all have a confident box, so the tiles
    themselves are covered in ``test_image_level.py``."""
    from aerosynth.data.exporters import read_image_level
    from aerosynth.flows.adapt import adapt_flow

    work, cfg, before = _current_copy(tiny_run, tmp_path / "image-level")
    cfg = copy.deepcopy(cfg)
    cfg["work_dir"] = str(work)
    cfg.setdefault("annotation", {}).setdefault("real_target", {})["flagged_without_box"] = "image-level"
    adapt_flow(cfg)
    after = _records(work)
    # the real-tile labels and their detectors are made again; tiles, LDM, F_S and the other sets are kept
    kept = [k for k in before if not k.startswith(("annotation/real-", "detectors/real-", "report"))]
    assert kept and all(after[k] == before[k] for k in kept)
    assert after["annotation/real-self-training"] != before["annotation/real-self-training"]
    tiles_doc = json.loads((work / "tiles" / "target-train" / "tiles.json").read_text())
    flags = {t["tile_id"]: t["has_vehicle"] for t in tiles_doc["tiles"]}
    methods = build_config(cfg).annotation.real_target.methods  # (other tests may have left other methods' sets)
    datasets = sorted(d for m in methods for d in (work / "annotation").glob(f"real-{m}*/dataset"))
    assert datasets
    for dataset in datasets:
        summary = json.loads((dataset / "summary.json").read_text())
        listed = read_image_level(dataset)
        unlabelled = {p.stem for p in (dataset / "labels").glob("*.txt") if not p.read_text().strip()}
        # exactly the flagged tiles left without a box: the flag is kept, as an image-level label
        assert summary["config"]["image_level"] is True
        assert listed == {t for t in unlabelled if flags[t]} and summary["image_level_tiles"] == len(listed)
        assert summary["kept_below_threshold"] == 0
        trained = work / "detectors" / f"{dataset.parent.name}+source" / "seed0" / "train"
        if not trained.is_dir():  # a round whose labels agreed with the round before: not trained
            continue
        detector = json.loads((trained / "detector.json").read_text())
        view = json.loads((trained / "view" / "view.json").read_text())
        assert detector["image_level_images"] == view["image_level_images"]
        assert (detector["image_level_images"] > 0) == bool(listed)
