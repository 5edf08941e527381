"""AGenDA's relay: labels for synthetic target images, passed on from real source labels.

1. **F_S**, a detector trained on the real labelled source tiles (early stopping on source-val).
2. Its confidence threshold ``tau_S`` is the one that maximises F1 on the real source-val
   split (computed, not a constant).
3. F_S predicts on the synthetic *source* RGB images; boxes at or above ``tau_S`` are the
   pseudo-labels of those images.
4. **F_A**, a detector trained on the synthetic source *heat-map stacks* with those
   pseudo-labels (a seeded part of the set held out for its early stopping).
5. ``lambda_high`` / ``lambda_low`` are chosen on that held-out synthetic source part:
   the lowest threshold where F_A's precision against the pseudo-labels is still
   ``precision_target`` and the highest where its recall reaches ``recall_target``.
6. F_A predicts on the synthetic *target* heat-map stacks; :mod:`aerosynth.annotation.refinement`
   keeps, refines or drops each box. Images generated without vehicles get no box.

No target label is read anywhere: the relay takes the labelled *source* splits and the
synthetic sets only, and refuses a split that is weak or that lives under an
``evaluation/`` folder. Every threshold, epoch and checkpoint is chosen on source or
synthetic data.

Output::

    OUT/
      dataset/      the labelled synthetic target set (:mod:`aerosynth.annotation.export` layout)
      relay.json    thresholds, F_S / F_A scores, refinement report, counts
      work/         F_S, F_A (``detector.pt`` + ultralytics runs), pseudo-labels, CNN weights

``dataset/`` and ``relay.json`` are deterministic for the same inputs and seeds (CPU);
``work/`` holds tool output with timestamps and is not.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aerosynth.annotation.export import export_dataset
from aerosynth.annotation.metrics import (
    f1_optimal_threshold,
    match_all,
    score_at,
    threshold_for_precision,
    threshold_for_recall,
)
from aerosynth.annotation.refinement import Candidate, RefinementConfig, refine
from aerosynth.annotation.synthetic_set import SyntheticSet, open_synthetic_set
from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.tileset import EVALUATION_DIR, LabelledTileSplit, open_split

RELAY_FILE = "relay.json"


@dataclass
class RelayConfig:
    """Options of the relay.

    Attributes:
        model: detector architecture (an ultralytics model yaml, built from scratch) or a local ``.pt``.
        source_epochs: most epochs of F_S.
        heatmap_epochs: most epochs of F_A.
        imgsz: detector image size.
        batch: detector batch size.
        patience: early-stopping patience of both detectors.
        seed: seed of every random choice.
        device: ``cpu`` or a CUDA device.
        augment: use the detection stage's default augmentations (off: none, e.g. for tiny tests).
        predict_conf: lowest confidence the detectors report.
        max_det: most boxes per image.
        match_iou: IoU of a match when scoring (F1, precision, recall).
        heatmap_val_fraction: share of the synthetic source set held out for F_A's
            early stopping and the choice of the lambdas.
        precision_target: ``lambda_high`` is the lowest threshold with this precision.
        recall_target: ``lambda_low`` is the highest threshold with this recall.
        lambda_high: a fixed value instead of the computed one.
        lambda_low: a fixed value instead of the computed one.
        max_boxes_per_image: most candidate boxes F_A may give one synthetic target image (highest
            confidence first); ``None``: the largest pseudo-label count of a synthetic source image.
        refinement: the refinement CNN options.
    """

    model: str = "yolov8n.yaml"
    source_epochs: int = 50
    heatmap_epochs: int = 50
    imgsz: int = 128
    batch: int = 16
    patience: int = 10
    seed: int = 0
    device: str = "cpu"
    augment: bool = True
    predict_conf: float = 0.001
    max_det: int = 100
    match_iou: float = 0.5
    heatmap_val_fraction: float = 0.2
    precision_target: float = 0.9
    recall_target: float = 0.9
    lambda_high: float | None = None
    lambda_low: float | None = None
    max_boxes_per_image: int | None = None
    refinement: RefinementConfig = field(default_factory=RefinementConfig)

    def validate(self) -> RelayConfig:
        checks = [
            ("source_epochs", self.source_epochs >= 1, ">= 1"),
            ("heatmap_epochs", self.heatmap_epochs >= 1, ">= 1"),
            ("heatmap_val_fraction", 0.0 < self.heatmap_val_fraction < 1.0, "in (0, 1)"),
            ("precision_target", 0.0 < self.precision_target <= 1.0, "in (0, 1]"),
            ("recall_target", 0.0 < self.recall_target <= 1.0, "in (0, 1]"),
            ("predict_conf", 0.0 <= self.predict_conf < 1.0, "in [0, 1)"),
            ("match_iou", 0.0 < self.match_iou <= 1.0, "in (0, 1]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"RelayConfig.{name}", f"got {getattr(self, name)!r}, expected {expected}")
        if self.lambda_low is not None and self.lambda_high is not None and self.lambda_low > self.lambda_high:
            raise InputError("RelayConfig.lambda_low", "above lambda_high")
        self.refinement.validate()
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["refinement"] = self.refinement.to_dict()
        return d


# ------------------------------------------------------------------------ input guards
def _under_evaluation(path: Path) -> bool:
    return EVALUATION_DIR in Path(os.path.abspath(path)).parts


def open_source_split(split_dir: str | Path, role: str) -> LabelledTileSplit:
    """A labelled *source* split; weak (target) splits and evaluation folders are refused.

    Raises:
        InputError: a weak split, a folder under ``evaluation/``, or not a split at all.
    """
    split_dir = Path(split_dir)
    if _under_evaluation(split_dir):
        raise InputError(split_dir, f"{role}: evaluation labels are not allowed in the relay")
    split = open_split(split_dir)
    if not isinstance(split, LabelledTileSplit):
        raise InputError(split_dir, f"{role}: a weak (target) split has no boxes; the relay needs labelled source")
    if _under_evaluation(split.labels_root):
        raise InputError(split_dir, f"{role}: evaluation labels are not allowed in the relay")
    return split


# ------------------------------------------------------------------------- detectors
def _train(config: RelayConfig, epochs: int, heatmap: bool, train_spec: dict, val_spec: dict, out_dir: Path) -> Path:
    """Train through the detection stage (imported lazily: annotation may import detection)."""
    from aerosynth.detection.augment import AugmentConfig
    from aerosynth.detection.datasets import DatasetSpec
    from aerosynth.detection.training import DetectorTrainConfig, train_detector

    augment = AugmentConfig(heatmap=heatmap) if config.augment else AugmentConfig.none(heatmap=heatmap)
    train_cfg = DetectorTrainConfig(
        model=config.model,
        epochs=epochs,
        imgsz=config.imgsz,
        batch=config.batch,
        seed=config.seed,
        patience=config.patience,
        augment=augment,
        device=config.device,
    )
    return train_detector(train_cfg, [DatasetSpec(**train_spec)], DatasetSpec(**val_spec), out_dir)


def _predict(config: RelayConfig, weights: Path, images: Sequence[Path]) -> list[Detections]:
    from aerosynth.detection.prediction import predict

    if not images:
        return []
    dets = predict(
        weights,
        list(images),
        conf=config.predict_conf,
        imgsz=config.imgsz,
        max_det=config.max_det,
        device=config.device,
    )
    # a fixed decimal precision: the same bytes downstream whatever the float noise of the last bit
    return [Detections(np.round(d.xyxy, 4), np.round(d.confidence, 6), d.class_id) for d in dets]


# --------------------------------------------------------------------------- helpers
def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # pragma: no cover - file systems without symlinks
        shutil.copyfile(src, dst)


def _write_heatmap_folder(
    folder: Path, sset: SyntheticSet, names: Sequence[str], labels: dict[str, Detections]
) -> None:
    """A folder F_A trains on: ``heatmaps/`` (links) and ``labels/`` (pseudo-labels)."""
    if folder.exists():
        shutil.rmtree(folder)
    size = sset.info.image_size
    for name in names:
        _link_or_copy(sset.heatmap_path(name), folder / "heatmaps" / f"{name}.png")
        atomic_write_text(folder / "labels" / f"{name}.txt", labels[name].to_yolo(size, size))


def _choose_lambdas(config: RelayConfig, preds: list[Detections], refs: list[Detections]) -> dict:
    """``lambda_high`` / ``lambda_low`` from F_A's held-out predictions against the pseudo-labels."""
    m = match_all(preds, refs, iou_threshold=config.match_iou)
    best = f1_optimal_threshold(m)
    high = config.lambda_high
    low = config.lambda_low
    how = {
        "lambda_high": "fixed" if high is not None else "precision_target",
        "lambda_low": "fixed" if low is not None else "recall_target",
    }
    if high is None:
        high = threshold_for_precision(m, config.precision_target)
        if high is None:  # precision target never met: the F1-optimal threshold
            high, how["lambda_high"] = best.threshold, "f1_optimal_fallback"
    if low is None:
        low = threshold_for_recall(m, config.recall_target)
        if low is None:  # recall target never met: every candidate is uncertain or better
            low, how["lambda_low"] = config.predict_conf, "predict_conf_fallback"
    if low > high:
        low, how["lambda_low"] = high, how["lambda_low"] + "_capped_at_high"
    return {
        "lambda_high": float(high),
        "lambda_low": float(low),
        "chosen_by": how,
        "held_out_images": len(preds),
        "held_out_pseudo_boxes": int(m.n_ground_truth),
        "f1_optimal": best.to_dict(),
        "score_at_lambda_high": score_at(m, high).to_dict(),
        "score_at_lambda_low": score_at(m, low).to_dict(),
    }


