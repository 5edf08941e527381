"""Dataset exports: YOLO (images, labels, data.yaml) and COCO json.

GeoJSON export lives in :mod:`aerosynth.data.geo`, next to the coordinate conversions it needs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import image_size, write_png


@dataclass
class LabelledImage:
    """One image with its boxes, as exports consume it.

    Attributes:
        name: file stem in the export (unique).
        image: a path to an existing image, or an ``(H, W, 3)`` uint8 array.
        detections: its boxes (pixels of that image).
        ignore: optional ignore regions (COCO ``iscrowd: 1``; not in YOLO).
        image_level: the image holds a vehicle whose box is not known (a tile flagged "vehicle" that no
            proposal labelled): it has no box and is listed in the split's ``image_level.json``, for the
            detector's image-level loss instead of being taught as background.
    """

    name: str
    image: Path | np.ndarray
    detections: Detections
    ignore: Detections | None = None
    image_level: bool = False

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


IMAGE_LEVEL_FILE = "image_level.json"


def write_yolo_split(out_dir: str | Path, items: Iterable[LabelledImage], link: bool = True) -> int:
    """Write ``images/`` and ``labels/`` of one YOLO split (ultralytics layout); returns the count.

    Images marked ``image_level`` are also listed (by file stem) in ``image_level.json``, written only
    when there is one.

    Args:
        out_dir: the split folder.
        items: images with boxes; array images are written as PNG.
        link: symlink existing image files instead of copying them.
    """
    out_dir = Path(out_dir)
    n = 0
    image_level = []
    for item in items:
        suffix = ".png" if isinstance(item.image, np.ndarray) else Path(item.image).suffix
        _place_image(item, out_dir / "images" / f"{item.name}{suffix}", link)
        w, h = item.size()
        atomic_write_text(out_dir / "labels" / f"{item.name}.txt", item.detections.to_yolo(w, h))
        if item.image_level:
            if len(item.detections):
                raise ValueError(f"{item.name}: an image-level image has no box")
            image_level.append(item.name)
        n += 1
    if image_level:
        atomic_write_json(
            out_dir / IMAGE_LEVEL_FILE,
            {"meaning": "each image holds a vehicle whose box is not known (no label)", "images": image_level},
        )
    return n


def read_image_level(split_dir: str | Path) -> frozenset[str]:
    """File stems of a YOLO split's image-level images (``image_level.json``; none when absent)."""
    path = Path(split_dir) / IMAGE_LEVEL_FILE
    if not path.is_file():
        return frozenset()
    try:
        return frozenset(str(n) for n in json.loads(path.read_text())["images"])
    except (ValueError, KeyError, TypeError):
        raise InputError(path, 'malformed image-level list (expected {"images": [file stems]})') from None


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
