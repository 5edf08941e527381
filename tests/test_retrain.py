"""The model registry and the retrain flow: new imagery -> flags -> re-adapt -> promote if not worse."""

from __future__ import annotations

import copy
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.manifest import file_sha256
from aerosynth.data.watch import FLAGS_FILE, read_flags_file
from aerosynth.data.weak_split import build_weak_split
from aerosynth.detection.promotion import decide, record_candidate
from aerosynth.detection.registry import Registry, version_rows
from aerosynth.flows.retrain import RunSettings, find_new_imagery, retrain
from tests.conftest import TINY_ADAPT


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo_tiles(tmp_path_factory) -> Path:
    """The tiny demo prepared into tiles (source-train/-val, target-train, target-test with boxes)."""
    from aerosynth.data.demo import DemoConfig, demo_spec, write_demo_data
    from aerosynth.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("retrain-base")
    write_demo_data(root / "raw", DemoConfig(scenes_per_domain=2, size_px=256, seed=0))
    prepare_dataset(demo_spec(root / "raw"), root / "tiles")
    return root / "tiles"


@pytest.fixture(scope="module")
def new_scenes(tmp_path_factory) -> Path:
    """Fresh target-domain rasters (another seed): scene_00 with labels, scene_01 without."""
    from aerosynth.data.demo import DemoConfig, write_demo_data

    root = tmp_path_factory.mktemp("retrain-new")
    write_demo_data(root / "raw", DemoConfig(scenes_per_domain=2, size_px=256, seed=7))
    return root / "raw" / "arid_carpark"


