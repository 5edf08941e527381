"""The ``adapt`` flow: tiles -> LDM stages 0/A/B/C -> synthesis -> annotation -> detectors -> report.

Thin orchestration only: every step calls one stage's public function, inside
:func:`aerosynth.flows.stage_cache.run_stage`, so a rerun skips what is finished and a config change
reruns only what depends on it. Each step is a Prefect task with a retry.

Work folder of a run::

    WORK/
      config.yaml                 the validated config
      tiles/                      data.prepare output (manifest.json)
      ldm/stage0|A|B|C/           generation.training outputs (model/, checkpoints/, losses.csv)
      synthetic/<set>/            generation.sampling sets (source_cars, target_cars, target_empty, translation)
      annotation/relay|threshold/ annotation exports (YOLO, COCO, GeoJSON, preview, summary)
      detectors/<variant>/seed<k>/  detection.training outputs + predictions on target-test + metrics.json
      report/                     report.md, report.json, PNGs
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.errors import InputError
from aerosynth.flows.config import AdaptConfig, build_config, dump_config
from aerosynth.flows.scale import map_shards, task_runner
from aerosynth.flows.stage_cache import clear_stale_stage, run_stage, stage_is_current

SOURCE_ONLY, ORACLE = "source-only", "oracle"


def _logger() -> logging.Logger:
    try:
        return get_run_logger()  # type: ignore[return-value]
    except Exception:
        return logging.getLogger("aerosynth.flows")


def _repo_relative(path: Path | None) -> Path | None:
    """Relative paths in a config are read from the current folder, then from the repo's; made absolute."""
    if path is None or path.is_absolute():
        return path
    if path.exists():
        return path.resolve()
    candidate = Path(__file__).resolve().parents[1] / path
    return candidate.resolve() if candidate.exists() else path


def _key_path(path: Path | None, work: Path) -> str:
    """A path as a stage key names it: relative to the work folder when inside it, so a moved run stays current."""
    if path is None:
        return "None"
    try:
        return "work:" + Path(path).resolve().relative_to(Path(work).resolve()).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------- data
def prepare_tiles(config: AdaptConfig, work: Path) -> Path:
    from aerosynth.data.prepare import prepare_dataset

    d = config.data

    def build(out: Path) -> None:
        if d.preset in ("aerial-v1", "aerial-v1-minsk"):
            from aerosynth.data.presets import AERIAL_V1_PRESETS, aerial_v1, default_aerial_root

            spec = aerial_v1(_repo_relative(d.aerial_root) or default_aerial_root(), AERIAL_V1_PRESETS[d.preset])
        elif d.preset == "demo":
            from aerosynth.data.demo import DemoConfig, demo_spec, write_demo_data

            raw = work / "demo-raw"
            write_demo_data(
                raw, DemoConfig(scenes_per_domain=d.demo_scenes, size_px=d.demo_size, seed=config.seed), overwrite=True
            )
            spec = demo_spec(raw, d.gsd, d.tile_size)
        else:
            from aerosynth.data.domains import open_domain
            from aerosynth.data.prepare import custom_spec

            for field in ("source", "target"):
                if getattr(d, field) is None:
                    raise InputError(f"config.data.{field}", "required when data.preset is custom")
            if not d.test_groups:
                raise InputError("config.data.test_groups", "name the target groups held out for target-test")
            src = open_domain(d.source, d.source_gsd, d.bands)
            tgt = open_domain(d.target, d.target_gsd, d.bands)
            spec = custom_spec(
                src,
                tgt,
                d.val_groups,
                d.test_groups,
                d.gsd,
                d.tile_size,
                train_groups=d.train_groups,
                exclude_groups=d.exclude_groups,
            )
        prepare_dataset(spec, out, overwrite=True)

    out, _ = run_stage(
        "tiles", work / "tiles", {**d.model_dump(mode="json"), "seed": config.seed}, {}, build, _logger()
    )
    return out


