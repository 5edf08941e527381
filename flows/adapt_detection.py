"""Adapt step ``detectors/``: the detector variants of a run, each trained and evaluated on target-test.

In the paired design (``detection.design: paired``, the default) the source-only detector F_S of each seed
is trained first with the reference settings; every other variant of that seed fine-tunes from it for one
shared budget (``detection.finetune``), so variants of a seed differ by their data only. The ``continued``
control is the same fine-tuning on source tiles only: what the extra budget alone gives.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.errors import InputError
from aerosynth.data.manifest import file_sha256
from aerosynth.data.prepare import HOLDOUT_SPLIT
from aerosynth.data.tileset import TILES_FILE
from aerosynth.flows import progress
from aerosynth.flows.adapt_common import (
    CONTINUED,
    ORACLE,
    ORACLE_PAIRED,
    SOURCE_ONLY,
    _key_path,
    _logger,
    _repo_relative,
    _val_split,
)
from aerosynth.flows.adapt_tiles import target_has_boxes
from aerosynth.flows.config import AdaptConfig
from aerosynth.flows.stage_cache import run_stage, stage_record

#: What each variant's target data is, as the benchmark files name it.
SYNTHETIC_SETS = ("relay", "threshold", "translation", "copy-paste-harmonised", "copy-paste-blended")
#: Target data made without the LDM and without labelling a real target tile: the plain baselines.
BASELINE_SETS = ("copy-paste",)


#: The suffix a mix with a budget of its own carries: ``<...>+source-<images>img``.
MIX_BUDGET_SUFFIX = re.compile(r"-\d+img$")


def variant_kind(name: str) -> str:
    """``source-only``, ``control``, ``baseline``, ``real``, ``synthetic``, ``real+synthetic`` or ``oracle``."""
    if name in (SOURCE_ONLY, ORACLE):
        return name
    if name == ORACLE_PAIRED:
        return ORACLE
    if name == CONTINUED:
        return "control"
    name = MIX_BUDGET_SUFFIX.sub("", name)
    if name.removesuffix("+source") in BASELINE_SETS:
        return "baseline"
    parts = [p.split("@")[0] for p in name.removesuffix("+source").split("+")]  # a mix's share: <set>@<percent>
    real = any(p.startswith("real-") for p in parts)
    synthetic = any(p in SYNTHETIC_SETS for p in parts)
    return "real+synthetic" if real and synthetic else "real" if real else "synthetic"


@dataclass
class Variant:
    """One detector recipe: its training datasets and the stage folders they come from.

    ``finetune``: trained from the seed's source-only detector (paired design) rather than from scratch.
    ``images``: its fine-tuning budget when not ``detection.finetune.images`` (a mix's own budget, the full
    oracle's); ``epochs``: its fine-tuning epochs when not ``detection.finetune.epochs`` (the full oracle's).
    """

    name: str
    train: list[Any]
    upstream: dict[str, Path]
    finetune: bool = False
    images: int | None = None
    epochs: int | None = None

    @property
    def kind(self) -> str:
        return variant_kind(self.name)


def variants(config: AdaptConfig, tiles: Path, labelled: dict[str, Path], sets: dict[str, Path]) -> list[Variant]:
    """Source-only, the continued control, every adapted dataset mixed with real source (``<name>+source``), oracle.

    Every adapted variant stands on the same footing: its target data (a labelled synthetic set, the
    translated source tiles or the labelled real target tiles) makes up ``1 - mix_source_fraction`` of
    its training images, real source tiles the rest. In the paired design the oracle is mixed the same way
    and every variant but source-only fine-tunes from F_S.
    """
    from aerosynth.detection.datasets import DatasetSpec

    d = config.detection
    paired = d.design == "paired"
    whole = 1.0 if d.max_train_images else None  # with a cap, every variant sees the same number of images
    source = DatasetSpec(tiles / "source-train", name="source", fraction=whole)
    out = [Variant(SOURCE_ONLY, [source], {"tiles": tiles})]
    if paired and d.continued:
        out.append(
            Variant(
                CONTINUED, [DatasetSpec(tiles / "source-train", name="source", fraction=1.0)], {"tiles": tiles}, True
            )
        )
    adapted = dict(labelled)
    if "translation" in sets:
        adapted["translation"] = sets["translation"]
    f = d.mix_source_fraction
    for name, dataset in adapted.items():
        mix = [
            DatasetSpec(dataset, name=name, fraction=1 - f),
            DatasetSpec(tiles / "source-train", name="source", fraction=f),
        ]
        stage = dataset if name == "translation" else dataset.parent  # a synthetic set is its own stage folder
        out.append(Variant(f"{name}+source", mix, {"tiles": tiles, name: stage}, paired))
    if d.oracle or (paired and d.oracle_paired):
        truth = tiles / "evaluation" / "target-train" / "labels"
        if paired:
            oracle = [
                DatasetSpec(tiles / "target-train", labels_dir=truth, name="oracle", fraction=1 - f),
                DatasetSpec(tiles / "source-train", name="source", fraction=f),
            ]
            if d.oracle:  # its budget (oracle_budget) is counted from the tiles when it trains
                out.append(Variant(ORACLE, oracle, {"tiles": tiles}, True))
            if d.oracle_paired:
                out.append(Variant(ORACLE_PAIRED, oracle, {"tiles": tiles}, True))
        else:
            oracle = [DatasetSpec(tiles / "target-train", labels_dir=truth, name="oracle", fraction=whole)]
            out.append(Variant(ORACLE, oracle, {"tiles": tiles}, False))
    return out


def oracle_budget(config: AdaptConfig, tiles: Path) -> tuple[int, int]:
    """The full oracle's fine-tuning ``(images per epoch, epochs)``: a ceiling, not one more variant.

    Every target-train tile is in each epoch (its target share, ``1 - mix_source_fraction``, holds them all,
    real source tiles the rest, as for every variant), and its images over all epochs are at least what the
    handed-over recipe spent over all its rounds: ``rounds x finetune.epochs x`` the recipe's images per
    epoch (``real-heatmap-r3+source``: three fine-tunes), times ``detection.oracle_budget`` (at least 1).
    The capped oracle, one fine-tune's budget on a draw of the tiles, is ``oracle-paired``
    (``detection.oracle_paired``).
    """
    from aerosynth.data.tileset import read_tiles_file
    from aerosynth.flows.adapt_tiles import recipe

    d, ft = config.detection, config.detection.finetune
    handed_over = recipe(config) or ""
    rounds = int(m.group(1)) if (m := re.search(r"-r(\d+)(?:\+|$)", handed_over)) else 1
    own = re.search(r"-(\d+)img$", handed_over)
    recipe_images = int(own.group(1)) if own else ft.images
    target_tiles = len(read_tiles_file(tiles / "target-train")[1])
    images = max(ft.images, math.ceil(target_tiles / (1 - d.mix_source_fraction)))
    epochs = math.ceil(d.oracle_budget * rounds * ft.epochs * recipe_images / images)
    return images, epochs


def mixed_variant(
    config: AdaptConfig,
    tiles: Path,
    datasets: dict[str, Path],
    shares: dict[str, float] | None = None,
    images: int | None = None,
) -> Variant:
    """A variant trained on several labelled sets at once (``detection.mixes``), fine-tuned from F_S (paired).

    Without ``shares`` each set is an equal share of the target part, real source tiles the rest
    (``mix_source_fraction``), named ``<set>+<set>+source``; with ``shares`` (each set's fraction of all
    training images) source tiles take the rest, named ``<set>@<percent>+...+source``. ``images``: the
    mix's own fine-tuning budget (``-<images>img`` joins the name) instead of ``detection.finetune.images``.
    """
    from aerosynth.detection.datasets import DatasetSpec

    if shares is None:
        f = config.detection.mix_source_fraction
        share = {n: (1 - f) / len(datasets) for n in datasets}
        name = "+".join(datasets)
    else:
        share = {n: float(shares[n]) for n in datasets}
        f = 1.0 - sum(share.values())
        name = "+".join(f"{n}@{round(100 * share[n]):d}" for n in datasets)
    train = [DatasetSpec(path, name=n, fraction=share[n]) for n, path in datasets.items()]
    train.append(DatasetSpec(tiles / "source-train", name="source", fraction=f))
    upstream = {"tiles": tiles, **{n: (p if n == "translation" else p.parent) for n, p in datasets.items()}}
    name += "+source" + (f"-{images}img" if images else "")
    return Variant(name, train, upstream, config.detection.design == "paired", images)


def detector_config(config: AdaptConfig, variant: Variant, seed: int, base: Path | None):
    """The :class:`~aerosynth.detection.training.DetectorTrainConfig` of one variant and seed.

    ``base``: the seed's source-only stage folder, which a fine-tuned variant starts from.
    """
    from aerosynth.detection.augment import AugmentConfig
    from aerosynth.detection.training import DetectorTrainConfig

    d = config.detection
    augment = AugmentConfig() if d.augment else AugmentConfig.none()
    common = {
        "imgsz": d.imgsz,
        "batch": d.batch,
        "seed": seed,
        "patience": d.patience,
        "augment": augment,
        "device": config.device,
        "recipe": d.recipe,
        "checkpoint": d.checkpoint,
    }
    if not variant.finetune:
        mix_total = d.max_train_images if any(s.fraction for s in variant.train) else None
        return DetectorTrainConfig(model=d.model, epochs=d.epochs, mix_total=mix_total, **common)
    if base is None:
        raise ValueError(f"{variant.name} fine-tunes from the source-only detector of seed {seed}: none given")
    ft = d.finetune
    images, epochs = variant.images, variant.epochs
    if variant.name == ORACLE:
        images, epochs = oracle_budget(config, variant.upstream["tiles"])
    return DetectorTrainConfig(
        model=str(Path(base) / "train" / "detector.pt"),
        epochs=epochs or ft.epochs,
        mix_total=images or ft.images,
        extra={"lr0": ft.lr0, "warmup_epochs": ft.warmup_epochs, "close_mosaic": ft.close_mosaic},
        **common,
    )


def train_and_evaluate(
    config: AdaptConfig, work: Path, tiles: Path, variant: Variant, seed: int, base: Path | None = None
) -> Path:
    """Train one detector, score it, write ``metrics.json`` and its predictions.

    Where the target has boxes: AP50 on target-test (``metrics.json``, ``predictions.json``). Where the tiles
    hold a ``target-holdout`` split (``data.flags_holdout``): its flag-level figures
    (:func:`aerosynth.detection.flag_scores.flag_scores`) under ``flag_scores`` and its predictions in
    ``predictions_holdout.json``; ``metrics.json``'s ``figures`` says which it holds (``ap50``, ``flags``,
    ``ap50+flags``; absent: ``ap50``).

    ``base`` is the seed's source-only stage folder (required for a fine-tuned variant). The detector
    runs on ``detection.threads`` torch threads, whatever the runner, so that a run gives the same bytes
    on Dask workers as in one process.
    """
    import torch

    from aerosynth.data.tileset import open_evaluation_split, open_split
    from aerosynth.detection.evaluation import evaluate_split
    from aerosynth.detection.prediction import predict
    from aerosynth.detection.training import train_detector

    d = config.detection
    dcfg = detector_config(config, variant, seed, base)
    boxes = target_has_boxes(tiles)
    holdout = open_split(tiles / HOLDOUT_SPLIT) if (tiles / HOLDOUT_SPLIT / TILES_FILE).is_file() else None
    if not boxes and holdout is None and config.data.flags != "none":
        raise InputError(
            "config.data.flags_holdout",
            "the target has no boxes and no flags are held out: nothing to score detectors on (set it above 0)",
        )
    reused = _reference_detector(config, variant, seed, dcfg) if variant.name == SOURCE_ONLY else None

    def build(out: Path) -> None:
        from aerosynth.detection.datasets import DatasetSpec

        threads = torch.get_num_threads()
        torch.set_num_threads(d.threads)
        try:
            if reused is not None:  # the reference F_S of an earlier run, trained with these settings
                _logger().info("%s seed %d: reusing %s", variant.name, seed, reused)
                shutil.copytree(reused / "train", out / "train", dirs_exist_ok=True)
                weights = out / "train" / "detector.pt"
            else:
                weights = train_detector(
                    dcfg, variant.train, DatasetSpec(_val_split(tiles), name="val"), out / "train", _epoch_progress
                )
            test = open_evaluation_split(tiles, "target-test") if boxes else None
            scored = [s for s in (test, holdout) if s is not None]
            preds = {
                s.name: predict(
                    weights,
                    [s.image_path(t.tile_id) for t in s],
                    conf=0.001,
                    imgsz=d.imgsz,
                    max_det=100,
                    device=config.device,
                )
                for s in scored
            }
        finally:
            torch.set_num_threads(threads)
        metrics: dict[str, Any] = evaluate_split(test, preds[test.name]).to_dict() if test is not None else {}
        if test is None and holdout is None:  # data.flags none on a target without boxes: nothing to score on
            metrics["figures"] = "none"
        if holdout is not None:
            metrics["figures"] = "ap50+flags" if test is not None else "flags"
            metrics["flag_scores"] = holdout_figures(holdout, preds[holdout.name])
        if variant.name == SOURCE_ONLY:
            atomic_write_json(out / "reference_key.json", reference_key(tiles, seed, dcfg))
        atomic_write_json(out / "metrics.json", metrics)
        for s in scored:
            atomic_write_json(
                out / ("predictions.json" if s is test else HOLDOUT_PREDICTIONS),
                {t.tile_id: p.to_coco(i) for i, (t, p) in enumerate(zip(s.tiles, preds[s.name], strict=True))},
            )

    settings = _settings(work, variant, seed, dcfg)
    upstream = dict(variant.upstream)
    if variant.finetune:
        upstream["source_only"] = Path(base)
    out, _ = run_stage(
        f"detectors/{variant.name}/seed{seed}",
        work / "detectors" / variant.name / f"seed{seed}",
        settings,
        upstream,
        build,
        _logger(),
        headline=ap50_headline,
    )
    return out


def _epoch_progress(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    """A detector's epoch on its terminal line, with the validation mAP50 (source-val: no target label)."""
    val = metrics.get("metrics/mAP50(B)")
    progress.advance(epoch, epochs, None if val is None else f"val mAP50 {val:.3f}", unit="epoch")