def _watch(folder: Path, scenes: Path, labels: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(scenes / "scene_00.tif", folder / "scene_00.tif")
    if labels:
        shutil.copy(scenes / "scene_00.geojson", folder / "scene_00.geojson")
    shutil.copy(scenes / "scene_01.tif", folder / "scene_01.tif")
    return folder


def _result(ap50: float):
    from aerosynth.detection.evaluation import EvaluationResult

    return EvaluationResult.from_dict(
        {
            "ap50": ap50,
            "ap50_95": ap50 / 2,
            "precision": 0.5,
            "recall": 0.5,
            "f1": 0.5,
            "threshold": 0.3,
            "n_images": 4,
            "n_ground_truth": 9,
            "n_ignore": 1,
            "n_predictions": 20,
        }
    )


def _fake_detector(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


# --------------------------------------------------------------------------- registry
def test_registry_register_promote_list_round_trip(tmp_path, demo_tiles):
    reg = Registry.create(tmp_path / "reg", demo_tiles)
    assert reg.list_versions() == [] and reg.production() is None
    assert Registry(tmp_path / "reg").evaluation.split == "target-test"
    with pytest.raises(InputError, match="already exists"):
        Registry.create(tmp_path / "reg", demo_tiles)
    assert Registry.create(tmp_path / "reg", demo_tiles, exist_ok=True).root == reg.root
    with pytest.raises(InputError, match="not a model registry"):
        Registry(tmp_path / "nothing")

    det1 = _fake_detector(tmp_path / "a" / "detector.pt", b"weights one")
    (det1.parent / "detector.json").write_text('{"epochs_run": 1}')
    v1 = reg.register(
        det1,
        {"ap50": 0.4},
        {"run_id": "r-1"},
        config_yaml="seed: 0\n",
        files={"report.md": _fake_detector(tmp_path / "report.md", b"# report")},
    )
    v2 = reg.register(_fake_detector(tmp_path / "b" / "detector.pt", b"weights two"), {"ap50": 0.5}, {"run_id": "r-2"})
    assert [v.name for v in reg.list_versions()] == ["v0001", "v0002"]
    assert v1.detector.read_bytes() == b"weights one" and v2.detector.read_bytes() == b"weights two"
    assert {p.name for p in v1.path.iterdir()} == {
        "detector.pt",
        "detector.json",
        "config.yaml",
        "metrics.json",
        "provenance.json",
        "report.md",
        "version.json",
    }
    assert v1.metrics == {"ap50": 0.4} and v1.provenance == {"run_id": "r-1"}
    assert v1.record["files"]["detector.pt"] == file_sha256(v1.detector)

    reg.promote("v0001", "first")
    assert reg.production().name == "v0001"
    reg.promote("v0002", "better")
    prod = json.loads((reg.root / "production.json").read_text())
    assert prod["version"] == "v0002" and prod["previous"] == "v0001" and prod["reason"] == "better"
    with pytest.raises(InputError, match="no such registered version"):
        reg.promote("v0009")

    # never overwritten: a number taken by someone else (empty folder claimed) is skipped, old files stay
    (reg.root / "versions" / "v0003").mkdir()
    before = {p.name: p.read_bytes() for p in v1.path.iterdir()}
    v4 = reg.register(_fake_detector(tmp_path / "c" / "detector.pt", b"three"), {"ap50": 0.1}, {})
    assert v4.name == "v0004"
    assert {p.name: p.read_bytes() for p in v1.path.iterdir()} == before
    assert [v.name for v in reg.list_versions()] == ["v0001", "v0002", "v0004"]  # unfinished v0003 not listed
    assert not [p for p in (reg.root / "versions").iterdir() if p.name.startswith(".")]  # no temporary debris

    rows = version_rows(reg)
    assert [(r["version"], r["ap50"], r["production"]) for r in rows] == [
        ("v0001", 0.4, False),
        ("v0002", 0.5, True),
        ("v0004", 0.1, False),
    ]

    reg.mark_seen({"abc": "x.tif"}, "v0004")
    reg.mark_seen({"abc": "y.tif", "def": "z.tif"}, None)
    assert reg.seen()["abc"]["name"] == "x.tif" and reg.seen()["abc"]["version"] == "v0004" and "def" in reg.seen()


def test_concurrent_registrations_get_distinct_versions(tmp_path, demo_tiles):
    reg = Registry.create(tmp_path / "reg", demo_tiles)
    dets = [_fake_detector(tmp_path / str(i) / "detector.pt", f"w{i}".encode()) for i in range(6)]
    names: list[str] = []
    threads = [threading.Thread(target=lambda d=d: names.append(reg.register(d, {}, {}).name)) for d in dets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == [f"v{i:04d}" for i in range(1, 7)]
    assert sorted(v.detector.read_bytes() for v in reg.list_versions()) == sorted(d.read_bytes() for d in dets)


# ----------------------------------------------------------------------------- decision
def test_decision_rule_both_directions():
    assert decide(0.5, None).promote
    assert decide(0.5, 0.5, "v0001").promote  # equal is not worse
    assert decide(0.51, 0.5, "v0001").promote
    worse = decide(0.49, 0.5, "v0001")
    assert not worse.promote and "kept v0001" in worse.reason


def test_record_candidate_promotes_only_when_not_worse(tmp_path, demo_tiles):
    reg = Registry.create(tmp_path / "reg", demo_tiles)
    base = reg.register(_fake_detector(tmp_path / "p" / "detector.pt", b"prod"), {"ap50": 0.6}, {})
    reg.promote(base.name)

    worse, d = record_candidate(
        reg,
        _fake_detector(tmp_path / "w" / "detector.pt", b"worse"),
        _result(0.4),
        _result(0.6),
        base.name,
        {"run_id": "r-w"},
    )
    assert not d.promote and reg.production().name == base.name
    m = worse.metrics
    assert m["candidate"]["ap50"] == 0.4 and m["production"]["ap50"] == 0.6 and m["production"]["version"] == "v0001"
    assert m["decision"]["promote"] is False

    better, d = record_candidate(
        reg,
        _fake_detector(tmp_path / "b" / "detector.pt", b"better"),
        _result(0.6),
        _result(0.6),
        base.name,
        {"run_id": "r-b"},
    )
    assert d.promote and reg.production().name == better.name == "v0003"
    assert better.metrics["decision"]["promote"] is True

    log = reg.decisions()
    assert [(e["version"], e["promoted"], e["candidate_ap50"], e["production_ap50"], e["run"]) for e in log] == [
        ("v0002", False, 0.4, 0.6, "r-w"),
        ("v0003", True, 0.6, 0.6, "r-b"),
    ]


# --------------------------------------------------------------------------- watch, flags
def test_nothing_new_means_no_run(tmp_path, demo_tiles, new_scenes):
    reg = Registry.create(tmp_path / "reg", demo_tiles)
    watch = _watch(tmp_path / "watch", new_scenes)
    assert [r.path.name for r in find_new_imagery(watch, reg)] == ["scene_00.tif", "scene_01.tif"]
    assert find_new_imagery(watch, reg)[0].labels == watch / "scene_00.geojson"
    reg.mark_seen({file_sha256(p): p.name for p in watch.glob("*.tif")}, None)
    shutil.copy(watch / "scene_00.tif", watch / "copy_of_scene_00.tif")  # same bytes, another name: not new

    def boom(*args, **kwargs):
        raise AssertionError("no step may run when nothing is new")

    from aerosynth.flows.retrain import _Steps

    out = retrain(reg.root, watch, dict(TINY_ADAPT), steps=_Steps(boom, boom, boom))
    assert out.status == "nothing-new" and "nothing new" in out.message and out.version is None
    assert not (reg.root / "runs").exists() and reg.list_versions() == []
    with pytest.raises(InputError, match="watched folder not found"):
        find_new_imagery(tmp_path / "absent", reg)


def test_flags_from_labels_flag_file_and_stub_detector(tmp_path, demo_tiles, new_scenes):
    reg = Registry.create(tmp_path / "reg", demo_tiles)
    watch = _watch(tmp_path / "watch", new_scenes)
    rasters = find_new_imagery(watch, reg)
    calls: list[int] = []

    def stub(images: list[np.ndarray]) -> list[Detections]:
        """A vehicle of confidence 0.9 on tiles brighter than the median, 0.1 elsewhere."""
        calls.append(len(images))
        means = [float(im.mean()) for im in images]
        med = float(np.median(means))
        return [
            Detections(np.array([[10.0, 10.0, 40.0, 30.0]]), np.array([0.9 if m > med else 0.1]), np.array([0]))
            for m in means
        ]

    summary = build_weak_split(rasters, tmp_path / "split", "arid_carpark", 0.125, 128, "auto", {}, stub, 0.5)
    doc = json.loads((tmp_path / "split" / "tiles.json").read_text())
    assert doc["split"]["weak"] is True and doc["split"]["domain"] == "arid_carpark"
    flags = {t["tile_id"]: t["has_vehicle"] for t in doc["tiles"]}
    assert summary.tiles == len(flags) == 8 and calls == [4]  # the detector sees only the unlabelled raster
    assert summary.by_source == {"labels": 4, "detector": 4}
    det_tiles = [t for t in flags if t.startswith("scene_01_")]
    assert sum(flags[t] for t in det_tiles) == 2  # the two brighter tiles
    assert all(summary.per_tile[t]["source"] == "detector" for t in det_tiles)
    assert all((tmp_path / "split" / "images" / f"{t}.png").is_file() for t in flags)
    assert set(doc["tiles"][0]) >= {"transform", "crs"} and doc["tiles"][0]["crs"]

    # flags.json: a tile entry beats labels, a raster entry covers an unlabelled raster
    tile = "scene_00_0_0"
    given = {tile: not flags[tile], "scene_01.tif": False}
    (watch / FLAGS_FILE).write_text(json.dumps(given))
    s2 = build_weak_split(
        rasters, tmp_path / "split2", "arid_carpark", 0.125, 128, "given", read_flags_file(watch / FLAGS_FILE)
    )
    f2 = {t["tile_id"]: t["has_vehicle"] for t in json.loads((tmp_path / "split2" / "tiles.json").read_text())["tiles"]}
    assert f2[tile] is (not flags[tile]) and not any(f2[t] for t in det_tiles)
    assert s2.by_source == {"labels": 3, "flags.json": 5}

    # "detector" ignores given flags; "given" without any flag, or no detector at all, is an error naming the raster
    s3 = build_weak_split(rasters, tmp_path / "split3", "arid_carpark", 0.125, 128, "detector", given, stub, 0.5)
    assert s3.by_source == {"detector": 8}
    with pytest.raises(InputError, match="scene_01.tif: tile scene_01_0_0 has no given flag"):
        build_weak_split(rasters, tmp_path / "split4", "arid_carpark", 0.125, 128, "given", {})
    with pytest.raises(InputError, match="scene_01.tif: no labels or flags .* no production detector"):
        build_weak_split(rasters, tmp_path / "split5", "arid_carpark", 0.125, 128, "auto", {})
    (watch / FLAGS_FILE).write_text('{"scene_01.tif": "yes"}')
    with pytest.raises(InputError, match="flag must be true or false"):
        read_flags_file(watch / FLAGS_FILE)


# ----------------------------------------------------------- the run, with stubbed training
def _stub_steps(candidate_ap50: float, production_ap50: float, calls: list[str]):
    """Real tile building (stub detector for flags); readapt writes fake weights; fixed metrics."""
    from aerosynth.flows.retrain import _Steps, build_run_tiles

    def readapt(cfg, work, tiles, variant, use_tasks):
        calls.append("readapt")
        assert json.loads((tiles / "target-train" / "tiles.json").read_text())["split"]["weak"] is True
        _fake_detector(work / "detectors" / "stub" / "train" / "detector.pt", b"candidate " + work.name.encode())
        return "stub", work / "detectors" / "stub"

    def evaluate(weights, registry, imgsz, device):
        return _result(candidate_ap50 if b"candidate" in Path(weights).read_bytes() else production_ap50)

    return _Steps(build_run_tiles, readapt, evaluate)


def _always_vehicle(images):
    return [Detections(np.array([[1.0, 1.0, 9.0, 9.0]]), np.array([0.8]), np.array([0])) for _ in images]


@pytest.mark.parametrize(("candidate_ap50", "promoted"), [(0.45, False), (0.55, True)])
def test_retrain_run_with_fixed_metrics(tmp_path, demo_tiles, new_scenes, candidate_ap50, promoted):
    reg = Registry.create(tmp_path / "reg", demo_tiles)
    prod = reg.register(_fake_detector(tmp_path / "p" / "detector.pt", b"production"), {"ap50": 0.5}, {})
    reg.promote(prod.name)
    watch = _watch(tmp_path / "watch", new_scenes)
    calls: list[str] = []
    out = retrain(
        reg.root,
        watch,
        _tiny_retrain_config(),
        RunSettings(flag_threshold=0.5),
        predictor=_always_vehicle,
        steps=_stub_steps(candidate_ap50, 0.5, calls),
    )
    assert out.status == "registered" and out.version == "v0002" and out.promoted is promoted and calls == ["readapt"]
    assert reg.production().name == ("v0002" if promoted else "v0001")
    v2 = reg.version("v0002")
    assert v2.detector.read_bytes().startswith(b"candidate")
    assert (v2.metrics["candidate"]["ap50"], v2.metrics["production"]["ap50"]) == (candidate_ap50, 0.5)
    assert reg.decisions()[-1]["promoted"] is promoted
    flags = v2.provenance["flags"]
    assert flags["by_source"] == {"labels": 4, "detector": 4} and flags["detector"] == "v0001"
    work = Path(out.work_dir)
    tiles = json.loads((work / "tiles" / "target-train" / "tiles.json").read_text())["tiles"]
    assert all(t["has_vehicle"] for t in tiles if t["tile_id"].startswith("scene_01_"))  # the stub's flags
    assert (work / "tiles" / "evaluation" / "target-test" / "annotations.json").is_file()
    assert not (work / "tiles" / "evaluation" / "target-train").exists()  # no target-train boxes anywhere
    assert "promoted" in (v2.path / "report.md").read_text()
    # the imagery is now seen (promoted or not): a second run does nothing
    assert retrain(reg.root, watch, _tiny_retrain_config(), steps=_stub_steps(0.9, 0.5, calls)).status == "nothing-new"
    assert calls == ["readapt"]


# ------------------------------------------------------------------------- end to end
def _tiny_retrain_config() -> dict:
    cfg = copy.deepcopy(TINY_ADAPT)
    cfg["annotation"]["relay"]["enabled"] = False
    cfg["generation"]["translation"] = {"enabled": False}
    cfg["annotation"]["real_target"] = {"enabled": False}
    return cfg


@pytest.mark.slow
def test_retrain_flow_registers_candidate_and_promotes_only_if_not_worse(
    prefect_harness, tmp_path, demo_tiles, new_scenes
):
    import torch

    from aerosynth.detection.augment import AugmentConfig
    from aerosynth.detection.datasets import DatasetSpec
    from aerosynth.detection.promotion import ensure_registry
    from aerosynth.detection.training import DetectorTrainConfig, train_detector
    from aerosynth.flows.retrain import retrain_flow, run_retrain

    torch.set_num_threads(2)
    # production: a 1-epoch source-only detector (it also computes the flags of the unlabelled raster)
    weights = train_detector(
        DetectorTrainConfig(epochs=1, patience=1, batch=4, augment=AugmentConfig.none()),
        [DatasetSpec(demo_tiles / "source-train")],
        DatasetSpec(demo_tiles / "source-val"),
        tmp_path / "baseline",
    )
    reg = ensure_registry(tmp_path / "reg", demo_tiles, baseline=weights)
    assert reg.production().name == "v0001" and reg.production().metrics["decision"]["promote"] is True
    assert ensure_registry(tmp_path / "reg", demo_tiles, baseline=weights).list_versions()[-1].name == "v0001"
    watch = _watch(tmp_path / "watch", new_scenes)

    out = retrain_flow(
        str(reg.root), str(watch), _tiny_retrain_config(), flag_threshold=0.01, variant="threshold+source"
    )
    assert out["status"] == "registered" and out["version"] == "v0002"
    assert out["new_imagery"] == ["scene_00.tif", "scene_01.tif"]
    v2 = reg.version("v0002")
    m = v2.metrics
    cand, prod = m["candidate"]["ap50"], m["production"]["ap50"]
    assert 0.0 <= cand <= 1.0 and 0.0 <= prod <= 1.0 and m["production"]["version"] == "v0001"
    assert m["decision"]["promote"] is (cand >= prod) is out["promoted"]
    assert reg.production().name == ("v0002" if cand >= prod else "v0001")
    assert reg.decisions()[-1]["version"] == "v0002" and reg.decisions()[-1]["production_ap50"] == prod
    assert {"detector.pt", "report.md", "report.json", "config.yaml", "provenance.json"} <= {
        p.name for p in v2.path.iterdir()
    }

    prov = v2.provenance
    assert prov["parent_version"] == "v0001" and prov["variant"] == "threshold+source"
    assert [r["sha256"] for r in prov["new_imagery"]] == [file_sha256(watch / n) for n in out["new_imagery"]]
    assert prov["flags"]["by_source"] == {"labels": 4, "detector": 4} and prov["flags"]["detector"] == "v0001"
    assert prov["data"]["splits"]["target-train"] and prov["data"]["base_manifest_sha256"] and prov["flow_run_id"]
    assert set(reg.seen()) == {file_sha256(p) for p in watch.glob("*.tif")}

    # the evaluation split is never trained on: the candidate's training data are synthetic sets only
    work = Path(out["work_dir"])
    trained_on = json.loads((v2.path / "detector.json").read_text())["train"]
    assert all("target-test" not in d["path"] for d in trained_on)
    run_tiles = json.loads((work / "tiles" / "target-train" / "tiles.json").read_text())["tiles"]
    assert {t["source_image"] for t in run_tiles} == {"scene_00.tif", "scene_01.tif"}

    again = run_retrain(reg.root, watch, _tiny_retrain_config())
    assert again["status"] == "nothing-new" and [v.name for v in reg.list_versions()] == ["v0001", "v0002"]


def test_run_settings_reject_unknown_flag_source(tmp_path, demo_tiles, new_scenes):
    reg = Registry.create(tmp_path / "reg", demo_tiles)
    watch = _watch(tmp_path / "watch", new_scenes)
    with pytest.raises(InputError, match="unknown flag source"):
        build_weak_split(find_new_imagery(watch, reg), tmp_path / "s", "arid_carpark", 0.125, 128, "sometimes")
    with pytest.raises(InputError, match="unknown flag source"):
        RunSettings(flags="sometimes")
    with pytest.raises(InputError, match="flag_threshold"):
        RunSettings(flag_threshold=2.0)


def test_a_watched_folder_gives_its_flags_in_json_csv_or_both_and_no_geojson_is_ignored(tmp_path):
    from aerosynth.data.watch import read_watched_flags

    watch = tmp_path / "incoming"
    watch.mkdir()
    assert read_watched_flags(watch) == {}
    (watch / "flags.csv").write_text("id,flag\nscene_00_0_0,vehicle\nscene_01.tif,0\n")
    assert read_watched_flags(watch) == {"scene_00_0_0": True, "scene_01.tif": False}
    (watch / "flags.json").write_text(json.dumps({"scene_00_128_0": False}))
    assert read_watched_flags(watch) == {"scene_00_128_0": False, "scene_00_0_0": True, "scene_01.tif": False}
    (watch / "flags.json").write_text(json.dumps({"scene_00_0_0": False}))  # the two files disagree
    with pytest.raises(InputError, match="scene_00_0_0"):
        read_watched_flags(watch)
    (watch / "flags.json").unlink()
    (watch / "flags.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(InputError, match="flags.json and flags.csv only"):
        read_watched_flags(watch)
