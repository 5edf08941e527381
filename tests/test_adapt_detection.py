"""The adapt flow's detector step: paired design, Dask concurrency with a sequential run's bytes, F_S reuse."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from aerosynth.flows.config import build_config, load_config
from tests.conftest import TINY_ADAPT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> tuple[dict, Path]:
    from aerosynth.flows.adapt_tiles import prepare_tiles

    work = tmp_path_factory.mktemp("detectors") / "run"
    doc = copy.deepcopy(TINY_ADAPT)
    doc["work_dir"] = str(work)
    return doc, prepare_tiles(build_config(doc), work)


def _flow():
    from prefect import flow

    from aerosynth.flows.adapt import resolve, submit_detectors, variants

    @flow(name="detectors-only")
    def detectors(doc: dict, tiles: str) -> list[str]:
        cfg = build_config(doc)
        source_only = variants(cfg, Path(tiles), {}, {})[0]
        futures = submit_detectors(cfg, Path(cfg.work_dir), Path(tiles), source_only, [0, 1])
        return [str(p) for p in resolve(futures)]

    return detectors


def test_two_workers_give_the_bytes_of_a_sequential_run(prefect_harness, tiles, tmp_path):
    """Detectors submitted on two Dask workers or two worker processes write what one process writes."""
    from aerosynth.flows.scale import task_runner

    doc, tiles_dir = tiles
    outputs = {}
    for runner in ("sequential", "dask", "processes"):
        run = copy.deepcopy(doc)
        run["work_dir"] = str(tmp_path / runner)
        flow = _flow().with_options(task_runner=task_runner(runner, workers=2))
        folders = [Path(p) for p in flow(run, str(tiles_dir))]
        assert [f.name for f in folders] == ["seed0", "seed1"]
        outputs[runner] = [((f / "metrics.json").read_bytes(), (f / "predictions.json").read_bytes()) for f in folders]
    assert outputs["dask"] == outputs["sequential"]
    assert outputs["processes"] == outputs["sequential"]
    # the two seeds are two different detectors (the comparison above is not between empty files)
    assert outputs["sequential"][0][1] != outputs["sequential"][1][1]


def test_fine_tuned_variants_start_from_their_seed_source_only(tiles, tmp_path):
    from aerosynth.flows.adapt_detection import detector_config, train_and_evaluate, variants

    doc, tiles_dir = tiles
    cfg = build_config({**doc, "work_dir": str(tmp_path / "run")})
    plan = {v.name: v for v in variants(cfg, tiles_dir, {}, {})}
    assert set(plan) == {"source-only", "continued", "oracle"}
    assert {n: v.kind for n, v in plan.items()} == {
        "source-only": "source-only",
        "continued": "control",
        "oracle": "oracle",
    }
    assert not plan["source-only"].finetune and plan["continued"].finetune and plan["oracle"].finetune
    # the oracle is mixed with source tiles like every adapted variant; the control sees source only
    assert [s.name for s in plan["oracle"].train] == ["oracle", "source"]
    assert [s.name for s in plan["continued"].train] == ["source"]
    with pytest.raises(ValueError, match="fine-tunes from the source-only detector"):
        detector_config(cfg, plan["continued"], 0, None)
    fs = train_and_evaluate(cfg, tmp_path / "run", tiles_dir, plan["source-only"], 0)
    ft = detector_config(cfg, plan["continued"], 0, fs)
    assert Path(ft.model) == fs / "train" / "detector.pt"
    assert (ft.epochs, ft.mix_total, ft.extra["lr0"]) == (1, 32, cfg.detection.finetune.lr0)


def test_the_full_oracle_sees_every_target_tile_for_the_whole_recipe_budget_and_the_paired_one_a_variant_s(tiles):
    """``oracle``: every target-train tile in each epoch, and at least the images the handed-over recipe spent
    over all its rounds; ``oracle-paired`` (``detection.oracle_paired``): the budget of one fine-tune."""
    from aerosynth.data.tileset import read_tiles_file
    from aerosynth.flows.adapt_detection import detector_config, variants

    doc, tiles_dir = tiles
    n_target = len(read_tiles_file(tiles_dir / "target-train")[1])
    for rounds, images in [(2, 32), (3, 4)]:  # a budget above, and one below, the target tiles' count
        cfg = build_config(
            {
                **doc,
                "annotation": {**doc["annotation"], "real_target": {"rounds": rounds}},
                "detection": {**doc["detection"], "oracle_paired": True, "finetune": {"epochs": 2, "images": images}},
            }
        )
        plan = {v.name: v for v in variants(cfg, tiles_dir, {}, {})}
        assert plan["oracle"].kind == plan["oracle-paired"].kind == "oracle"
        fs = tiles_dir.parent / "detectors" / "source-only" / "seed0"
        full = detector_config(cfg, plan["oracle"], 0, fs)
        capped = detector_config(cfg, plan["oracle-paired"], 0, fs)
        assert (capped.epochs, capped.mix_total) == (2, images)
        target_share = 1 - cfg.detection.mix_source_fraction
        assert full.mix_total * target_share >= n_target  # every target-train tile in each epoch
        assert full.epochs * full.mix_total >= rounds * 2 * images  # the recipe's whole budget: rounds x one fine-tune
        assert (full.epochs - 1) * full.mix_total < rounds * 2 * images  # and not an epoch more
    assert "oracle-paired" not in {v.name for v in variants(build_config(doc), tiles_dir, {}, {})}
    # detection.oracle_budget: a multiple of that budget, for an oracle the budget check finds saturated
    finetune = {"epochs": 2, "images": 32}
    cfg = build_config({**doc, "detection": {**doc["detection"], "oracle_budget": 2, "finetune": finetune}})
    oracle = next(v for v in variants(cfg, tiles_dir, {}, {}) if v.name == "oracle")
    full = detector_config(cfg, oracle, 0, tiles_dir.parent / "detectors" / "source-only" / "seed0")
    budget = 2 * cfg.annotation.real_target.rounds * 2 * 32  # twice the recipe's whole budget
    assert full.epochs * full.mix_total >= budget > (full.epochs - 1) * full.mix_total
    with pytest.raises(ValueError, match="oracle_budget"):
        build_config({**doc, "detection": {**doc["detection"], "oracle_budget": 0.5}})


def test_reference_from_reuses_a_matching_source_only_detector(tiles, tmp_path):
    from aerosynth.flows.adapt_detection import train_and_evaluate, variants

    doc, tiles_dir = tiles
    first = build_config({**doc, "work_dir": str(tmp_path / "first")})
    fs = train_and_evaluate(first, tmp_path / "first", tiles_dir, variants(first, tiles_dir, {}, {})[0], 0)
    weights = (fs / "train" / "detector.pt").read_bytes()

    reuse = copy.deepcopy(doc)
    reuse["work_dir"] = str(tmp_path / "second")
    reuse["detection"]["reference_from"] = str(tmp_path / "first")
    second = build_config(reuse)
    out = train_and_evaluate(second, tmp_path / "second", tiles_dir, variants(second, tiles_dir, {}, {})[0], 0)
    assert (out / "train" / "detector.pt").read_bytes() == weights
    assert json.loads((out / "metrics.json").read_text()) == json.loads((fs / "metrics.json").read_text())

    # other settings (another budget): not reused, trained again
    other = copy.deepcopy(reuse)
    other["work_dir"] = str(tmp_path / "third")
    other["detection"]["batch"] = 4
    third = build_config(other)
    out = train_and_evaluate(third, tmp_path / "third", tiles_dir, variants(third, tiles_dir, {}, {})[0], 0)
    trained = json.loads((out / "train" / "detector.json").read_text())
    assert trained["config"]["batch"] == 4


def test_detect_takes_the_run_detector_by_default(tmp_path):
    from aerosynth.data.errors import InputError
    from aerosynth.flows.cli_tools import run_detector

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(InputError, match="no detector.pt"):
        run_detector(None, run)
    with pytest.raises(InputError, match="with --model, or an adapt run folder with --run"):
        run_detector(None, None)
    (run / "detector.pt").write_bytes(b"weights")
    assert run_detector(None, run) == run / "detector.pt"
    assert run_detector(tmp_path / "x.pt", None) == tmp_path / "x.pt"
    with pytest.raises(InputError, match="not both"):
        run_detector(tmp_path / "x.pt", run)


def _variant_weights(tiny_detector: Path, path: Path, variant: str) -> None:
    """A real checkpoint (the tiny detector's) that carries its variant's name, as each variant's weights."""
    import torch

    checkpoint = torch.load(tiny_detector, map_location="cpu", weights_only=False)
    checkpoint["train_metrics"] = {"variant": variant}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


def _handed_variant(work: Path) -> str:
    import torch

    return torch.load(work / "detector.pt", map_location="cpu", weights_only=False)["train_metrics"]["variant"]


@pytest.mark.parametrize(
    ("built", "handed_over"),
    [
        # the heat maps' rounds ended at 3 (labels stopped changing), the fused labels went on to round 4
        (["real-heatmap-r3+source", "real-fused-r4+source", "real-self-training-r3+source"], "real-fused-r4+source"),
        (["real-heatmap-r4+source", "real-fused-r4+source", "real-heatmap-r3+source"], "real-heatmap-r4+source"),
        (["real-fused-r2+source", "real-self-training-r2+source", "real-heatmap+source"], "real-fused-r2+source"),
        (["copy-paste+source", "copy-paste-blended+source", "threshold+source"], "copy-paste-blended+source"),
        (["threshold+source"], "source-only"),
    ],
)
def test_the_run_hands_over_the_deepest_round_then_heat_maps_fused_and_f_s_labels(
    tmp_path, tiny_detector, built, handed_over
):
    from aerosynth.data.manifest import file_sha256
    from aerosynth.flows.adapt_detection import deliver_detector

    work = tmp_path / "run"
    runs = {}
    for variant in ["source-only", "oracle", *built]:
        folder = work / "detectors" / variant / "seed0"
        _variant_weights(tiny_detector, folder / "train" / "detector.pt", variant)
        (folder / "metrics.json").write_text(json.dumps({"ap50": 0.5}))
        runs[variant] = [folder]
    doc = copy.deepcopy(TINY_ADAPT)
    doc["work_dir"] = str(work)
    assert "recommend" not in doc["detection"]  # the default order
    assert deliver_detector(build_config(doc), work, runs) == work / "detector.pt"
    assert _handed_variant(work) == handed_over
    handed = json.loads((work / "detector.json").read_text())
    assert handed["variant"] == handed_over and handed["seed"] == 0
    trained = work / "detectors" / handed_over / "seed0" / "train" / "detector.pt"
    assert handed["trained_sha256"] == file_sha256(trained) and handed["sha256"] == file_sha256(work / "detector.pt")


def test_the_report_names_the_detector_handed_over_and_lists_the_order_below(tmp_path, tiny_detector):
    """detector.json -> the report's opening (variant, seed, path) and its "How it was chosen" section."""
    from types import SimpleNamespace

    from aerosynth.flows.adapt_detection import deliver_detector
    from aerosynth.flows.adapt_report import handed_over_doc, how_chosen_lines

    work = tmp_path / "run"
    ap50 = {"source-only": [0.5, 0.4], "oracle": [0.9], "real-fused-r2+source": [0.7, 0.6], "relay+source": [0.55]}
    runs = {}
    for variant, scores in ap50.items():
        runs[variant] = []
        for seed, ap in enumerate(scores):
            folder = work / "detectors" / variant / f"seed{seed}"
            _variant_weights(tiny_detector, folder / "train" / "detector.pt", variant)
            (folder / "metrics.json").write_text(json.dumps({"ap50": ap}))
            runs[variant].append(folder)
    doc = copy.deepcopy(TINY_ADAPT)
    doc["work_dir"] = str(work)
    config = build_config(doc)
    assert deliver_detector(config, work, runs) == work / "detector.pt"
    handed = handed_over_doc(work)
    assert handed == {
        "variant": "real-fused-r2+source",
        "seed": 0,
        "kind": "real",
        "path": str(work / "detector.pt"),
        "ap50": 0.7,
    }
    results = {v: [SimpleNamespace(ap50=a) for a in scores] for v, scores in ap50.items()}
    lines = how_chosen_lines(config, handed, results)
    order = config.detection.recommend
    listed = [line for line in lines if line[:1].isdigit()]
    assert [line.split("`")[1] for line in listed] == order  # the whole order, one variant a line
    handed_line = listed[order.index("real-fused-r2+source")]
    assert "**handed over**" in handed_line and "AP50 0.650 ± 0.071" in handed_line
    assert all(line.endswith("not built") for line in listed if "real-fused-r2+source" not in line)
    assert lines[-1] == "Also built, outside the order: `source-only`, `oracle`, `relay+source`."
    # nothing of the order built: source-only, said so
    del runs["real-fused-r2+source"]
    deliver_detector(config, work, runs)
    handed = handed_over_doc(work)
    assert handed["variant"] == "source-only" == _handed_variant(work)
    assert how_chosen_lines(config, handed, results)[0].startswith("No variant of `detection.recommend` was built")


def test_a_mix_of_labelled_sets_shares_the_target_half_and_names_its_kind(tmp_path):
    from aerosynth.flows.adapt_detection import mixed_variant, variant_kind

    cfg = build_config({**copy.deepcopy(TINY_ADAPT), "detection": {"mixes": [["real-heatmap-r2", "translation"]]}})
    sets = {"real-heatmap-r2": tmp_path / "a" / "dataset", "copy-paste-harmonised": tmp_path / "b" / "dataset"}
    mix = mixed_variant(cfg, tmp_path / "tiles", sets)
    assert mix.name == "real-heatmap-r2+copy-paste-harmonised+source" and mix.kind == "real+synthetic"
    assert [(s.name, s.fraction) for s in mix.train] == [
        ("real-heatmap-r2", 0.25),
        ("copy-paste-harmonised", 0.25),
        ("source", 0.5),
    ]
    assert mix.upstream["real-heatmap-r2"] == tmp_path / "a" and mix.finetune
    shares = {"real-heatmap-r2": 0.5, "copy-paste-harmonised": 0.25}
    mix = mixed_variant(cfg, tmp_path / "tiles", sets, shares)
    assert mix.name == "real-heatmap-r2@50+copy-paste-harmonised@25+source" and mix.kind == "real+synthetic"
    assert [(s.name, s.fraction) for s in mix.train] == [
        ("real-heatmap-r2", 0.5),
        ("copy-paste-harmonised", 0.25),
        ("source", 0.25),
    ]
    with pytest.raises(Exception, match="sum below 1"):
        build_config({**copy.deepcopy(TINY_ADAPT), "detection": {"mixes": [{"a": 0.6, "b": 0.5}]}})
    assert variant_kind("copy-paste+source") == "baseline"
    assert variant_kind("copy-paste-harmonised+source") == "synthetic"
    assert variant_kind("copy-paste-blended+source") == "synthetic"
    assert variant_kind("real-fused-r2+copy-paste-blended+source") == "real+synthetic"
    assert variant_kind("real-self-training-r3+source") == "real"
    with pytest.raises(Exception, match="at least 2"):
        build_config({**copy.deepcopy(TINY_ADAPT), "detection": {"mixes": [["real-heatmap"]]}})


def test_a_mix_with_a_budget_of_its_own_adds_images_instead_of_resharing(tmp_path):
    from aerosynth.data.errors import InputError
    from aerosynth.flows.adapt_detection import detector_config, mixed_variant, variant_kind
    from aerosynth.flows.config import MixBudget

    spec = {"shares": {"real-heatmap-r3": 0.3333, "copy-paste-blended": 0.3333}, "images": 1920}
    doc = copy.deepcopy(TINY_ADAPT)
    doc["annotation"] |= {"real_target": {"rounds": 3}, "copy_paste": {"enabled": True, "harmonise_strength": 0.3}}
    cfg = build_config({**doc, "detection": {"mixes": [spec, {"real-heatmap-r3": 0.5}]}})
    budget, plain = cfg.detection.mixes
    assert isinstance(budget, MixBudget) and budget.images == 1920 and plain == {"real-heatmap-r3": 0.5}
    sets = {"real-heatmap-r3": tmp_path / "a" / "dataset", "copy-paste-blended": tmp_path / "b" / "dataset"}
    mix = mixed_variant(cfg, tmp_path / "tiles", sets, budget.shares, budget.images)
    assert mix.name == "real-heatmap-r3@33+copy-paste-blended@33+source-1920img"
    assert mix.kind == "real+synthetic" and variant_kind("real-heatmap-r3@50+source-1920img") == "real"
    assert [(s.name, round(s.fraction, 4)) for s in mix.train] == [
        ("real-heatmap-r3", 0.3333),
        ("copy-paste-blended", 0.3333),
        ("source", 0.3334),
    ]
    base = tmp_path / "f_s"
    assert detector_config(cfg, mix, 0, base).mix_total == 1920
    resharing = mixed_variant(cfg, tmp_path / "tiles", sets, budget.shares)
    assert detector_config(cfg, resharing, 0, base).mix_total == cfg.detection.finetune.images != 1920
    with pytest.raises(Exception, match="sum below 1"):
        build_config(
            {**copy.deepcopy(TINY_ADAPT), "detection": {"mixes": [{"shares": {"a": 0.6, "b": 0.5}, "images": 99}]}}
        )
    with pytest.raises(InputError, match=r"mixes.*shares: \{set: share, \.\.\.\}, images: N\}, got keys \['shares'\]"):
        build_config({**copy.deepcopy(TINY_ADAPT), "detection": {"mixes": [{"shares": {"a": 0.5}}]}})


def test_every_name_the_flow_forms_is_a_variant_name_and_typos_are_not(tmp_path):
    """The config's name check (recommend) accepts every name the detector step forms, refuses the rest."""
    from aerosynth.data.errors import InputError
    from aerosynth.flows.adapt_detection import mixed_variant, variants
    from aerosynth.flows.config import buildable_sets, is_variant_name

    doc = copy.deepcopy(TINY_ADAPT)
    doc["annotation"] |= {
        "real_target": {"rounds": 4, "methods": ["self-training", "heatmap", "fused"]},
        "copy_paste": {"enabled": True, "harmonise_strength": 0.3},
    }
    cfg = build_config(doc)
    sets = {n: tmp_path / n / "dataset" for n in buildable_sets(cfg)}
    assert {"relay", "copy-paste-blended", "real-fused", "real-heatmap-r4", "translation"} <= set(sets)
    names = [v.name for v in variants(cfg, tmp_path / "tiles", sets, {"translation": sets["translation"]})]
    first, second = sets["real-fused-r3"], sets["copy-paste-blended"]
    pair = {"real-fused-r3": first, "copy-paste-blended": second}
    shares = {"real-fused-r3": 0.3333, "copy-paste-blended": 0.25}
    names += [
        mixed_variant(cfg, tmp_path / "tiles", pair).name,
        mixed_variant(cfg, tmp_path / "tiles", pair, shares).name,
        mixed_variant(cfg, tmp_path / "tiles", pair, shares, 1920).name,
    ]
    assert len(names) == len(sets) + 6 and all(is_variant_name(n) for n in names), names
    assert all(is_variant_name(n) for n in cfg.detection.recommend)  # the default order
    for typo in ("bogus", "real-heatmap-r1+source", "real-heatmap-r3", "copy-paste-blend+source", "relay+source-9img"):
        assert not is_variant_name(typo), typo
        with pytest.raises(InputError, match=f"recommend\\[0\\]: '{re.escape(typo)}' is not a variant"):
            build_config({**doc, "detection": {"recommend": [typo]}})
    # the mixes of the benchmark configs name sets their methods build
    for path in sorted((Path(__file__).parents[1] / "benchmarks" / "configs").glob("*.yaml")):
        load_config(path)


def test_a_mix_must_name_sets_the_enabled_methods_build():
    from aerosynth.data.errors import InputError

    doc = copy.deepcopy(TINY_ADAPT)  # smoke: copy-paste without the LDM pass, rounds 2
    for mix, lacking in [
        (["real-heatmap-r3", "relay"], "annotation.real_target.rounds >= 3"),
        (["copy-paste-blended", "relay"], "annotation.copy_paste.harmonise_strength > 0"),
        (["real-fused", "relay"], "fused in annotation.real_target.methods"),
    ]:
        with pytest.raises(InputError, match=re.escape(f"this config does not build it (needs {lacking})")):
            build_config({**doc, "detection": {"mixes": [mix]}})
    no_ldm = {**doc, "generation": {"enabled": False}, "detection": {"mixes": [["real-self-training-r2", "relay"]]}}
    with pytest.raises(InputError, match=r"mixes\[0\]: 'relay': .*needs generation.enabled.*builds: copy-paste, real"):
        build_config(no_ldm)


@pytest.mark.parametrize("relabel_with", ["first-seed", "all-seeds", "own-seed"])
def test_each_round_is_relabelled_by_the_first_seed_or_by_every_seed_of_the_round_before(
    monkeypatch, tmp_path, relabel_with
):
    """The flow's rounds hand the relabelling the first seed's detector, or every seed's (``relabel_with``), or
    each seed its own (``own-seed``: that seed's labels, from its own chain, train that seed's detector only)."""
    import aerosynth.flows.adapt as adapt

    seeds = [0, 1, 2]
    doc = copy.deepcopy(TINY_ADAPT)
    doc["detection"] = {**doc.get("detection", {}), "seeds": seeds}
    doc.setdefault("annotation", {})["real_target"] = {"rounds": 3, "relabel_with": relabel_with}
    cfg = build_config(doc)
    asked = []

    trained = []

    def relabel(cfg, work, tiles, previous, detector, k, seed=None, previous_dir=None, stop=True):
        # the labelling itself: tests/test_flows.py
        asked.append((previous, detector, k) if seed is None else (previous_dir.name, detector, k, seed))
        folder = tmp_path / "annotation" / f"real-heatmap-r{k}" / ("" if seed is None else f"seed{seed}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "agreement.json").write_text(json.dumps({"f1": 0.5}))
        return f"real-heatmap-r{k}", folder / "dataset"

    def submit(cfg, work, tiles, variant, seeds, base):  # where each seed's detector of the round would be
        trained.append((variant.name, seeds, variant.train[0].path))
        return [tmp_path / "detectors" / variant.name / f"seed{s}" for s in seeds]

    monkeypatch.setattr(adapt, "relabel_task", relabel)
    monkeypatch.setattr(adapt, "submit_detectors", submit)
    monkeypatch.setattr(adapt, "resolve", list)
    first = [tmp_path / "detectors" / "real-heatmap+source" / f"seed{s}" for s in seeds]
    runs = {"real-heatmap+source": first}
    detectors, labelled = adapt.self_training_rounds(
        cfg, tmp_path, tmp_path / "tiles", "real-heatmap+source", runs, {}, seeds
    )
    assert set(detectors) == {"real-heatmap-r2+source", "real-heatmap-r3+source"} and set(labelled) == {
        "real-heatmap-r2",
        "real-heatmap-r3",
    }
    round2 = detectors["real-heatmap-r2+source"]
    if relabel_with == "all-seeds":
        assert asked == [("real-heatmap", first, 2), ("real-heatmap-r2", round2, 3)]
    elif relabel_with == "own-seed":
        r2 = [("real-heatmap", first[i], 2, s) for i, s in enumerate(seeds)]
        assert asked == r2 + [(f"seed{s}", round2[i], 3, s) for i, s in enumerate(seeds)]
        # each seed's detector of a round is trained on that seed's labels, alone
        assert [(n, ss) for n, ss, _ in trained] == [(f"real-heatmap-r{k}+source", [s]) for k in (2, 3) for s in seeds]
        assert [p.parent.name for _, _, p in trained] == [f"seed{s}" for _ in (2, 3) for s in seeds]
    else:
        assert asked == [("real-heatmap", first[0], 2), ("real-heatmap-r2", round2[0], 3)]


def test_a_start_checkpoint_joins_the_source_only_key_by_its_content(tmp_path):
    """``detection.model: PATH.pt`` rewritten in place must retrain F_S: its key holds the file's sha256."""
    from aerosynth.flows.adapt_detection import Variant, _settings, detector_config, reference_key

    start = tmp_path / "start.pt"
    start.write_bytes(b"weights, first version")
    doc = copy.deepcopy(TINY_ADAPT)
    doc["detection"] = {**doc["detection"], "model": str(start)}
    cfg = build_config(doc)
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "manifest.json").write_text(json.dumps({"splits": {"source-train": {"content_sha256": "abc"}}}))
    fs = Variant("source-only", [], {}, finetune=False)
    dcfg = detector_config(cfg, fs, 0, None)

    def keys() -> tuple[dict, dict]:
        return _settings(tmp_path, fs, 0, dcfg), reference_key(tiles, 0, dcfg)

    before = keys()
    assert before[0]["model"] == str(start)  # the same path ...
    start.write_bytes(b"weights, second version")
    after = keys()
    assert after[0]["model"] == str(start)
    assert after[0] != before[0] and after[1] != before[1]  # ... another content, another key
