"""Train an Ultralytics YOLO detector offline on aerosynth datasets.

The model is built from a model yaml that ultralytics ships (``"yolov8n.yaml"``: random
initialisation, nothing downloaded) or loaded from a local ``.pt`` the user gives. Training data
is one or several :class:`~aerosynth.detection.datasets.DatasetSpec` mixed into a symlinked YOLO view
(:func:`~aerosynth.detection.datasets.build_yolo_view`); the validation set (source-val or a synthetic set,
never target labels) is watched for early stopping and, with ``checkpoint="best"``, for the checkpoint.

Two recipes:

* ``recipe="aerosynth"``: our augmentation (:mod:`aerosynth.detection.augment`), ultralytics' built-ins
  switched off so nothing runs twice; AdamW, ``lr0`` honoured (:func:`aerosynth_optimizer`).
* ``recipe="reference"``: protocol aerial-v1 item 9, the recipe behind its reference figures:
  ultralytics' default augmentations (mosaic with ``close_mosaic=10``, HSV, horizontal flip, scale 0.5,
  translate 0.1), SGD lr0 0.01, momentum 0.937, weight decay 5e-4, nbs 64, 3 warm-up epochs.

The checkpoint rule is label-free and fixed: ``checkpoint="last"`` (the default) keeps the final
weights; ``"best"`` the epoch with the best validation fitness. On aerial-v1 best-on-source-val once
picked a 0.69 epoch over a final 0.83 on the target, so the default is the final epoch.

Offline: ultralytics is imported only after :func:`aerosynth.data.offline.apply_offline_settings`
(font from matplotlib, ``YOLO_OFFLINE``), ``amp=False`` skips the AMP check (it downloads a
checkpoint), a ``.pt`` name that is not a local file is refused instead of being fetched.

Training images listed in a dataset's ``image_level.json`` (a vehicle, box unknown) are trained by the
image-level loss of :mod:`aerosynth.detection.image_level` instead of as background.

Output folder::

    OUT/
      detector.pt        the final weights (``checkpoint="last"``) or the best by validation fitness
      detector.json      manifest: config, datasets and mix counts, GSD of the training data (when the
                         datasets declare one and agree), epochs, metrics, sha256, image-level images
      view/              the YOLO view (symlinks) trained on
      ultralytics/       ultralytics' own run folder (last.pt, results.csv)

:func:`write_portable_detector` writes the copy a run hands over: the same weights without the date, the
timings and the local paths ultralytics records in a checkpoint.
"""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from aerosynth.data.atomic import atomic_output_path, atomic_write_json
from aerosynth.data.errors import InputError
from aerosynth.data.manifest import file_sha256
from aerosynth.data.offline import apply_offline_settings
from aerosynth.detection.augment import AugmentConfig, ultralytics_augmentations, ultralytics_overrides
from aerosynth.detection.datasets import DatasetSpec, build_yolo_view, dataset_gsd

WEIGHTS_FILE = "detector.pt"
MANIFEST_FILE = "detector.json"
HEATMAP_DIR = "heatmaps"

#: What ultralytics writes into a checkpoint about the run that trained it rather than about its weights:
#: the hour, wall times, the repository's git state, and training arguments naming local files and folders.
_RUN_FIELDS = ("date", "train_results", "git")
_RUN_ARGS = ("model", "data", "project", "save_dir", "name")


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
        recipe: ``"aerosynth"`` (our augmentation) or ``"reference"`` (aerial-v1 item 9: ultralytics'
            default augmentations with mosaic, SGD).
        checkpoint: ``"last"`` keeps the final weights, ``"best"`` the best epoch on ``val``.
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
    recipe: Literal["aerosynth", "reference"] = "aerosynth"
    checkpoint: Literal["last", "best"] = "last"
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


#: Protocol aerial-v1 item 9: ultralytics' default augmentations and SGD (nbs 64: 2 batches of 32 per step).
REFERENCE_RECIPE = {
    "optimizer": "SGD",
    "lr0": 0.01,
    "momentum": 0.937,
    "weight_decay": 5e-4,
    "nbs": 64,
    "warmup_epochs": 3.0,
    "mosaic": 1.0,
    "close_mosaic": 10,
    "hsv_h": 0.015,
    "hsv_s": 0.7,
    "hsv_v": 0.4,
    "fliplr": 0.5,
    "flipud": 0.0,
    "scale": 0.5,
    "translate": 0.1,
    "degrees": 0.0,
    "shear": 0.0,
    "perspective": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "copy_paste": 0.0,
    "multi_scale": 0.0,
}


def aerosynth_optimizer(n_classes: int) -> dict:
    """The optimizer of the ``aerosynth`` recipe, named so that ultralytics honours ``lr0``.

    ultralytics' ``optimizer="auto"`` ignores ``lr0``: for short runs it builds AdamW at
    ``0.002 * 5 / (4 + nc)`` with betas (0.9, 0.999) and no bias warm-up. These are the same settings made
    explicit, so a run without ``lr0`` trains as before and one with ``lr0`` (``extra``, the fine-tuning's
    ``finetune.lr0``) gets it.
    """
    return {
        "optimizer": "AdamW",
        "lr0": round(0.002 * 5 / (4 + n_classes), 6),
        "momentum": 0.9,
        "warmup_bias_lr": 0.0,
    }