# ------------------------------------------------------------------------------ relay
def run_relay(
    source_train_split: str | Path,
    source_val_split: str | Path,
    synthetic_source_set: str | Path,
    synthetic_target_sets: Sequence[str | Path],
    out_dir: str | Path,
    config: RelayConfig | None = None,
    source_detector: str | Path | None = None,
) -> Path:
    """Label synthetic target sets with the AGenDA relay (steps in the module docstring).

    Args:
        source_train_split: the real labelled source training split (``ROOT/source-train``).
        source_val_split: the real labelled source validation split (``ROOT/source-val``).
        synthetic_source_set: a synthetic set in the source style, generated with vehicles.
        synthetic_target_sets: the synthetic target sets to label (with and without vehicles).
        out_dir: output folder (layout in the module docstring).
        config: detectors, thresholds and refinement options.
        source_detector: weights of a detector already trained on the real source labels (e.g.
            the run's source-only detector) to use as F_S instead of training one here.

    Returns:
        The labelled dataset folder, ``out_dir/dataset``.

    Raises:
        InputError: a weak or evaluation split, a source set generated without vehicles,
            no target set, two target sets of the same kind.
    """
    config = (config or RelayConfig()).validate()
    out_dir = Path(out_dir)
    source_train = open_source_split(source_train_split, "source_train_split")
    source_val = open_source_split(source_val_split, "source_val_split")
    source_set = open_synthetic_set(synthetic_source_set)
    if not source_set.with_vehicles:
        raise InputError(synthetic_source_set, "the synthetic source set must be generated with vehicles")
    if isinstance(synthetic_target_sets, (str, Path)):
        synthetic_target_sets = [synthetic_target_sets]
    target_sets = [open_synthetic_set(d) for d in synthetic_target_sets]
    if not target_sets:
        raise InputError("synthetic_target_sets", "no synthetic target set given")
    kinds = [s.name for s in target_sets]
    if len(set(kinds)) != len(kinds):
        raise InputError("synthetic_target_sets", f"two sets of the same kind: {kinds}")
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)

    # 1-2. F_S (trained here, or a given detector trained on real source labels) and its
    #      F1-optimal threshold on real source-val
    if source_detector is not None:
        fs_weights = Path(source_detector)
        if not fs_weights.is_file():
            raise InputError(source_detector, "source detector weights not found")
    else:
        fs_weights = _train(
            config,
            config.source_epochs,
            False,
            {"path": source_train.root, "missing_labels_are_empty": True},
            {"path": source_val.root, "missing_labels_are_empty": True},
            work / "fs",
        )
    val_ids = [t.tile_id for t in source_val.tiles]
    val_preds = _predict(config, fs_weights, [source_val.image_path(t) for t in val_ids])
    fs_match = match_all(
        val_preds,
        [source_val.labels(t) for t in val_ids],
        [source_val.ignore_regions(t) for t in val_ids],
        iou_threshold=config.match_iou,
    )
    fs_best = f1_optimal_threshold(fs_match)
    tau_s = fs_best.threshold

    # 3. pseudo-labels of the synthetic source images
    src_names = list(source_set.names)
    src_preds = _predict(config, fs_weights, [source_set.image_path(n) for n in src_names])
    pseudo = {n: d.filter_confidence(tau_s) for n, d in zip(src_names, src_preds, strict=True)}
    if not any(len(d) for d in pseudo.values()):
        raise InputError(
            synthetic_source_set,
            f"F_S found no vehicle at or above tau_S={tau_s:g} on the synthetic source set: "
            "nothing to train F_A on (train F_S longer or check the set)",
        )
    size = source_set.info.image_size
    for n in src_names:
        atomic_write_text(work / "pseudo_labels" / f"{n}.txt", pseudo[n].to_yolo(size, size, with_confidence=True))

    # 4. F_A on the synthetic source heat maps (seeded hold-out for early stopping and lambdas)
    rng = np.random.default_rng(config.seed)
    n_val = min(max(1, int(round(len(src_names) * config.heatmap_val_fraction))), max(len(src_names) - 1, 1))
    val_pick = set(rng.choice(len(src_names), size=n_val, replace=False).tolist())
    fa_val_names = [n for i, n in enumerate(src_names) if i in val_pick]
    fa_train_names = [n for i, n in enumerate(src_names) if i not in val_pick] or fa_val_names
    _write_heatmap_folder(work / "fa_train", source_set, fa_train_names, pseudo)
    _write_heatmap_folder(work / "fa_val", source_set, fa_val_names, pseudo)
    fa_weights = _train(
        config,
        config.heatmap_epochs,
        True,
        {"path": work / "fa_train", "image_dir": "heatmaps", "missing_labels_are_empty": True},
        {"path": work / "fa_val", "image_dir": "heatmaps", "missing_labels_are_empty": True},
        work / "fa",
    )

    # 5. lambdas on the held-out synthetic source part
    fa_val_preds = _predict(config, fa_weights, [source_set.heatmap_path(n) for n in fa_val_names])
    lambdas = _choose_lambdas(config, fa_val_preds, [pseudo[n] for n in fa_val_names])

    # 6. F_A on the synthetic target heat maps, then refinement. An image keeps at most as many
    #    candidates as the busiest synthetic source image had pseudo-labels (a weak F_A otherwise
    #    floods every image with max_det boxes, which poisons the final detector).
    cap = config.max_boxes_per_image or max(1, max(len(d) for d in pseudo.values()))
    capped = 0
    candidates: list[Candidate] = []
    for sset in target_sets:
        preds = _predict(config, fa_weights, [sset.heatmap_path(n) for n in sset.names])
        for n, d in zip(sset.names, preds, strict=True):
            if len(d) > cap:
                capped += len(d) - cap
                d = d[np.sort(np.argsort(-d.confidence, kind="stable")[:cap])]
            candidates.append(
                Candidate(
                    f"{sset.name}_{n}", sset.image_path(n), sset.heatmap_path(n), d, sset.with_vehicles, sset.name
                )
            )
    items, refine_report = refine(
        candidates,
        lambdas["lambda_low"],
        lambdas["lambda_high"],
        config.refinement,
        checkpoint=work / "refinement_cnn.pt",
    )

    inputs = [
        {"role": "source_train", "path": str(source_train.root.resolve()), "tiles": len(source_train)},
        {"role": "source_val", "path": str(source_val.root.resolve()), "tiles": len(source_val)},
        {"role": "synthetic_source", **source_set.fingerprint()},
        *({"role": "synthetic_target", **s.fingerprint()} for s in target_sets),
    ]
    relay_summary = {
        "tau_source": float(tau_s),
        "source_val_at_tau": fs_best.to_dict(),
        "pseudo_labels": {
            "images": len(src_names),
            "boxes": int(sum(len(d) for d in pseudo.values())),
            "heatmap_train_images": len(fa_train_names),
            "heatmap_val_images": len(fa_val_names),
        },
        "lambdas": lambdas,
        "max_boxes_per_image": cap,
        "capped_candidates": capped,
        "refinement": refine_report,
    }
    dataset = export_dataset(
        items,
        out_dir / "dataset",
        gsd=target_sets[0].info.gsd,
        method="relay",
        inputs=inputs,
        settings={"relay": config.to_dict()},
        extra_summary={
            "tau_source": float(tau_s),
            "lambda_high": lambdas["lambda_high"],
            "lambda_low": lambdas["lambda_low"],
            "refinement_decision": refine_report["decision"],
        },
    )
    atomic_write_json(
        out_dir / RELAY_FILE,
        {
            **relay_summary,
            "config": config.to_dict(),
            "inputs": inputs,
            "dataset": "dataset",
            "work": {
                "source_detector": "work/fs/detector.pt" if source_detector is None else str(source_detector),
                "heatmap_detector": "work/fa/detector.pt",
                "refinement_cnn": "work/refinement_cnn.pt",
            },
        },
    )
    return dataset
