"""Tile splits on disk: the normalised datasets every later stage reads.

A prepared dataset is a folder::

    ROOT/
      manifest.json               preset, GSD, tile size, counts per split, content hashes
      source-train/ source-val/   labelled splits
        images/<tile>.png         RGB uint8 tiles
        labels/<tile>.txt         YOLO rows (class cx cy w h), empty file for a negative tile
        annotations.json          COCO, with ignore regions as ``iscrowd: 1``
        tiles.json                one record per tile (origin, offset, transform, CRS, weak flag)
      target-train/ target-test/  weak splits: images/ and tiles.json only, no box anywhere
      evaluation/<split>/         labels of the weak splits: labels/, annotations.json

Adaptation code opens a target split with :func:`open_split` and gets a
:class:`WeakTileSplit`, which has no box attribute at all. Boxes of a target split are
reachable only through :func:`open_evaluation_split`, the explicit evaluation/oracle API.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb

TILES_FILE = "tiles.json"
COCO_FILE = "annotations.json"
EVALUATION_DIR = "evaluation"


@dataclass
class TileRecord:
    """Where one tile comes from.

    Attributes:
        tile_id: file stem, unique in its split.
        source_image: the image or raster it was cut from.
        group: clip or sequence of that image (splits are made by group).
        x0: column of the tile's left edge in the resampled image.
        y0: row of the tile's top edge in the resampled image.
        width: tile width in pixels.
        height: tile height in pixels.
        has_vehicle: the weak label.
        transform: affine ``(a, b, c, d, e, f)`` pixel -> map of the tile, or ``None``.
        crs: CRS of ``transform`` as WKT or ``EPSG:n``, or ``None``.
    """

    tile_id: str
    source_image: str
    group: str
    x0: int
    y0: int
    width: int
    height: int
    has_vehicle: bool
    transform: tuple[float, float, float, float, float, float] | None = None
    crs: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> TileRecord:
        d = dict(d)
        if d.get("transform") is not None:
            d["transform"] = tuple(d["transform"])
        return cls(**d)


@dataclass
class SplitInfo:
    """Header of a split's ``tiles.json``."""

    name: str
    domain: str
    gsd: float
    tile_size: int
    weak: bool
    class_names: list[str] = field(default_factory=lambda: ["vehicle"])


