"""Tiny made-up data for tests and demos of the annotation stage (no LDM, no real imagery).

Scenes are flat "roads" with coloured rectangles as vehicles; heat maps put a Gaussian blob
on every vehicle, so a detector trained on either learns the same boxes. Everything is
seeded: the same arguments write the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.exporters import LabelledImage, write_coco
from aerosynth.data.imageio import write_png
from aerosynth.data.tileset import SplitInfo, TileRecord, tiles_document

#: Background colour of each domain's scenes.
DOMAIN_BACKGROUND = {"madison_drone": (90, 90, 95), "kit_munich_aerial": (120, 110, 80)}


def draw_scene(
    rng: np.random.Generator, size: int, n_vehicles: int, domain: str, car_px: tuple[int, int] = (12, 18)
) -> tuple[np.ndarray, Detections]:
    """An RGB scene with ``n_vehicles`` non-overlapping rectangles and their boxes."""
    bg = np.array(DOMAIN_BACKGROUND.get(domain, (100, 100, 100)), np.int16)
    img = (bg + rng.integers(-12, 13, size=(size, size, 3))).clip(0, 255).astype(np.uint8)
    boxes: list[list[float]] = []
    tries = 0
    while len(boxes) < n_vehicles and tries < 200:
        tries += 1
        w, h = (int(v) for v in rng.integers(car_px[0], car_px[1] + 1, size=2))
        x1, y1 = int(rng.integers(1, size - w - 1)), int(rng.integers(1, size - h - 1))
        cand = [x1, y1, x1 + w, y1 + h]
        if any(
            not (cand[2] + 2 <= b[0] or b[2] + 2 <= cand[0] or cand[3] + 2 <= b[1] or b[3] + 2 <= cand[1])
            for b in boxes
        ):
            continue
        colour = rng.integers(150, 256, size=3) if rng.random() < 0.5 else rng.integers(0, 60, size=3)
        img[y1 : y1 + h, x1 : x1 + w] = colour.astype(np.uint8)
        img[y1 + 2 : y1 + h // 2, x1 + 2 : x1 + w - 2] = (colour * 0.6).astype(np.uint8)
        boxes.append([float(v) for v in cand])
    return img, Detections(np.array(boxes).reshape(-1, 4))


def blob_heatmap(boxes: Detections, size: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """A heat-map stack (R cars, G V1, B 255 - background) with a Gaussian blob per box."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cars = np.zeros((size, size))
    for x1, y1, x2, y2 in boxes.xyxy:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        sx, sy = max((x2 - x1) / 3, 1.0), max((y2 - y1) / 3, 1.0)
        cars = np.maximum(cars, np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2) / 2))
    cars = cars + noise * rng.random((size, size))
    v1 = 0.8 * cars + noise * rng.random((size, size))
    fg = np.clip(cars * 1.2, 0, 1)
    stack = np.stack([cars, v1, fg], axis=-1)
    lo, hi = stack.min(axis=(0, 1)), stack.max(axis=(0, 1))
    stack = (stack - lo) / np.maximum(hi - lo, 1e-9)
    return (stack * 255).round().astype(np.uint8)


def write_fake_synthetic_set(
    set_dir: str | Path,
    kind: str,
    domain: str,
    count: int,
    seed: int,
    size: int = 64,
    gsd: float = 0.25,
    vehicles: tuple[int, int] = (1, 3),
    raw_maps: bool = False,
) -> Path:
    """A synthetic set in generation's format; vehicles only when ``kind`` is not ``target_empty``."""
    set_dir = Path(set_dir)
    with_vehicles = kind != "target_empty"
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.integers(vehicles[0], vehicles[1] + 1)) if with_vehicles else 0
        img, boxes = draw_scene(rng, size, n, domain)
        heat = blob_heatmap(boxes, size, rng)
        write_png(set_dir / "images" / f"{i:06d}.png", img)
        write_png(set_dir / "heatmaps" / f"{i:06d}.png", heat)
        if raw_maps:
            (set_dir / "maps").mkdir(parents=True, exist_ok=True)
            raw = heat.transpose(2, 0, 1).astype(np.float32) / 255.0 * 3.0
            raw[2] = 3.0 - raw[2]  # raw background map = 1 - foreground (scaled)
            np.save(set_dir / "maps" / f"{i:06d}.npy", raw)
        if kind == "translation":
            atomic_write_text(set_dir / "labels" / f"{i:06d}.txt", boxes.to_yolo(size, size))
    header = {
        "set": kind,
        "domain": domain,
        "with_vehicles": with_vehicles,
        "prompt": f"an aerial image of {'cars' if with_vehicles else 'an empty road'} in {domain}",
        "count": count,
        "base_seed": seed,
        "image_size": size,
        "gsd": gsd,
        "heatmap_channels": ["cars", "V1", "255-background"],
    }
    atomic_write_json(set_dir / "synthetic.json", header)
    atomic_write_json(set_dir / "shards" / f"000000-{max(count - 1, 0):06d}.json", {"start": 0, "stop": count})
    return set_dir


def write_fake_split(
    split_dir: str | Path,
    domain: str,
    count: int,
    seed: int,
    weak: bool,
    size: int = 64,
    gsd: float = 0.25,
    labels_dir: str | Path | None = None,
    empty_fraction: float = 0.25,
) -> Path:
    """A prepared tile split (``tiles.json``, images; labels in ``labels_dir`` or the split itself).

    A weak split gets its labels (``labels/`` and ``annotations.json``) in ``labels_dir``
    only (the ``ROOT/evaluation/<split>`` of a prepared dataset), none in the split folder.
    """
    split_dir = Path(split_dir)
    labels_root = Path(labels_dir) if labels_dir is not None else (None if weak else split_dir)
    rng = np.random.default_rng(seed)
    records, items = [], []
    for i in range(count):
        n = 0 if rng.random() < empty_fraction else int(rng.integers(1, 4))
        img, boxes = draw_scene(rng, size, n, domain)
        tile = f"t{i:05d}"
        path = write_png(split_dir / "images" / f"{tile}.png", img)
        records.append(TileRecord(tile, f"scene{i}.png", f"g{i % 3}", 0, 0, size, size, n > 0))
        items.append(LabelledImage(tile, path, boxes))
        if labels_root is not None:
            atomic_write_text(labels_root / "labels" / f"{tile}.txt", boxes.to_yolo(size, size))
    info = SplitInfo(split_dir.name, domain, gsd, size, weak)
    atomic_write_json(split_dir / "tiles.json", tiles_document(info, records))
    if labels_root is not None:
        write_coco(labels_root / "annotations.json", items, ["vehicle"])
    return split_dir


def write_fake_root(root: str | Path, count: int = 12, size: int = 64, seed: int = 0) -> Path:
    """A prepared dataset: labelled source splits, weak target splits, target labels under evaluation/."""
    root = Path(root)
    write_fake_split(root / "source-train", "madison_drone", count, seed, weak=False, size=size)
    write_fake_split(root / "source-val", "madison_drone", max(count // 2, 4), seed + 1, weak=False, size=size)
    for k, split in enumerate(("target-train", "target-test")):
        write_fake_split(
            root / split,
            "kit_munich_aerial",
            count,
            seed + 2 + k,
            weak=True,
            size=size,
            labels_dir=root / "evaluation" / split,
        )
    return root