def train_args(config: DetectorTrainConfig, data_yaml: Path, project: Path) -> dict:
    """The ultralytics ``train()`` arguments for a config (offline; the config's recipe)."""
    if config.recipe not in ("aerosynth", "reference"):
        raise InputError("recipe", f"unknown detector recipe {config.recipe!r} (aerosynth or reference)")
    if config.checkpoint not in ("last", "best"):
        raise InputError("checkpoint", f"unknown checkpoint rule {config.checkpoint!r} (last or best)")
    recipe = (
        dict(REFERENCE_RECIPE)
        if config.recipe == "reference"
        else {
            "augmentations": ultralytics_augmentations(config.augment),
            **ultralytics_overrides(),
            **aerosynth_optimizer(len(config.class_names)),
        }
    )
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
        **recipe,
    }
    args.update(config.extra)
    return args


def train_detector(
    config: DetectorTrainConfig,
    train: Sequence[DatasetSpec],
    val: DatasetSpec,
    out_dir: str | Path,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> Path:
    """Train a detector and return the path of its weights (``OUT/detector.pt``).

    Args:
        config: model, epochs, image size, seed, early stopping, augmentation.
        train: training datasets (mixed by their ``fraction``).
        val: validation set for early stopping and checkpoint selection.
        out_dir: output folder (see the module docstring).
        on_epoch: called after each epoch's validation with ``(epoch, epochs, metrics)`` (epochs from 1;
            ``metrics`` as ultralytics names them, e.g. ``metrics/mAP50(B)``), for progress display.

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
    started = time.perf_counter()
    custom_trainer = {}
    if view.image_level:  # tiles that hold a vehicle with no box: the image-level loss, not "background"
        from aerosynth.detection.image_level import image_level_trainer

        custom_trainer = {"trainer": image_level_trainer(view.image_level)}
    if on_epoch is not None:
        model.add_callback(
            "on_fit_epoch_end",
            lambda trainer: on_epoch(
                int(trainer.epoch) + 1, int(trainer.epochs), {k: float(v) for k, v in (trainer.metrics or {}).items()}
            ),
        )
    model.train(**train_args(config, view.data_yaml, out_dir), **custom_trainer)
    wall = time.perf_counter() - started
    trainer = model.trainer
    chosen = Path(trainer.last)
    if config.checkpoint == "best" and Path(trainer.best).is_file():
        chosen = Path(trainer.best)
    weights = out_dir / WEIGHTS_FILE
    with atomic_output_path(weights, ".pt") as tmp:
        shutil.copyfile(chosen, tmp)
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
            "image_level_images": len(view.image_level),
            "gsd": gsds.pop() if len(gsds) == 1 else None,
            "val_count": view.val_count,
            "epochs_run": int(trainer.epoch) + 1,
            "train_images": sum(view.counts.values()),
            "wall_s": round(wall, 1),
            "images_per_s": round((int(trainer.epoch) + 1) * sum(view.counts.values()) / max(wall, 1e-9), 1),
            "checkpoint": config.checkpoint,
            "best_epoch": None if stopper is None else int(stopper.best_epoch),
            "best_fitness": None if trainer.best_fitness is None else float(trainer.best_fitness),
            "final_val_metrics": metrics,
            "ultralytics_version": _ultralytics_version(),
            "optimizer": _built_optimizer(trainer),
        },
    )
    return weights


def write_portable_detector(weights: str | Path, out: str | Path) -> Path:
    """Write a detector checkpoint that depends only on its weights and its recipe.

    ultralytics records in every checkpoint when it was written, how long each epoch took, the git state of
    the working folder and the paths of the model, data and output folders it trained with. The copy drops
    those (``date`` becomes ``None``; the training arguments keep their values, without paths), so two runs
    that trained the same weights hand over byte-identical files, and a file shared with others names no
    folder of the machine that trained it. ultralytics loads, predicts with and fine-tunes from the copy as
    from the original.

    Args:
        weights: an ultralytics detector checkpoint (``train_detector``'s ``detector.pt``).
        out: where to write the copy (atomically).

    Returns:
        ``out``.
    """
    import torch

    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    for name in _RUN_FIELDS:
        checkpoint.pop(name, None)
    checkpoint["date"] = None  # ultralytics' loaders expect the key
    model = checkpoint.get("model")
    if model is not None and hasattr(model, "pt_path"):  # the file ultralytics loaded it from, set again on load
        del model.pt_path
    for found in (checkpoint.get("train_args"), getattr(model, "args", None)):
        if isinstance(found, dict):
            for name in _RUN_ARGS:
                found.pop(name, None)
    buffer = io.BytesIO()  # saved to a file, torch names the archive's folder after the (temporary) file
    torch.save(checkpoint, buffer)
    out = Path(out)
    with atomic_output_path(out, ".pt") as tmp:
        tmp.write_bytes(buffer.getvalue())
    return out


def _built_optimizer(trainer) -> dict | None:
    """The optimizer ultralytics built (its class and the first group's initial learning rate)."""
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None or not optimizer.param_groups:
        return None
    group = optimizer.param_groups[0]
    return {"name": type(optimizer).__name__, "lr0": float(group.get("initial_lr", group["lr"]))}


def _ultralytics_version() -> str:
    import ultralytics

    return ultralytics.__version__
