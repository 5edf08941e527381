"""Tiny tile splits for the generation tests (imported by tests/test_generation*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.exporters import LabelledImage, write_coco
from aerosynth.data.imageio import write_png
from aerosynth.data.tileset import SplitInfo, TileRecord, tiles_document

DOMAIN_COLOURS = {"madison_drone": (90, 110, 80), "kit_munich_aerial": (120, 120, 130)}


def make_split(
    root: Path, name: str, domain: str, n: int = 8, size: int = 32, weak: bool = True, seed: int = 0
) -> Path:
    """Write a split of ``n`` tiles: a textured ground of the domain's colour, bright cars on every other tile."""
    rng = np.random.default_rng(seed)
    split = root / name
    records, items = [], []
    base = np.array(DOMAIN_COLOURS.get(domain, (100, 100, 100)), dtype=np.float64)
    for i in range(n):
        img = base + rng.normal(0, 12, (size, size, 3))
        has = i % 2 == 0
        boxes = []
        if has:
            for _ in range(2):
                x, y = rng.integers(2, size - 10, 2)
                img[y : y + 5, x : x + 9] = (230, 40, 40) if i % 4 == 0 else (240, 240, 240)
                boxes.append([x, y, x + 9, y + 5])
        rgb = np.clip(img, 0, 255).astype(np.uint8)
        tile_id = f"t{i:03d}"
        write_png(split / "images" / f"{tile_id}.png", rgb)
        records.append(TileRecord(tile_id, "synthetic", "g0", 0, 0, size, size, has))
        items.append(LabelledImage(tile_id, rgb, Detections(np.array(boxes, dtype=float).reshape(-1, 4))))
        if not weak:
            (split / "labels").mkdir(parents=True, exist_ok=True)
            (split / "labels" / f"{tile_id}.txt").write_text(items[-1].detections.to_yolo(size, size))
    info = SplitInfo(name=name, domain=domain, gsd=0.125, tile_size=size, weak=weak)
    atomic_write_json(split / "tiles.json", tiles_document(info, records))
    if not weak:
        write_coco(split / "annotations.json", items, ["vehicle"])
    return split


def make_training_splits(root: Path, n_source: int = 8, n_target: int = 8) -> list[Path]:
    """A labelled source-train (Madison) and a weak target-train (Munich) split: what stages A-C read."""
    return [
        make_split(root, "source-train", "madison_drone", n=n_source, weak=False),
        make_split(root, "target-train", "kit_munich_aerial", n=n_target, seed=1),
    ]
