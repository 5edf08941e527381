"""Dataset exports: YOLO (images, labels, data.yaml) and COCO json.

GeoJSON export lives in :mod:`aerosynth.data.geo`, next to the coordinate conversions it needs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.imageio import image_size, write_png


@dataclass
class LabelledImage:
    """One image with its boxes, as exports consume it.

    Attributes:
        name: file stem in the export (unique).
        image: a path to an existing image, or an ``(H, W, 3)`` uint8 array.
        detections: its boxes (pixels of that image).
        ignore: optional ignore regions (COCO ``iscrowd: 1``; not in YOLO).
    """

    name: str
    image: Path | np.ndarray
    detections: Detections
    ignore: Detections | None = None

    def size(self) -> tuple[int, int]:
        if isinstance(self.image, np.ndarray):
            return int(self.image.shape[1]), int(self.image.shape[0])
        return image_size(self.image)


def _place_image(item: LabelledImage, target: Path, link: bool) -> None:
    if isinstance(item.image, np.ndarray):
        write_png(target, item.image)
        return
    src = Path(item.image).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    if link:
        os.symlink(src, target)
    else:
        shutil.copyfile(src, target)


def write_yolo_split(out_dir: str | Path, items: Iterable[LabelledImage], link: bool = True) -> int:
    """Write ``images/`` and ``labels/`` of one YOLO split (ultralytics layout); returns the count.

    Args:
        out_dir: the split folder.
        items: images with boxes; array images are written as PNG.
        link: symlink existing image files instead of copying them.
    """
    out_dir = Path(out_dir)
    n = 0
    for item in items:
        suffix = ".png" if isinstance(item.image, np.ndarray) else Path(item.image).suffix
        _place_image(item, out_dir / "images" / f"{item.name}{suffix}", link)
        w, h = item.size()
        atomic_write_text(out_dir / "labels" / f"{item.name}.txt", item.detections.to_yolo(w, h))
        n += 1
    return n


def write_data_yaml(
    path: str | Path, root: str | Path | None, train: str | list[str], val: str | list[str], class_names: list[str]
) -> Path:
    """Write an ultralytics ``data.yaml``; split paths are relative to ``root``.

    With ``root=None`` the file carries no ``path``: ultralytics then reads the splits relative to
    the yaml's own folder, so the dataset can be moved or renamed (same bytes wherever it lives).
    """
    doc: dict = {"path": str(Path(root).resolve())} if root is not None else {}
    doc.update({"train": train, "val": val, "names": dict(enumerate(class_names))})
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))
    return Path(path)


def coco_document(items: Iterable[LabelledImage], class_names: list[str], image_prefix: str = "images/") -> dict:
    """A COCO dict; ``file_name`` is ``image_prefix + name + suffix``, image ids count from 1."""
    images, annotations = [], []
    ann_id = 1
    for image_id, item in enumerate(items, 1):
        w, h = item.size()
        suffix = ".png" if isinstance(item.image, np.ndarray) else Path(item.image).suffix
        images.append({"id": image_id, "file_name": f"{image_prefix}{item.name}{suffix}", "width": w, "height": h})
        anns = item.detections.to_coco(image_id, ann_id)
        ann_id += len(anns)
        if item.ignore is not None and len(item.ignore):
            crowd = item.ignore.to_coco(image_id, ann_id, iscrowd=1)
            ann_id += len(crowd)
            anns += crowd
        annotations.extend(anns)
    categories = [{"id": i + 1, "name": n, "supercategory": "vehicle"} for i, n in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(path: str | Path, items: Iterable[LabelledImage], class_names: list[str], image_prefix: str = "images/"):
    """Write a COCO json atomically and return its document."""
    doc = coco_document(items, class_names, image_prefix)
    atomic_write_json(path, doc)
    return doc
