"""Train an Ultralytics YOLO detector offline on aerosynth datasets.

The model is built from a model yaml that ultralytics ships (``"yolov8n.yaml"``: random
initialisation, nothing downloaded) or loaded from a local ``.pt`` the user gives. Training data
is one or several :class:`~aerosynth.detection.datasets.DatasetSpec` mixed into a symlinked YOLO view
(:func:`~aerosynth.detection.datasets.build_yolo_view`); early stopping watches the given validation set
(source-val or a synthetic set, never target labels). Augmentation is ours
(:mod:`aerosynth.detection.augment`); ultralytics' built-ins are switched off so nothing runs twice.

Offline: ultralytics is imported only after :func:`aerosynth.data.offline.apply_offline_settings`
(font from matplotlib, ``YOLO_OFFLINE``), ``amp=False`` skips the AMP check (it downloads a
checkpoint), a ``.pt`` name that is not a local file is refused instead of being fetched.

Output folder::

    OUT/
      detector.pt        the best checkpoint (by validation fitness), copied atomically
      detector.json      manifest: config, datasets and mix counts, GSD of the training data (when the
                         datasets declare one and agree), epochs, metrics, sha256
      view/              the YOLO view (symlinks) trained on
      ultralytics/       ultralytics' own run folder (last.pt, results.csv)
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aerosynth.data.atomic import atomic_output_path, atomic_write_json
from aerosynth.data.errors import InputError
from aerosynth.data.manifest import file_sha256
from aerosynth.data.offline import apply_offline_settings
from aerosynth.detection.augment import AugmentConfig, ultralytics_augmentations, ultralytics_overrides
from aerosynth.detection.datasets import DatasetSpec, build_yolo_view, dataset_gsd

WEIGHTS_FILE = "detector.pt"
MANIFEST_FILE = "detector.json"
HEATMAP_DIR = "heatmaps"


@dataclass
class DetectorTrainConfig:
    """How to train one detector.

    Attributes:
        model: a model yaml shipped with ultralytics (``"yolov8n.yaml"``), a local yaml, or a local ``.pt``.
        epochs: maximum number of epochs.
        imgsz: training image size (tiles are 128 px).
        batch: batch size.
        seed: seed of the data mix, the initialisation and the augmentation.
        patience: stop after this many epochs without a better validation fitness.
        augment: augmentations (``heatmap=True`` for heat-map images: geometric only).
        mix_total: size of the mixed training set when the datasets give fractions.
        device: ``"cpu"`` or a CUDA device such as ``"0"``.
        workers: data-loader workers.
        class_names: class names (aerial-v1: one class, ``vehicle``).
        plots: let ultralytics draw its plots (off for tests; it needs a font).
        extra: further ultralytics train arguments (e.g. ``{"lr0": 0.005}``); they win over ours.
    """

    model: str = "yolov8n.yaml"
    epochs: int = 50
    imgsz: int = 128
    batch: int = 16
    seed: int = 0
    patience: int = 10
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mix_total: int | None = None
    device: str = "cpu"
    workers: int = 0
    class_names: tuple[str, ...] = ("vehicle",)
    plots: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        d["class_names"] = list(self.class_names)
        return d


def _shipped_model_yaml(name: str) -> bool:
    """Whether ultralytics ships a model yaml of this name (``yolov8n.yaml`` -> ``yolov8.yaml``)."""
    from ultralytics.utils import ROOT

    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", Path(name).stem) + ".yaml"
    models = ROOT / "cfg" / "models"
    return any(models.rglob(Path(name).name)) or any(models.rglob(unified))


def resolve_model(model: str) -> str:
    """Check that a model can be built or loaded without any download.

    Raises:
        InputError: a ``.pt`` that is not a local file, an unknown yaml, another suffix.
    """
    path = Path(model)
    if path.suffix == ".pt":
        if not path.is_file():
            raise InputError(f"model={model}", "weights file not found (nothing is downloaded; give a local .pt)")
        return str(path.resolve())
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return str(path.resolve())
        if path.parent == Path(".") and _shipped_model_yaml(model):
            return model
        raise InputError(f"model={model}", "model yaml neither a local file nor shipped with ultralytics")
    raise InputError(f"model={model}", "expected a model .yaml or a local .pt")


def _check_datasets(config: DetectorTrainConfig, train: Sequence[DatasetSpec], val: DatasetSpec) -> None:
    for spec in [*train, val]:
        if spec.image_dir == HEATMAP_DIR and not config.augment.heatmap:
            raise InputError(f"{spec.path}:image_dir", "heat-map images need AugmentConfig(heatmap=True)")
        if spec.labels_dir is not None and "evaluation" in Path(spec.labels_dir).resolve().parts and spec is val:
            raise InputError(f"{spec.path}:labels_dir", "early stopping on target evaluation labels is not allowed")


def train_args(config: DetectorTrainConfig, data_yaml: Path, project: Path) -> dict:
    """The ultralytics ``train()`` arguments for a config (offline, our augmentations)."""
    args = {
        "data": str(data_yaml),
        "epochs": config.epochs,
        "imgsz": config.imgsz,
        "batch": config.batch,
        "seed": config.seed,
        "deterministic": True,
        "patience": config.patience,
        "device": config.device,
        "workers": config.workers,
        "amp": False,  # the AMP check downloads a checkpoint
        "plots": config.plots,
        "val": True,
        "project": str(project.resolve()),
        "name": "ultralytics",
        "exist_ok": True,
        "verbose": False,
        "cache": False,
        "augmentations": ultralytics_augmentations(config.augment),
        **ultralytics_overrides(),
    }
    args.update(config.extra)
    return args


def train_detector(
    config: DetectorTrainConfig, train: Sequence[DatasetSpec], val: DatasetSpec, out_dir: str | Path
) -> Path:
    """Train a detector and return the path of its weights (``OUT/detector.pt``).

    Args:
        config: model, epochs, image size, seed, early stopping, augmentation.
        train: training datasets (mixed by their ``fraction``).
        val: validation set for early stopping and checkpoint selection.
        out_dir: output folder (see the module docstring).

    Raises:
        InputError: an unusable model name or dataset.
    """
    apply_offline_settings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_ref = resolve_model(config.model)
    _check_datasets(config, train, val)
    view = build_yolo_view(out_dir / "view", train, val, config.seed, config.mix_total, config.class_names)

    from ultralytics import YOLO

    model = YOLO(model_ref)
    model.train(**train_args(config, view.data_yaml, out_dir))
    trainer = model.trainer
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    weights = out_dir / WEIGHTS_FILE
    with atomic_output_path(weights, ".pt") as tmp:
        shutil.copyfile(best, tmp)
    stopper = getattr(trainer, "stopper", None)
    gsds = {g for g in (dataset_gsd(s) for s in train) if g is not None}
    metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
    atomic_write_json(
        out_dir / MANIFEST_FILE,
        {
            "weights": WEIGHTS_FILE,
            "sha256": file_sha256(weights),
            "model": config.model,
            "config": config.to_dict(),
            "train": [s.to_dict() for s in train],
            "val": val.to_dict(),
            "mix_counts": view.counts,
            "gsd": gsds.pop() if len(gsds) == 1 else None,
            "val_count": view.val_count,
            "epochs_run": int(trainer.epoch) + 1,
            "best_epoch": None if stopper is None else int(stopper.best_epoch),
            "best_fitness": None if trainer.best_fitness is None else float(trainer.best_fitness),
            "final_val_metrics": metrics,
            "ultralytics_version": _ultralytics_version(),
        },
    )
    return weights


def _ultralytics_version() -> str:
    import ultralytics

    return ultralytics.__version__