def _step_logger(name: str, total: int):
    """An ``on_step`` callback that logs progress (step, loss, s/step, ETA) about 20 times per stage."""
    import time

    every = max(1, total // 20)
    start = time.perf_counter()
    first: list[int] = []
    artifact: list = []  # the Prefect progress artifact of this stage, made at the first report

    def on_step(step: int, losses: dict) -> None:
        if not first:
            first.append(step)
        if step % every and step != total:
            return
        done = step - first[0] + 1
        rate = (time.perf_counter() - start) / max(done, 1)
        loss = losses.get("loss")
        _logger().info(
            "%s: step %d/%d  loss %s  %.2f s/step  ETA %.0f s",
            name,
            step,
            total,
            f"{loss:.4f}" if isinstance(loss, float) else loss,
            rate,
            rate * (total - step),
        )
        _progress_artifact(artifact, name, step / max(total, 1))

    return on_step


def _progress_artifact(holder: list, name: str, fraction: float) -> None:
    """Create or update a Prefect progress artifact (percent) for a long stage; silent outside a flow run."""
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if not holder:
            key = "progress-" + "".join(c if c.isalnum() else "-" for c in name.lower())
            holder.append(create_progress_artifact(0.0, key=key, description=f"aerosynth {name}"))
        update_progress_artifact(holder[0], round(100 * fraction, 1))
    except Exception:  # no flow run context (plain function calls, tests)
        pass


def split_domains(tiles: Path) -> tuple[str, str]:
    manifest = json.loads((tiles / "manifest.json").read_text())
    return manifest["splits"]["source-train"]["domain"], manifest["splits"]["target-train"]["domain"]


def _val_split(tiles: Path) -> Path:
    """Early stopping on real source-val when there is one, else on source-train (never on target labels)."""
    return tiles / "source-val" if (tiles / "source-val" / "tiles.json").is_file() else tiles / "source-train"


# ------------------------------------------------------------------------- generation
def train_ldm(config: AdaptConfig, work: Path, tiles: Path) -> Path:
    """Stages 0 (when no pretrained autoencoder), A, B, C; returns the last model folder."""
    from aerosynth.generation.training import Stage0Config, StageAConfig, StageBConfig, StageCConfig, train_stage

    g = config.generation
    splits = [tiles / "source-train", tiles / "target-train"]
    autoencoder = _repo_relative(g.autoencoder_dir)
    upstream: dict[str, Path] = {"tiles": tiles}
    common = {"preset": g.model, "seed": config.seed, "progress": False}
    # where it runs is not part of a stage's key: a run may resume on another device
    runtime = {"device": config.device, "mixed_precision": config.mixed_precision}

    def settings(s) -> dict:
        return {k: v for k, v in s.model_dump().items()}

    if g.stage0.steps > 0 and autoencoder is None and g.pretrained_dir is None:
        cfg0 = Stage0Config(**common, **settings(g.stage0), **runtime)
        out0, _ = run_stage(
            "ldm/stage0",
            work / "ldm" / "stage0",
            {"stage": "0", **settings(g.stage0), **common},
            upstream,
            lambda out: train_stage("0", cfg0, splits, out, on_step=_step_logger("stage 0", cfg0.steps)),
            _logger(),
        )
        autoencoder = out0 / "autoencoder"
        upstream["stage0"] = out0
    previous: Path | None = _repo_relative(g.init_model)
    pretrained = _repo_relative(g.pretrained_dir)
    trained_here = False
    for stage, s, cls in (
        ("A", g.stage_a, StageAConfig),
        ("B", g.stage_b, StageBConfig),
        ("C", g.stage_c, StageCConfig),
    ):
        if s.steps == 0:
            continue
        # a Stable Diffusion folder starts the first stage when there is no aerosynth model to continue
        start = {"pretrained_dir": pretrained, "image_size": g.image_size} if previous is None and pretrained else {}
        cfg = cls(
            **common,
            **settings(s),
            **runtime,
            **start,
            init_model=previous,
            autoencoder_dir=autoencoder if previous is None else None,
        )
        # the key names the autoencoder as the config does (not the machine's absolute path)
        ae_key = (
            str(g.autoencoder_dir)
            if autoencoder is not None and g.autoencoder_dir is not None
            else _key_path(autoencoder, work)
        )
        key = {"stage": stage, **settings(s), **common, "init": _key_path(previous, work), "autoencoder": ae_key}
        if start:
            key["pretrained"] = str(g.pretrained_dir)
        out, _ = run_stage(
            f"ldm/stage{stage}",
            work / "ldm" / f"stage{stage}",
            key,
            upstream,
            lambda out, cfg=cfg, stage=stage: train_stage(
                stage, cfg, splits, out, on_step=_step_logger(f"stage {stage}", cfg.steps)
            ),
            _logger(),
        )
        previous = out / "model"
        upstream = {"tiles": tiles, f"stage{stage}": out}
        trained_here = True
    if previous is None:
        raise InputError("config.generation", "every stage has steps: 0 and no init_model is given")
    if not trained_here:
        # no stage ran here: the given model becomes a stage of this run, keyed on its content
        previous = _import_model(work, previous)
    return previous


def _import_model(work: Path, model: Path) -> Path:
    """Copy a model trained elsewhere (``generation.init_model``, all stage steps 0) into ``ldm/imported``."""
    import shutil

    from aerosynth.data.manifest import tree_sha256

    if not (model / "ldm.json").is_file():
        raise InputError(model, "generation.init_model is not an aerosynth model folder (no ldm.json)")
    out, _ = run_stage(
        "ldm/imported",
        work / "ldm" / "imported",
        {"stage": "imported", "model_sha256": tree_sha256(model)},
        {},
        lambda out: shutil.copytree(model, out / "model", dirs_exist_ok=True),
        _logger(),
    )
    return out / "model"


def synthesise(config: AdaptConfig, work: Path, tiles: Path, model: Path) -> dict[str, Path]:
    """The three text-to-image sets and the source-guided translation.

    Shards are mapped over the flow's task runner first (see :mod:`aerosynth.flows.scale`), then the stage
    is closed by one call that finds every shard done.
    """
    from aerosynth.generation.sampling import (
        SamplingConfig,
        TranslationConfig,
        generate_set,
        shard_ranges,
        translate_split,
    )

    g = config.generation
    source, target = split_domains(tiles)
    # the learned tokens are used when the model has them (stages B/C here, or a model trained elsewhere)
    uses_tokens = bool(json.loads((model / "ldm.json").read_text())["spec"].get("tokens_trained"))
    runtime = {"device": config.device, "mixed_precision": config.mixed_precision}
    sampling = SamplingConfig(
        **g.sampling.model_dump(), use_learned_tokens=uses_tokens, gsd=config.data.gsd, progress=False, **runtime
    )
    model_stage = model.parent
    threads = config.torch_threads or 0

    def sharded(name: str, key: dict, upstream: dict, kind: str, n_items: int, args: dict, cfg, build) -> Path:
        out_dir = work / "synthetic" / name
        if not stage_is_current(out_dir, key, upstream):
            clear_stale_stage(out_dir)
            if config.runner != "sequential":
                map_shards(kind, model, out_dir, len(shard_ranges(n_items, cfg.shard_size)), args, cfg, threads or 1)
        out, _ = run_stage(f"synthetic/{name}", out_dir, key, upstream, build, _logger())
        return out

    sets = {
        "source_cars": (source, g.counts.source_cars),
        "target_cars": (target, g.counts.target_cars),
        "target_empty": (target, g.counts.target_empty),
    }
    out: dict[str, Path] = {}
    for k, (name, (domain, count)) in enumerate(sets.items()):
        if count == 0:
            continue
        seed = config.seed + 100_000 * k
        key = {"set": name, "domain": domain, "count": count, "seed": seed, **g.sampling.model_dump()}
        args = {"set_name": name, "domain": domain, "count": count, "base_seed": seed}
        out[name] = sharded(
            name,
            key,
            {"model": model_stage},
            "set",
            count,
            args,
            sampling,
            lambda o, a=args: generate_set(
                model, o, a["set_name"], a["domain"], a["count"], base_seed=a["base_seed"], config=sampling
            ),
        )
    if g.translation.enabled:
        from aerosynth.data.tileset import open_split

        tcfg = TranslationConfig(
            **g.sampling.model_dump(),
            use_learned_tokens=uses_tokens,
            gsd=config.data.gsd,
            progress=False,
            strength=g.translation.strength,
            keep_threshold=g.translation.keep_threshold,
            max_tiles=g.translation.max_tiles,
            **runtime,
        )
        n = len(open_split(tiles / "source-train"))
        n = min(n, g.translation.max_tiles or n)
        key = {"set": "translation", "domain": target, **g.translation.model_dump(), **g.sampling.model_dump()}
        args = {"source_split": str(tiles / "source-train"), "domain": target, "base_seed": config.seed}
        out["translation"] = sharded(
            "translation",
            key,
            {"model": model_stage, "tiles": tiles},
            "translation",
            n,
            args,
            tcfg,
            lambda o: translate_split(model, tiles / "source-train", o, target, base_seed=config.seed, config=tcfg),
        )
    return out


# ------------------------------------------------------------------------- annotation
def annotate(
    config: AdaptConfig,
    work: Path,
    tiles: Path,
    sets: dict[str, Path],
    source_only: Path | None = None,
    model: Path | None = None,
) -> dict[str, Path]:
    """Label the synthetic target sets and the real target-train tiles.

    The relay and self-training reuse the source-only detector as F_S when given; the heat-map labels of
    real tiles come from ``model`` (the LDM).
    """
    a = config.annotation
    targets = [sets[k] for k in ("target_cars", "target_empty") if k in sets]
    upstream = {k: v for k, v in sets.items() if k != "translation"}
    out: dict[str, Path] = {}
    if a.relay.enabled:
        from aerosynth.annotation.relay import RelayConfig, run_relay

        rcfg = RelayConfig(
            model=config.detection.model,
            imgsz=config.detection.imgsz,
            seed=config.seed,
            device=config.device,
            **a.relay.model_dump(exclude={"enabled", "reuse_source_only"}),
        )
        fs = source_only / "train" / "detector.pt" if (source_only is not None and a.relay.reuse_source_only) else None
        relay_upstream = {**upstream, "tiles": tiles, **({"source_only": source_only} if fs else {})}
        try:
            stage_dir, _ = run_stage(
                "annotation/relay",
                work / "annotation" / "relay",
                {**rcfg.to_dict(), "reuse_source_only": fs is not None},
                relay_upstream,
                lambda o: run_relay(
                    tiles / "source-train", _val_split(tiles), sets["source_cars"], targets, o, rcfg, source_detector=fs
                ),
                _logger(),
            )
            out["relay"] = stage_dir / "dataset"
            _record_skipped(work, "relay", None)
        except InputError as exc:  # e.g. F_S finds no vehicle in the synthetic source images
            _logger().warning("relay skipped: %s", exc)
            _record_skipped(work, "relay", str(exc))
    if a.threshold.enabled:
        from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig, annotate_direct

        hcfg = HeatmapBoxConfig(**a.threshold.options)
        stage_dir, _ = run_stage(
            "annotation/threshold",
            work / "annotation" / "threshold",
            a.threshold.options,
            {k: v for k, v in upstream.items() if k != "source_cars"},
            lambda o: annotate_direct(targets, o / "dataset", hcfg),
            _logger(),
        )
        out["threshold"] = stage_dir / "dataset"
    if a.real_target.enabled:
        out.update(label_real_target(config, work, tiles, source_only, model))
    return out


def label_real_target(
    config: AdaptConfig, work: Path, tiles: Path, source_only: Path | None, model: Path | None
) -> dict[str, Path]:
    """The real target-train tiles labelled from weak flags and F_S's or the LDM's proposals.

    Returns ``{"real-<method>": labelled folder}``; a method whose proposer is missing is skipped.
    """
    from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig
    from aerosynth.annotation.real_target import heatmap_proposals, label_real_tiles, source_threshold
    from aerosynth.data.tileset import open_split

    r = config.annotation.real_target
    out: dict[str, Path] = {}
    for method in r.methods:
        proposer = source_only if method == "self-training" else model
        if proposer is None:
            continue
        # the proposer's stage folder: the source-only detector's, or the LDM's (model/ inside its stage)
        stage = proposer if method == "self-training" else proposer.parent
        upstream = {"tiles": tiles, ("source_only" if method == "self-training" else "model"): stage}
        key = {"method": method, "noise_fraction": r.noise_fraction, "heatmap_options": r.heatmap_options}

        def build(o: Path, method: str = method, proposer: Path = proposer, key: dict = key) -> None:
            train, val = open_split(tiles / "target-train"), open_split(_val_split(tiles))
            if method == "self-training":
                from aerosynth.detection.prediction import predict_split

                weights = proposer / "train" / "detector.pt"
                threshold, scores = source_threshold(predict_split(weights, val, device=config.device), val)
                proposals = predict_split(weights, train, device=config.device)
            else:
                from aerosynth.generation.models import load_ldm
                from aerosynth.generation.real_maps import cars_map_function

                ldm = load_ldm(proposer)
                hcfg = HeatmapBoxConfig(**r.heatmap_options)
                val_maps = cars_map_function(ldm, val.info.domain, r.noise_fraction, seed=config.seed)
                threshold, scores = source_threshold(heatmap_proposals(val, val_maps, hcfg), val)
                train_maps = cars_map_function(ldm, train.info.domain, r.noise_fraction, seed=config.seed)
                proposals = heatmap_proposals(train, train_maps, hcfg)
            label_real_tiles(
                tiles / "target-train",
                proposals,
                threshold,
                o / "dataset",
                "detector" if method == "self-training" else "heatmap",
                provenance={"source_val_at_threshold": scores, **key},
            )

        stage_dir, _ = run_stage(
            f"annotation/real-{method}", work / "annotation" / f"real-{method}", key, upstream, build, _logger()
        )
        out[f"real-{method}"] = stage_dir / "dataset"
    return out


SKIPPED_FILE = "skipped.json"


def _record_skipped(work: Path, variant: str, reason: str | None) -> None:
    """Note (or, with ``reason=None``, forget) why a variant could not be built; the report lists it."""
    path = work / "annotation" / SKIPPED_FILE
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if reason is None:
        doc.pop(variant, None)
    else:
        doc[variant] = reason
    atomic_write_json(path, doc)


# -------------------------------------------------------------------------- detection
@dataclass
class Variant:
    """One detector recipe: its training datasets and the stage folders they come from."""

    name: str
    train: list[Any]
    upstream: dict[str, Path]


def variants(config: AdaptConfig, tiles: Path, labelled: dict[str, Path], sets: dict[str, Path]) -> list[Variant]:
    from aerosynth.detection.datasets import DatasetSpec

    d = config.detection
    whole = 1.0 if d.max_train_images else None  # with a cap, every variant sees the same number of images
    source = DatasetSpec(tiles / "source-train", name="source", fraction=whole)
    out = [Variant(SOURCE_ONLY, [source], {"tiles": tiles})]
    for method, dataset in labelled.items():
        if method.startswith("real-"):  # real target tiles, always trained with real source
            f = d.mix_source_fraction
            mix = [
                DatasetSpec(dataset, name=method, fraction=1 - f),
                DatasetSpec(tiles / "source-train", name="source", fraction=f),
            ]
            out.append(Variant(f"{method}+source", mix, {"tiles": tiles, method: dataset.parent}))
            continue
        out.append(
            Variant(
                f"{method}",
                [DatasetSpec(dataset, name=method, fraction=whole)],
                {"tiles": tiles, method: dataset.parent},
            )
        )
        if method == "relay":
            f = d.mix_source_fraction
            mix = [
                DatasetSpec(dataset, name=method, fraction=1 - f),
                DatasetSpec(tiles / "source-train", name="source", fraction=f),
            ]
            out.append(Variant("relay+source", mix, {"tiles": tiles, method: dataset.parent}))
    if "translation" in sets:
        out.append(
            Variant(
                "translation",
                [DatasetSpec(sets["translation"], name="translation", fraction=whole)],
                {"tiles": tiles, "translation": sets["translation"]},
            )
        )
    if d.oracle:
        oracle = DatasetSpec(
            tiles / "target-train",
            labels_dir=tiles / "evaluation" / "target-train" / "labels",
            name="oracle",
            fraction=whole,
        )
        out.append(Variant(ORACLE, [oracle], {"tiles": tiles}))
    return out


def train_and_evaluate(config: AdaptConfig, work: Path, tiles: Path, variant: Variant, seed: int) -> Path:
    """Train one detector, predict on target-test, write ``metrics.json`` and ``predictions.json``."""
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.detection.augment import AugmentConfig
    from aerosynth.detection.evaluation import evaluate_split
    from aerosynth.detection.prediction import predict
    from aerosynth.detection.training import DetectorTrainConfig, train_detector

    d = config.detection
    augment = AugmentConfig() if d.augment else AugmentConfig.none()
    dcfg = DetectorTrainConfig(
        model=d.model,
        epochs=d.epochs,
        imgsz=d.imgsz,
        batch=d.batch,
        seed=seed,
        patience=d.patience,
        augment=augment,
        device=config.device,
        mix_total=d.max_train_images if any(s.fraction for s in variant.train) else None,
        recipe=d.recipe,
        checkpoint=d.checkpoint,
    )

    def build(out: Path) -> None:
        from aerosynth.detection.datasets import DatasetSpec

        weights = train_detector(dcfg, variant.train, DatasetSpec(_val_split(tiles), name="val"), out / "train")
        test = open_evaluation_split(tiles, "target-test")
        preds = predict(
            weights,
            [test.image_path(t.tile_id) for t in test],
            conf=0.001,
            imgsz=d.imgsz,
            max_det=100,
            device=config.device,
        )
        result = evaluate_split(test, preds)
        atomic_write_json(out / "metrics.json", result.to_dict())
        atomic_write_json(
            out / "predictions.json",
            {t.tile_id: p.to_coco(i) for i, (t, p) in enumerate(zip(test.tiles, preds, strict=True))},
        )

    train = [
        s.to_dict() | {"path": _key_path(s.path, work), "labels_dir": _key_path(s.labels_dir, work)}
        for s in variant.train
    ]
    settings = {"variant": variant.name, "train": train, "seed": seed, **dcfg.to_dict()}
    out, _ = run_stage(
        f"detectors/{variant.name}/seed{seed}",
        work / "detectors" / variant.name / f"seed{seed}",
        settings,
        variant.upstream,
        build,
        _logger(),
    )
    return out


def write_run_report(config: AdaptConfig, work: Path, tiles: Path, runs: dict[str, list[Path]]) -> Path:
    from aerosynth.data.detections import Detections
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.detection.evaluation import EvaluationResult
    from aerosynth.detection.report import write_report

    results = {
        name: [EvaluationResult.from_dict(json.loads((p / "metrics.json").read_text())) for p in paths]
        for name, paths in runs.items()
    }
    test = open_evaluation_split(tiles, "target-test")
    predictions = {}
    for name, paths in runs.items():
        doc = json.loads((paths[0] / "predictions.json").read_text())
        predictions[name] = [Detections.from_coco(doc[t.tile_id]) for t in test]
    manifests = [work / "config.yaml", tiles / "manifest.json"] + sorted(
        (work / "annotation").glob("*/dataset/manifest.json")
    )
    title = f"aerosynth {config.name}: {split_domains(tiles)[0]} -> {split_domains(tiles)[1]}"
    report = write_report(
        work / "report",
        results,
        SOURCE_ONLY,
        ORACLE,
        split=test,
        predictions=predictions,
        manifests=manifests,
        title=title,
        diagnostics=synthetic_diagnostics(config, work, tiles, runs[SOURCE_ONLY][0]) if runs.get(SOURCE_ONLY) else None,
    )
    samples = write_synthetic_samples(work / "synthetic", report.parent / "synthetic_samples.png")
    if samples is not None:
        atomic_write_text(
            report,
            report.read_text() + "\n## Synthetic images\n\nFirst images of each synthetic set, each above its heat map "
            "(R cars, G [v1], B 255 - background); translation images carry the boxes kept from their "
            "source tile.\n\n![synthetic samples](synthetic_samples.png)\n",
        )
    skipped = work / "annotation" / SKIPPED_FILE
    lines = [f"- `{k}`: {v}" for k, v in sorted(json.loads(skipped.read_text()).items())] if skipped.is_file() else []
    if lines:
        atomic_write_text(report, report.read_text() + "\n## Variants not run\n\n" + "\n".join(lines) + "\n")
    return report


def write_synthetic_samples(synthetic: Path, out_png: Path, per_set: int = 8) -> Path | None:
    """A grid: for each synthetic set, a row of its first images and a row of their heat maps."""
    import cv2
    import numpy as np

    from aerosynth.data.detections import Detections
    from aerosynth.data.imageio import read_rgb, write_png

    rows = []
    for name in ("source_cars", "target_cars", "target_empty", "translation"):
        folder = synthetic / name
        images = sorted((folder / "images").glob("*.png"))[:per_set]
        if not images:
            continue
        tops, bottoms = [], []
        for p in images:
            rgb = read_rgb(p).copy()
            label = folder / "labels" / f"{p.stem}.txt"
            if label.is_file():
                h, w = rgb.shape[:2]
                for x1, y1, x2, y2 in Detections.from_yolo(label.read_text(), w, h).xyxy.astype(int):
                    cv2.rectangle(rgb, (x1, y1), (x2, y2), (255, 0, 0), 1)
            tops.append(rgb)
            bottoms.append(read_rgb(folder / "heatmaps" / p.name))
        while len(tops) < per_set:
            tops.append(np.zeros_like(tops[0]))
            bottoms.append(np.zeros_like(tops[0]))
        band = np.full((18, tops[0].shape[1] * per_set, 3), 255, np.uint8)
        cv2.putText(band, name, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        rows += [band, np.concatenate(tops, 1), np.concatenate(bottoms, 1)]
    if not rows:
        return None
    return write_png(out_png, np.concatenate(rows, 0), palette=True)


def synthetic_diagnostics(config: AdaptConfig, work: Path, tiles: Path, source_only: Path) -> dict:
    """Label-free checks of each synthetic set, for the report (stage ``diagnostics/``; nothing is chosen with them).

    * two-sample accuracy (:mod:`aerosynth.detection.two_sample`): real tiles of the set's domain and kind
      (weak flags: with or without vehicles) against the set's images; 0.5 = indistinguishable;
    * heat-map agreement (:mod:`aerosynth.annotation.agreement`), sets with vehicles: AP50 of the boxes of the
      default heat-map rule (not the run's threshold options, so runs compare) taking F_S's detections
      (``source_only``'s detector, at its F1-optimal confidence on real source-val) as the truth.
    """
    from aerosynth.annotation.agreement import heatmap_agreement, truth_threshold
    from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig
    from aerosynth.annotation.synthetic_set import open_synthetic_set
    from aerosynth.data.tileset import open_split
    from aerosynth.detection.prediction import predict
    from aerosynth.detection.two_sample import two_sample_accuracy

    names = ("source_cars", "target_cars", "target_empty", "translation")
    folders = {n: work / "synthetic" / n for n in names if (work / "synthetic" / n / "stage_done.json").is_file()}
    settings = {"seed": config.seed, "imgsz": config.detection.imgsz}

    def build(out: Path) -> None:
        weights = source_only / "train" / "detector.pt"

        def detect(paths: list[Path]) -> list:
            return predict(weights, paths, conf=0.001, imgsz=config.detection.imgsz, device=config.device)

        val = open_split(_val_split(tiles))
        tau = truth_threshold(
            detect([val.image_path(t.tile_id) for t in val]),
            [val.labels(t.tile_id) for t in val],
            [val.ignore_regions(t.tile_id) for t in val],
        )
        hcfg = HeatmapBoxConfig()  # the default rule (as map-quality's): comparable across runs
        source, target = open_split(tiles / "source-train"), open_split(tiles / "target-train")
        real = {"source_cars": (source, True), "target_cars": (target, True), "target_empty": (target, False)}
        doc: dict[str, Any] = {"truth_threshold": tau, "sets": {}}
        for name, folder in folders.items():
            sset = open_synthetic_set(folder)
            split, flag = real.get(name, (target, True))
            entry: dict[str, Any] = {
                "images": len(sset),
                "real": f"{split.name} ({'with' if flag else 'without'} vehicles)",
                "notes": [],
            }
            images = [sset.image_path(n) for n in sset.names]
            try:
                real_images = [split.image_path(t.tile_id) for t in split if t.has_vehicle == flag]
                entry["two_sample"] = two_sample_accuracy(real_images, images, seed=config.seed)
            except InputError as exc:
                entry["two_sample"] = None
                entry["notes"].append(f"two-sample test not run: {exc}")
            entry["agreement"] = heatmap_agreement(folder, detect(images), hcfg, tau) if sset.with_vehicles else None
            doc["sets"][name] = entry
        atomic_write_json(out / "diagnostics.json", doc)

    out, _ = run_stage(
        "diagnostics", work / "diagnostics", settings, {"source_only": source_only, **folders}, build, _logger()
    )
    return json.loads((out / "diagnostics.json").read_text())


def _mean_ap50(paths: list[Path]) -> float:
    vals = [json.loads((p / "metrics.json").read_text())["ap50"] for p in paths]
    return sum(vals) / len(vals)


# ------------------------------------------------------------------------ prefect
_task = task(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
prepare_tiles_task = _task(prepare_tiles)
train_ldm_task = _task(train_ldm)
annotate_task = _task(annotate)
train_and_evaluate_task = _task(train_and_evaluate)
report_task = _task(write_run_report)


def _publish_artifacts(report_md: Path) -> None:
    """Markdown report and AP50 table as Prefect artifacts (no-op outside a flow run)."""
    try:
        from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

        create_markdown_artifact(report_md.read_text(), key="adapt-report", description="aerosynth adapt report")
        rows = json.loads((report_md.parent / "report.json").read_text()).get("variants", [])
        table = [
            {
                "variant": r["variant"],
                "role": r["role"],
                "AP50": r["ap50"]["mean"],
                "std": r["ap50"]["std"],
                "gap closure": (r.get("gap_closure") or {}).get("mean"),
            }
            for r in rows
        ]
        create_table_artifact(table, key="adapt-ap50", description="AP50 on target-test")
        for png in ("pr_curves.png", "predictions_grid.png"):
            if (report_md.parent / png).is_file():
                create_image_artifact(
                    (report_md.parent / png).resolve().as_uri(),
                    key=f"adapt-{png[:-4].replace('_', '-')}",
                    description=f"{png} of the adapt report",
                )
    except Exception as exc:  # artifacts are a convenience, never a failure
        _logger().warning("could not publish artifacts: %s", exc)


@flow(name="adapt", log_prints=True)
def adapt_flow(config: dict) -> str:
    """The whole adapt job; ``config`` is an :class:`AdaptConfig` document. Returns the report path."""
    cfg = build_config(config)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "config.yaml", dump_config(cfg))
    tiles = prepare_tiles_task(cfg, work)
    model = train_ldm_task(cfg, work, tiles)
    sets = synthesise(cfg, work, tiles, model)
    d = cfg.detection
    runs: dict[str, list[Path]] = {}
    plan = variants(cfg, tiles, {}, {})
    runs[SOURCE_ONLY] = [train_and_evaluate_task(cfg, work, tiles, plan[0], seed) for seed in d.seeds]
    labelled = annotate_task(cfg, work, tiles, sets, runs[SOURCE_ONLY][0], model)
    adapted_seeds = d.adapted_seeds if d.adapted_seeds is not None else d.seeds
    for variant in variants(cfg, tiles, labelled, sets)[1:]:
        seeds = d.seeds if variant.name == ORACLE else adapted_seeds
        runs[variant.name] = [train_and_evaluate_task(cfg, work, tiles, variant, seed) for seed in seeds]
    adapted = [v for v in variants(cfg, tiles, labelled, sets) if v.name not in (SOURCE_ONLY, ORACLE)]
    if d.best_variant_all_seeds and adapted:
        # protocol aerial-v1 point 8: the best variant is reported over all seeds (reporting only)
        best = max(adapted, key=lambda v: _mean_ap50(runs[v.name]))
        runs[best.name] = [train_and_evaluate_task(cfg, work, tiles, best, seed) for seed in d.seeds]
    report = report_task(cfg, work, tiles, runs)
    _publish_artifacts(report)
    return str(report)


def run_adapt(config: dict | AdaptConfig) -> Path:
    """Run the adapt flow with the task runner its config names (sequential or Dask)."""
    cfg = config if isinstance(config, AdaptConfig) else build_config(config)
    runner = task_runner(cfg.runner, cfg.dask_address, cfg.dask_workers)
    return Path(adapt_flow.with_options(task_runner=runner)(cfg.model_dump(mode="json")))