def ap50_headline(out: Path) -> str:
    """A detector stage's headline: its AP50 on target-test, else its tile-level AP on held-out flags."""
    metrics = json.loads((out / "metrics.json").read_text())
    if "ap50" in metrics:
        return f"AP50 {metrics['ap50']:.3f}"
    if "flag_scores" not in metrics:
        return "not scored (no target boxes, no flags)"
    tile_ap = metrics["flag_scores"]["tile_ap"]
    return "tile AP n/a" if tile_ap is None else f"tile AP {tile_ap:.3f}"


#: A detector stage's predictions on the held-out flagged tiles (``target-holdout``).
HOLDOUT_PREDICTIONS = "predictions_holdout.json"


def holdout_figures(split, predictions: list) -> dict[str, Any]:
    """The flag-level figures of one detector's ``predictions`` on the held-out weak ``split``.

    :func:`aerosynth.detection.flag_scores.flag_scores` as a dict; where the held-out tiles are of one kind
    only, the figures are ``None`` and ``note`` says why.
    """
    from aerosynth.detection.flag_scores import FlagScores, flag_scores

    by_tile = {t.tile_id: p for t, p in zip(split.tiles, predictions, strict=True)}
    flags = {t.tile_id: t.has_vehicle for t in split.tiles}
    try:
        return flag_scores(by_tile, flags).to_dict()
    except InputError as exc:
        empty = FlagScores(0.0, 0.0, len(flags), sum(flags.values()), 0.0, 0.25).to_dict()
        return {**empty, "tile_ap": None, "auroc": None, "vehicles_per_tile": None, "note": exc.problem}


