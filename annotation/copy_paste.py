"""The copy-paste baseline: source vehicles pasted onto real target tiles flagged empty.

No diffusion at all. Vehicle crops come from the labelled *source* tiles (their boxes are known); the
backgrounds are real target-train tiles whose weak flag says "no vehicle", so the only vehicles in a
composite are the pasted ones and every box is known from the paste. Each crop's colours are pulled
``colour_pull`` of the way toward the target tile's mean colour. Target boxes are never read.

This is the plain baseline a synthetic set made by the LDM has to beat (issue 22): real target
backgrounds with known, if foreign-looking, vehicles.

:func:`blend_set` takes the composites after the LDM harmonised them (a partial denoising pass over the
whole tile) and keeps the harmonised pixels only around the pasted boxes, the real background
everywhere else: the vehicles get the target's look, the background keeps the real tile's texture
(the autoencoder and the short denoising pass smooth it otherwise).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from aerosynth.data.atomic import atomic_directory, atomic_write_json
from aerosynth.data.detections import Detections, box_iou
from aerosynth.data.errors import InputError
from aerosynth.data.exporters import LabelledImage, write_coco, write_yolo_split
from aerosynth.data.imageio import write_png
from aerosynth.data.tileset import (
    EVALUATION_DIR,
    LabelledTileSplit,
    SplitInfo,
    TileRecord,
    WeakTileSplit,
    is_source_labelled,
    open_split,
    tiles_document,
)

SUMMARY_FILE = "summary.json"


@dataclass
class CopyPasteConfig:
    """How composites are made.

    Attributes:
        min_per_tile: fewest vehicles pasted on one tile.
        max_per_tile: most vehicles pasted on one tile.
        colour_pull: fraction of the way each crop's pixels move toward the target tile's mean colour.
        min_side: crops with a shorter side (pixels) are not used.
        max_crops: at most this many source crops are drawn from (a seeded sample).
        max_tiles: at most this many empty target tiles become composites (``None``: all).
        seed: seed of every random choice.
    """

    min_per_tile: int = 1
    max_per_tile: int = 4
    colour_pull: float = 0.2
    min_side: int = 4
    max_crops: int = 4000
    max_tiles: int | None = None
    seed: int = 0

    def validate(self) -> CopyPasteConfig:
        if not 1 <= self.min_per_tile <= self.max_per_tile:
            raise InputError(
                "copy_paste", f"need 1 <= min_per_tile <= max_per_tile, got {self.min_per_tile}, {self.max_per_tile}"
            )
        if not 0.0 <= self.colour_pull <= 1.0:
            raise InputError("copy_paste.colour_pull", f"must be in [0, 1], got {self.colour_pull}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def source_crops(split: LabelledTileSplit, config: CopyPasteConfig) -> list[np.ndarray]:
    """Vehicle crops (``(h, w, 3)`` uint8) of a labelled source split: whole boxes away from the tile edge."""
    if not is_source_labelled(split):
        raise InputError(getattr(split, "root", "split"), "vehicle crops come from labelled source tiles only")
    rng = np.random.default_rng(config.seed)
    boxes = []
    for tile in split.tiles:
        for x1, y1, x2, y2 in split.labels(tile.tile_id).xyxy:
            boxes.append((tile.tile_id, int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))))
    if len(boxes) > config.max_crops:
        boxes = [boxes[i] for i in sorted(rng.choice(len(boxes), config.max_crops, replace=False))]
    crops: list[np.ndarray] = []
    rgb, current = None, None
    for tile_id, x1, y1, x2, y2 in boxes:  # in tile order: each tile is read once
        if tile_id != current:
            rgb, current = split.image(tile_id), tile_id
        h, w = rgb.shape[:2]
        if x1 <= 0 or y1 <= 0 or x2 >= w or y2 >= h:  # cut by the tile edge: not a whole vehicle
            continue
        if min(x2 - x1, y2 - y1) < config.min_side:
            continue
        crops.append(rgb[y1:y2, x1:x2].copy())
    if not crops:
        raise InputError(split.root, "no whole vehicle box to crop in the source split")
    return crops


def composite(
    background: np.ndarray, crops: list[np.ndarray], rng: np.random.Generator, config: CopyPasteConfig
) -> tuple[np.ndarray, Detections]:
    """Paste ``min_per_tile``-``max_per_tile`` crops (random flips and quarter turns) onto one tile, no overlaps."""
    out = background.copy()
    h, w = out.shape[:2]
    mean = background.reshape(-1, 3).mean(axis=0)
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(config.min_per_tile, config.max_per_tile + 1))):
        crop = crops[int(rng.integers(len(crops)))]
        crop = np.rot90(crop, int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        ch, cw = crop.shape[:2]
        if ch >= h or cw >= w:
            continue
        for _try in range(20):
            x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            box = [x, y, x + cw, y + ch]
            if not boxes or box_iou(np.asarray([box], float), np.asarray(boxes, float)).max() == 0:
                break
        else:
            continue
        pulled = crop.astype(np.float64) * (1 - config.colour_pull) + mean * config.colour_pull
        out[y : y + ch, x : x + cw] = np.clip(np.rint(pulled), 0, 255).astype(np.uint8)
        boxes.append([float(v) for v in box])
    return out, Detections(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def copy_paste_set(
    source_dir: str | Path, target_dir: str | Path, out_dir: str | Path, config: CopyPasteConfig | None = None
) -> Path:
    """Write the copy-paste set (``images/``, ``labels/``, ``summary.json``) atomically.

    The folder is also a labelled tile split (``tiles.json``, ``annotations.json``; domain: the target's),
    so the LDM can harmonise it (:func:`aerosynth.generation.sampling.translate_split`).

    Args:
        source_dir: a labelled source split (source-train): the vehicle crops.
        target_dir: the weak target split (target-train): its tiles flagged empty are the backgrounds.
        out_dir: the labelled folder written (replaced as a whole).
        config: how many vehicles, the colour pull, the seed.

    Raises:
        InputError: a split under ``evaluation/``, a target split with labels, no empty tile or no crop.
    """
    config = (config or CopyPasteConfig()).validate()
    if EVALUATION_DIR in Path(target_dir).resolve().parts:
        raise InputError(target_dir, "target labels under evaluation/ are never read for training")
    target = open_split(target_dir)
    if not isinstance(target, WeakTileSplit):
        raise InputError(target_dir, "the backgrounds come from a weak target split (flags only)")
    source = open_split(source_dir)
    crops = source_crops(source, config)  # type: ignore[arg-type]
    empty = [t for t in target.tiles if not t.has_vehicle]
    if not empty:
        raise InputError(target_dir, "no target tile is flagged empty: nothing to paste onto")
    rng = np.random.default_rng(config.seed)
    if config.max_tiles is not None and len(empty) > config.max_tiles:
        empty = [empty[i] for i in sorted(rng.choice(len(empty), config.max_tiles, replace=False))]
    items, records = [], []
    for tile in empty:
        rgb, boxes = composite(target.image(tile.tile_id), crops, rng, config)
        items.append(LabelledImage(f"cp_{tile.tile_id}", rgb, boxes))
        h, w = rgb.shape[:2]
        records.append(TileRecord(f"cp_{tile.tile_id}", tile.source_image, tile.group, tile.x0, tile.y0, w, h, True))
    info = SplitInfo(
        name="copy-paste", domain=target.info.domain, gsd=target.info.gsd, tile_size=target.info.tile_size, weak=False
    )
    summary = {
        "method": "copy-paste",
        "domain": target.info.domain,
        "gsd": target.info.gsd,
        "tiles": len(items),
        "boxes": int(sum(len(i.detections) for i in items)),
        "source_crops": len(crops),
        "config": config.to_dict(),
    }
    with atomic_directory(Path(out_dir), overwrite=True) as tmp:
        write_yolo_split(tmp, items)
        atomic_write_json(tmp / "tiles.json", tiles_document(info, records))
        write_coco(tmp / "annotations.json", items, ["vehicle"])
        atomic_write_json(tmp / SUMMARY_FILE, summary)
    return Path(out_dir)


def box_mask(shape: tuple[int, int], boxes: Detections, margin: float = 2.0, feather: float = 1.5) -> np.ndarray:
    """``(h, w)`` float32 weights: 1 on the boxes grown by ``margin`` pixels, 0 elsewhere, edges blurred by
    a Gaussian of ``feather`` pixels (0: hard edges)."""
    h, w = shape
    mask = boxes.pixel_mask(w, h, margin).astype(np.float32)
    if feather > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), feather)
    return mask


def keep_background(
    original: np.ndarray, harmonised: np.ndarray, boxes: Detections, margin: float = 2.0, feather: float = 1.5
) -> np.ndarray:
    """The harmonised pixels around ``boxes``, the original's elsewhere (``(h, w, 3)`` uint8, same sizes)."""
    if original.shape != harmonised.shape:
        raise InputError("keep_background", f"image sizes differ: {original.shape} and {harmonised.shape}")
    m = box_mask(original.shape[:2], boxes, margin, feather)[..., None]
    out = original.astype(np.float32) * (1 - m) + harmonised.astype(np.float32) * m
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blend_set(
    composites_dir: str | Path,
    harmonised_dir: str | Path,
    out_dir: str | Path,
    margin: float = 2.0,
    feather: float = 1.5,
) -> Path:
    """The harmonised composites with the real background kept outside their boxes, as a synthetic set.

    Args:
        composites_dir: the copy-paste set (:func:`copy_paste_set`).
        harmonised_dir: its translation by the LDM (``translation`` set: ``sources.json`` names each
            image's composite, ``labels/`` the pasted boxes in the image's size).
        out_dir: the synthetic set written (replaced as a whole): the same labels and heat maps, new images.
        margin: pixels the harmonised area reaches beyond each box.
        feather: Gaussian blur (pixels) of the mask's edge.

    Raises:
        InputError: a set that is not a translation of these composites, or missing files.
    """
    from aerosynth.annotation.synthetic_set import SYNTHETIC_FILE, SyntheticSet

    harmonised = SyntheticSet(harmonised_dir)
    composites = open_split(composites_dir)
    sources_file = harmonised.root / "sources.json"
    if harmonised.name != "translation" or not sources_file.is_file():
        raise InputError(harmonised.root, "not a translation of the composites (no sources.json)")
    sources = json.loads(sources_file.read_text())
    known = {t.tile_id for t in composites.tiles}
    with atomic_directory(Path(out_dir), overwrite=True) as tmp:
        for sub in ("images", "labels", "heatmaps"):
            (tmp / sub).mkdir()
        for name in harmonised.names:
            if sources.get(name) not in known:
                raise InputError(
                    sources_file, f"{name}: its composite {sources.get(name)!r} is not in {composites_dir}"
                )
            image = harmonised.image(name)
            h, w = image.shape[:2]
            original = composites.image(sources[name])
            if original.shape[:2] != (h, w):
                original = cv2.resize(original, (w, h), interpolation=cv2.INTER_AREA)
            text = harmonised.label_path(name).read_text()
            boxes = Detections.from_yolo(text, w, h, str(harmonised.label_path(name)))
            write_png(tmp / "images" / f"{name}.png", keep_background(original, image, boxes, margin, feather))
            (tmp / "labels" / f"{name}.txt").write_text(text)
            shutil.copyfile(harmonised.heatmap_path(name), tmp / "heatmaps" / f"{name}.png")
        header = json.loads((harmonised.root / SYNTHETIC_FILE).read_text())
        header["blend"] = {"kept": "real background outside the boxes", "margin_px": margin, "feather_px": feather}
        atomic_write_json(tmp / SYNTHETIC_FILE, header)
        atomic_write_json(tmp / "sources.json", sources)
    return Path(out_dir)
