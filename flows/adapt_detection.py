"""Adapt step ``detectors/``: the detector variants of a run, each trained and evaluated on target-test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aerosynth.data.atomic import atomic_write_json
from aerosynth.flows.adapt_common import ORACLE, SOURCE_ONLY, _key_path, _logger, _val_split
from aerosynth.flows.config import AdaptConfig
from aerosynth.flows.stage_cache import run_stage


@dataclass
class Variant:
    """One detector recipe: its training datasets and the stage folders they come from."""

    name: str
    train: list[Any]
    upstream: dict[str, Path]


def variants(config: AdaptConfig, tiles: Path, labelled: dict[str, Path], sets: dict[str, Path]) -> list[Variant]:
    """Source-only, every adapted dataset mixed with the real source tiles (``<name>+source``), the oracle.

    Every adapted variant stands on the same footing: its target data (a labelled synthetic set, the
    translated source tiles or the labelled real target tiles) makes up ``1 - mix_source_fraction`` of
    its training images, real source tiles the rest.
    """
    from aerosynth.detection.datasets import DatasetSpec

    d = config.detection
    whole = 1.0 if d.max_train_images else None  # with a cap, every variant sees the same number of images
    source = DatasetSpec(tiles / "source-train", name="source", fraction=whole)
    out = [Variant(SOURCE_ONLY, [source], {"tiles": tiles})]
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
        out.append(Variant(f"{name}+source", mix, {"tiles": tiles, name: stage}))
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