def _settings(work: Path, variant: Variant, seed: int, dcfg) -> dict:
    train = [
        s.to_dict() | {"path": _key_path(s.path, work), "labels_dir": _key_path(s.labels_dir, work)}
        for s in variant.train
    ]
    doc = {"variant": variant.name, "train": train, "seed": seed, **dcfg.to_dict()}
    if variant.finetune:
        doc["model"] = "source-only detector of this seed"  # its content joins the key through upstream
    elif str(doc.get("model", "")).endswith(".pt") and Path(doc["model"]).is_file():
        doc["model_sha256"] = file_sha256(doc["model"])  # a start checkpoint rewritten in place retrains F_S
    return doc


def reference_key(tiles: Path, seed: int, dcfg) -> dict:
    """What a source-only detector is trained from: the source splits' content and its settings."""
    manifest = json.loads((tiles / "manifest.json").read_text())
    splits = {
        k: manifest["splits"][k].get("content_sha256")
        for k in ("source-train", "source-val")
        if k in manifest["splits"]
    }
    settings = {k: v for k, v in dcfg.to_dict().items() if k != "device"}
    if str(settings.get("model", "")).endswith(".pt") and Path(settings["model"]).is_file():
        settings["model_sha256"] = file_sha256(settings["model"])  # the start checkpoint's content, not its path
    # as it reads back from reference_key.json (tuples become lists)
    return json.loads(json.dumps({"source_splits": splits, "seed": seed, "settings": settings}))


