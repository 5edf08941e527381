"""Training data for the detectors: which folders, how they are mixed, the YOLO view ultralytics reads.

A :class:`DatasetSpec` names one labelled image folder in any of the layouts aerosynth writes:

- a labelled tile split of the data layer (``tiles.json``, ``images/``, ``labels/``);
- a YOLO folder written by annotation (``images/``, ``labels/``);
- a synthetic set (``synthetic.json``, ``images/``, ``heatmaps/``, ``labels/``), where
  ``image_dir="heatmaps"`` trains on the 3-channel heat-map images (the AGenDA relay detector
  F_A) and a set generated without vehicles (``with_vehicles: false``) needs no label files.

A weak target split (``tiles.json`` with ``weak: true``) has no boxes and is refused, unless
``labels_dir`` points at its evaluation labels (the oracle detector only).

:func:`build_yolo_view` mixes several specs into one ultralytics dataset made of symlinks:
each spec contributes ``fraction * total`` samples (whole repetitions of the dataset plus a
seeded subsample for the remainder), so the mix is the same for the same seed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.exporters import LabelledImage, read_image_level, write_data_yaml, write_yolo_split
from aerosynth.data.imageio import IMAGE_SUFFIXES, image_size
from aerosynth.data.tileset import TILES_FILE, read_tiles_file

SYNTHETIC_FILE = "synthetic.json"


@dataclass(frozen=True)
class DatasetSpec:
    """One labelled image folder for training or validation.

    Attributes:
        path: the folder (tile split, YOLO folder or synthetic set).
        image_dir: sub-folder holding the images (``"heatmaps"`` for heat-map training).
        labels_dir: folder of YOLO ``<stem>.txt`` files; ``path/labels`` when ``None``.
        fraction: share of the mixed training set this dataset makes up (all specs of a mix
            give one, or none does: then the datasets are concatenated as they are).
        name: short name used in the view's file names and the manifest (folder name if ``None``).
        missing_labels_are_empty: an image without a label file is a negative (no vehicle).
    """

    path: Path
    image_dir: str = "images"
    labels_dir: Path | None = None
    fraction: float | None = None
    name: str | None = None
    missing_labels_are_empty: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.labels_dir is not None:
            object.__setattr__(self, "labels_dir", Path(self.labels_dir))
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise InputError(f"{self.path}:fraction", f"must be in (0, 1], got {self.fraction}")

    @property
    def label(self) -> str:
        return self.name or self.path.name

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "image_dir": self.image_dir,
            "labels_dir": None if self.labels_dir is None else str(self.labels_dir),
            "fraction": self.fraction,
            "name": self.label,
            "missing_labels_are_empty": self.missing_labels_are_empty,
        }


@dataclass(frozen=True)
class Sample:
    """One image file and its boxes (pixels of that image); ``image_level``: it holds a vehicle whose box is
    not known (listed in the dataset's ``image_level.json``, see :class:`~aerosynth.data.exporters.LabelledImage`)."""

    image: Path
    detections: Detections
    image_level: bool = False


def _synthetic_without_vehicles(root: Path) -> bool:
    meta = root / SYNTHETIC_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("with_vehicles") is False
    except ValueError:
        raise InputError(meta, "malformed synthetic set header") from None


def dataset_gsd(spec: DatasetSpec) -> float | None:
    """Ground sampling distance (m/px) a dataset declares (``tiles.json`` or ``synthetic.json``), if any."""
    if (spec.path / TILES_FILE).is_file():
        return float(read_tiles_file(spec.path)[0].gsd)
    meta = spec.path / SYNTHETIC_FILE
    if meta.is_file():
        try:
            gsd = json.loads(meta.read_text()).get("gsd")
        except ValueError:
            raise InputError(meta, "malformed synthetic set header") from None
        return None if gsd is None else float(gsd)
    return None


def list_samples(spec: DatasetSpec) -> list[Sample]:
    """Every image of a dataset with its boxes, sorted by file name.

    Raises:
        InputError: missing folder, a weak split without ``labels_dir``, a missing or
            malformed label file, no image at all.
    """
    root = spec.path
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    if (root / TILES_FILE).is_file():
        info, _ = read_tiles_file(root)
        if info.weak and spec.labels_dir is None:
            raise InputError(root, "weak split has no boxes; train on labelled or synthetic data")
    image_dir = root / spec.image_dir
    if not image_dir.is_dir():
        raise InputError(image_dir, "image folder not found")
    labels_dir = spec.labels_dir if spec.labels_dir is not None else root / "labels"
    empty_ok = spec.missing_labels_are_empty or _synthetic_without_vehicles(root)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(image_dir, "no image found")
    image_level = read_image_level(root)
    samples = []
    for img in images:
        label_file = labels_dir / f"{img.stem}.txt"
        if label_file.is_file():
            w, h = image_size(img)
            dets = Detections.from_yolo(label_file.read_text(), w, h, where=str(label_file))
        elif empty_ok:
            dets = Detections.empty()
        else:
            raise InputError(label_file, "label file missing (set missing_labels_are_empty for negatives)")
        samples.append(Sample(img, dets, img.stem in image_level))
    return samples


def mix_counts(sizes: Sequence[int], fractions: Sequence[float | None], total: int | None = None) -> list[int]:
    """How many samples each dataset contributes to a mix.

    Args:
        sizes: number of images of each dataset.
        fractions: the share of each (all ``None``: concatenate, each contributes its size).
        total: size of the mix; the sum of ``sizes`` when ``None``.

    Raises:
        InputError: fractions given for some datasets only, or not summing to 1.
    """
    if all(f is None for f in fractions):
        return list(sizes)
    if any(f is None for f in fractions):
        raise InputError("train[].fraction", "give a fraction for every training dataset or for none")
    s = float(sum(fractions))  # type: ignore[arg-type]
    if abs(s - 1.0) > 1e-6:
        raise InputError("train[].fraction", f"fractions sum to {s:g}, not 1")
    total = int(sum(sizes)) if total is None else int(total)
    counts = [int(round(f * total)) for f in fractions]  # type: ignore[operator]
    return [max(c, 1) for c in counts]


def resample(samples: Sequence[Sample], count: int, rng: np.random.Generator) -> list[Sample]:
    """``count`` samples: whole repetitions of ``samples`` plus a random subset for the remainder."""
    n = len(samples)
    reps, rest = divmod(count, n)
    chosen = list(range(n)) * reps + sorted(rng.choice(n, size=rest, replace=False).tolist())
    return [samples[i] for i in chosen]


@dataclass(frozen=True)
class YoloView:
    """A built ultralytics dataset: ``data.yaml``, the counts behind it, and the file stems of its
    image-level training images (``train/image_level.json``)."""

    data_yaml: Path
    root: Path
    counts: dict[str, int]
    val_count: int
    image_level: frozenset[str] = frozenset()


def _items(samples: Sequence[Sample], prefix: str) -> list[LabelledImage]:
    return [
        LabelledImage(f"{prefix}_{i:06d}_{s.image.stem}", s.image, s.detections, image_level=s.image_level)
        for i, s in enumerate(samples)
    ]


def build_yolo_view(
    out_dir: str | Path,
    train: Sequence[DatasetSpec],
    val: DatasetSpec,
    seed: int = 0,
    total: int | None = None,
    class_names: Sequence[str] = ("vehicle",),
) -> YoloView:
    """Write an ultralytics dataset of symlinked images (``train/``, ``val/``, ``data.yaml``).

    Args:
        out_dir: the view folder (replaced if it exists).
        train: training datasets; mixed by their ``fraction`` (see :func:`mix_counts`).
        val: the validation set used for early stopping (source-val or synthetic; never target labels).
        seed: seed of the subsampling.
        total: size of the mixed training set when fractions are given.
        class_names: class names of the data.yaml.

    Returns:
        The view, with the number of training samples drawn from each dataset.
    """
    if not train:
        raise InputError("train", "no training dataset given")
    out_dir = Path(out_dir)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    rng = np.random.default_rng(seed)
    per_spec = [list_samples(s) for s in train]
    counts = mix_counts([len(p) for p in per_spec], [s.fraction for s in train], total)
    labels = [s.label for s in train]
    if len(set(labels)) != len(labels):
        labels = [f"{lab}{i}" for i, lab in enumerate(labels)]
    items: list[LabelledImage] = []
    summary = {}
    for lab, samples, count in zip(labels, per_spec, counts, strict=True):
        items += _items(resample(samples, count, rng), lab)
        summary[lab] = count
    write_yolo_split(out_dir / "train", items, link=True)
    image_level = frozenset(i.name for i in items if i.image_level)  # the file stems train/image_level.json lists
    val_items = [dataclasses.replace(i, image_level=False) for i in _items(list_samples(val), val.label)]
    write_yolo_split(out_dir / "val", val_items, link=True)
    data_yaml = write_data_yaml(out_dir / "data.yaml", out_dir, "train/images", "val/images", list(class_names))
    atomic_write_json(
        out_dir / "view.json",
        {
            "seed": seed,
            "train": [s.to_dict() for s in train],
            "val": val.to_dict(),
            "counts": summary,
            "val_count": len(val_items),
            "image_level_images": len(image_level),
        },
    )
    return YoloView(data_yaml, out_dir, summary, len(val_items), image_level)
