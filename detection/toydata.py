"""Toy overhead scenes with planted vehicles: smoke runs, demos and tests of the detection stage.

A scene is a noisy grey "asphalt" background with axis-aligned rectangles ("vehicles") of a
contrasting colour; the boxes are exact. :func:`write_toy_split` writes a labelled tile split in
the data layer's format (``images/``, ``labels/``, ``tiles.json``, ``annotations.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.exporters import LabelledImage, write_coco
from aerosynth.data.imageio import write_png
from aerosynth.data.tileset import SplitInfo, TileRecord, tiles_document


def background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth grey background with mild noise, ``(H, W, 3)`` uint8."""
    base = rng.uniform(90, 130)
    img = base + rng.normal(0, 6, (height, width, 1))
    img = np.repeat(img, 3, axis=2) + rng.normal(0, 2, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def plant_vehicles(
    image: np.ndarray, count: int, rng: np.random.Generator, size: tuple[int, int] = (22, 11), margin: int = 2
) -> Detections:
    """Draw ``count`` non-overlapping vehicles into ``image`` (in place) and return their boxes."""
    h, w = image.shape[:2]
    boxes: list[list[float]] = []
    for _ in range(count * 20):
        if len(boxes) == count:
            break
        long, short = size
        bw, bh = (long, short) if rng.random() < 0.5 else (short, long)
        x0 = int(rng.integers(margin, w - bw - margin + 1))
        y0 = int(rng.integers(margin, h - bh - margin + 1))
        cand = [x0, y0, x0 + bw, y0 + bh]
        if any(
            not (cand[2] + 2 <= b[0] or b[2] + 2 <= cand[0] or cand[3] + 2 <= b[1] or b[3] + 2 <= cand[1])
            for b in boxes
        ):
            continue
        colour = rng.choice([rng.uniform(10, 40), rng.uniform(200, 245)])
        tint = rng.uniform(-15, 15, 3)
        image[y0 : y0 + bh, x0 : x0 + bw] = np.clip(colour + tint, 0, 255).astype(np.uint8)
        # a windscreen stripe, so the object has an inside
        if bw > bh:
            image[y0 + 2 : y0 + bh - 2, x0 + bw // 4 : x0 + bw // 4 + 2] = 70
        else:
            image[y0 + bh // 4 : y0 + bh // 4 + 2, x0 + 2 : x0 + bw - 2] = 70
        boxes.append([float(v) for v in cand])
    return Detections(np.array(boxes).reshape(-1, 4))


def toy_scene(
    height: int, width: int, count: int, seed: int, size: tuple[int, int] = (22, 11)
) -> tuple[np.ndarray, Detections]:
    """One scene: image and boxes."""
    rng = np.random.default_rng(seed)
    img = background(height, width, rng)
    return img, plant_vehicles(img, count, rng, size)


def write_toy_split(
    split_dir: str | Path,
    n_tiles: int,
    seed: int = 0,
    tile_size: int = 128,
    max_vehicles: int = 3,
    name: str = "source-train",
    domain: str = "toy",
    gsd: float = 0.125,
    weak: bool = False,
    labels_dir: str | Path | None = None,
) -> Path:
    """Write a labelled tile split (or a weak one, its labels in ``labels_dir``).

    Every third tile is empty; the others hold 1..``max_vehicles`` vehicles.
    """
    split_dir = Path(split_dir)
    lab_root = Path(labels_dir) if labels_dir is not None else split_dir
    items, records = [], []
    for i in range(n_tiles):
        count = 0 if i % 3 == 2 else 1 + (i % max_vehicles)
        img, dets = toy_scene(tile_size, tile_size, count, seed * 100_003 + i)
        tile_id = f"{name}_{i:05d}"
        path = write_png(split_dir / "images" / f"{tile_id}.png", img)
        atomic_write_text(lab_root / "labels" / f"{tile_id}.txt", dets.to_yolo(tile_size, tile_size))
        items.append(LabelledImage(tile_id, path, dets))
        records.append(TileRecord(tile_id, "toy.png", "g0", 0, 0, tile_size, tile_size, len(dets) > 0))
    info = SplitInfo(name=name, domain=domain, gsd=gsd, tile_size=tile_size, weak=weak)
    atomic_write_json(split_dir / "tiles.json", tiles_document(info, records))
    write_coco(lab_root / "annotations.json", items, ["vehicle"])
    return split_dir