def _reference_detector(config: AdaptConfig, variant: Variant, seed: int, dcfg) -> Path | None:
    """The source-only stage folder of ``detection.reference_from`` trained exactly as this run's would be."""
    other = config.detection.reference_from
    if other is None:
        return None
    folder = _repo_relative(Path(other)) / "detectors" / SOURCE_ONLY / f"seed{seed}"
    tiles = variant.upstream["tiles"]
    mine = reference_key(tiles, seed, dcfg)
    if stage_record(folder) is None or not (folder / "train" / "detector.pt").is_file():
        _logger().info("detection.reference_from: no finished source-only seed %d in %s; training it here", seed, other)
        return None
    theirs_file = folder / "reference_key.json"
    theirs = json.loads(theirs_file.read_text()) if theirs_file.is_file() else None
    if theirs != mine:
        _logger().info(
            "detection.reference_from: %s was trained from other source tiles or settings; training here", folder
        )
        return None
    return folder


def deliver_detector(config: AdaptConfig, work: Path, runs: dict[str, list[Path]]) -> Path | None:
    """Write the recommended detector as ``WORK/detector.pt`` with ``WORK/detector.json`` (its provenance).

    The variant is the first of ``detection.recommend`` this run built, else source-only; its first seed's
    detector is taken. Nothing about target labels enters the choice. The file is a portable copy
    (:func:`~aerosynth.detection.training.write_portable_detector`): the same inputs give the same bytes.
    """
    from aerosynth.detection.training import write_portable_detector

    d = config.detection
    order = [v for v in d.recommend if runs.get(v)]
    name = order[0] if order else SOURCE_ONLY
    if not runs.get(name):
        return None
    folder = runs[name][0]
    weights = folder / "train" / "detector.pt"
    how = (
        f"the first of detection.recommend (recommend_order) built by this run, seed {d.seeds[0]}: an order fixed "
        "before the run, no target label read"
        if order
        else "no variant of detection.recommend was built: the source-only detector"
    )
    trained = (
        json.loads((weights.parent / "detector.json").read_text())
        if (weights.parent / "detector.json").is_file()
        else {}
    )
    metrics = json.loads((folder / "metrics.json").read_text())
    doc = {
        "variant": name,
        "kind": variant_kind(name),
        "seed": int(folder.name.removeprefix("seed")),
        "how_chosen": how,
        "recommend_order": list(d.recommend),
        "from": _key_path(weights, work),
        "trained_sha256": file_sha256(weights),
        "imgsz": d.imgsz,
        "gsd_m": trained.get("gsd"),
        "training": trained.get("config"),
        "target_test_ap50": metrics.get("ap50"),
    }
    if "flag_scores" in metrics:
        doc["holdout_tile_ap"] = metrics["flag_scores"]["tile_ap"]
    write_portable_detector(weights, work / "detector.pt")  # the weights, without this machine's paths and hour
    doc["sha256"] = file_sha256(work / "detector.pt")
    atomic_write_json(work / "detector.json", doc)
    return work / "detector.pt"