def read_tiles_file(split_dir: Path) -> tuple[SplitInfo, list[TileRecord]]:
    path = split_dir / TILES_FILE
    if not path.is_file():
        raise InputError(split_dir, f"not a tile split (no {TILES_FILE})")
    try:
        doc = json.loads(path.read_text())
        info = SplitInfo(**doc["split"])
        tiles = [TileRecord.from_dict(t) for t in doc["tiles"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"malformed tile index ({exc})") from None
    return info, tiles


def tiles_document(info: SplitInfo, tiles: list[TileRecord]) -> dict:
    return {"split": asdict(info), "tiles": [asdict(t) for t in tiles]}


class _TileSplitBase:
    def __init__(self, split_dir: str | Path) -> None:
        self.root = Path(split_dir)
        self.info, self.tiles = read_tiles_file(self.root)
        self._index = {t.tile_id: i for i, t in enumerate(self.tiles)}

    @property
    def name(self) -> str:
        return self.info.name

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[TileRecord]:
        return iter(self.tiles)

    def record(self, tile_id: str) -> TileRecord:
        return self.tiles[self._index[tile_id]]

    def subset(self, tile_ids: Iterable[str]) -> Self:
        """The same split restricted to some of its tiles (in the order given; labels are shared).

        Raises:
            InputError: a tile id the split does not hold.
        """
        ids = list(tile_ids)
        missing = [t for t in ids if t not in self._index]
        if missing:
            raise InputError(self.root, f"no tile {missing[0]!r} in split {self.info.name}")
        part = copy.copy(self)
        part.tiles = [self.tiles[self._index[t]] for t in ids]
        part._index = {t.tile_id: i for i, t in enumerate(part.tiles)}
        return part

    def image_path(self, tile_id: str) -> Path:
        return self.root / "images" / f"{tile_id}.png"

    def image(self, tile_id: str) -> np.ndarray:
        """The tile as ``(H, W, 3)`` uint8 RGB."""
        return read_rgb(self.image_path(tile_id))

    def has_vehicle(self, tile_id: str) -> bool:
        """The weak label of one tile."""
        return self.record(tile_id).has_vehicle

    @property
    def weak_labels(self) -> dict[str, bool]:
        return {t.tile_id: t.has_vehicle for t in self.tiles}


class WeakTileSplit(_TileSplitBase):
    """A split whose only supervision is one flag per tile. It has no box attribute at all."""


class LabelledTileSplit(_TileSplitBase):
    """A split with boxes and ignore regions.

    Args:
        split_dir: the split folder (images and ``tiles.json``).
        labels_dir: where ``labels/`` and ``annotations.json`` are; the split folder itself
            for source splits, ``ROOT/evaluation/<split>`` for target splits.
    """

    def __init__(self, split_dir: str | Path, labels_dir: str | Path | None = None) -> None:
        super().__init__(split_dir)
        self.labels_root = Path(labels_dir) if labels_dir is not None else self.root
        coco_path = self.labels_root / COCO_FILE
        if not coco_path.is_file():
            raise InputError(self.labels_root, f"labelled split without {COCO_FILE}")
        self.coco = json.loads(coco_path.read_text())
        by_name = {img["file_name"]: img["id"] for img in self.coco["images"]}
        self._image_id = {t.tile_id: by_name[f"images/{t.tile_id}.png"] for t in self.tiles}
        self._anns: dict[int, list[dict]] = {}
        for ann in self.coco["annotations"]:
            self._anns.setdefault(ann["image_id"], []).append(ann)

    @property
    def labels_dir(self) -> Path:
        """Folder of the YOLO label files (``<tile>.txt``)."""
        return self.labels_root / "labels"

    def labels(self, tile_id: str) -> Detections:
        """Boxes of a tile (class ids from 0), ignore regions excluded."""
        anns = [a for a in self._anns.get(self._image_id[tile_id], []) if not a.get("iscrowd")]
        return Detections.from_coco(anns)

    def ignore_regions(self, tile_id: str) -> Detections:
        """Vehicles cut by the tile edge (under half inside): neither for nor against in evaluation."""
        anns = [a for a in self._anns.get(self._image_id[tile_id], []) if a.get("iscrowd")]
        return Detections.from_coco(anns)

    @property
    def coco_path(self) -> Path:
        return self.labels_root / COCO_FILE


def is_source_labelled(split: object) -> bool:
    """Whether ``split`` holds boxes that settings may be chosen on: a labelled, non-weak split whose labels
    are not under ``evaluation/`` (where the evaluation API reads a target split's boxes)."""
    return (
        isinstance(split, LabelledTileSplit)
        and not split.info.weak
        and EVALUATION_DIR not in Path(split.labels_dir).resolve().parts
    )


def open_split(split_dir: str | Path) -> WeakTileSplit | LabelledTileSplit:
    """Open a split for training or adaptation: a weak split comes back as :class:`WeakTileSplit`."""
    split_dir = Path(split_dir)
    info, _ = read_tiles_file(split_dir)
    if info.weak:
        return WeakTileSplit(split_dir)
    return LabelledTileSplit(split_dir)


def open_evaluation_split(root: str | Path, split: str) -> LabelledTileSplit:
    """Evaluation/oracle API: a split with its boxes, weak splits included.

    Only evaluation code and the oracle detector may call this for a target split.
    """
    root = Path(root)
    split_dir = root / split
    info, _ = read_tiles_file(split_dir)
    labels_dir = root / EVALUATION_DIR / split if info.weak else split_dir
    if info.weak and not (labels_dir / COCO_FILE).is_file():
        raise InputError(split_dir, "no boxes: the target was prepared from weak flags only, it cannot be scored")
    return LabelledTileSplit(split_dir, labels_dir)
