"""GSD resampling and fixed-size tiles with the 50 %-inside box rule."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from affine import Affine

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError


def resample(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize by ``scale`` to ``round(W * scale) x round(H * scale)``.

    Area resampling when shrinking, Lanczos when enlarging, nothing when ``scale == 1``.
    """
    if scale <= 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be positive, got {scale}")
    h, w = image.shape[:2]
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) == (w, h):
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4
    return cv2.resize(image, (nw, nh), interpolation=interp)


def resample_labels(detections: Detections, old_size: tuple[int, int], new_size: tuple[int, int]) -> Detections:
    """Scale boxes from an image of ``old_size`` (w, h) to one of ``new_size``."""
    return detections.scale(new_size[0] / old_size[0], new_size[1] / old_size[1])


def resample_transform(transform: Affine, old_size: tuple[int, int], new_size: tuple[int, int]) -> Affine:
    """The transform of the resampled image (same footprint, new pixel size)."""
    return transform @ Affine.scale(old_size[0] / new_size[0], old_size[1] / new_size[1])


def tile_offsets(length: int, tile: int, mode: str) -> list[int]:
    """Offsets of tiles along one axis.

    Args:
        length: image size along the axis.
        tile: tile size.
        mode: ``"grid"`` — non-overlapping from 0, the partial remainder dropped;
            ``"cover"`` — the fewest tiles that cover the whole length, evenly spaced
            (they overlap when ``length`` is not a multiple of ``tile``).
    """
    if tile > length:
        return []
    if mode == "grid":
        return [i * tile for i in range(length // tile)]
    if mode == "cover":
        n = math.ceil(length / tile)
        if n == 1:
            return [0]
        return [round(i * (length - tile) / (n - 1)) for i in range(n)]
    raise ValueError(f"unknown tiling mode {mode!r} (grid or cover)")


def assign_boxes(
    detections: Detections, x0: int, y0: int, width: int, height: int, min_inside: float = 0.5
) -> tuple[Detections, Detections]:
    """Boxes of one tile, in tile pixels.

    A box with at least ``min_inside`` of its area inside the tile is kept and clipped to
    it; one that overlaps the tile with less becomes an ignore region (clipped too).

    Returns:
        ``(kept, ignore)``.
    """
    if len(detections) == 0:
        return Detections.empty(), Detections.empty()
    local = detections.translate(-x0, -y0)
    clipped = local.clip(width, height)
    area = local.area
    inside = np.where(area > 0, clipped.area / np.maximum(area, 1e-12), 0.0)
    kept = clipped[inside >= min_inside - 1e-9]
    ignore = clipped[(inside > 0) & (inside < min_inside - 1e-9)]
    return kept, ignore


@dataclass
class Tile:
    """One tile cut from an image."""

    x0: int
    y0: int
    pixels: np.ndarray
    boxes: Detections
    ignore: Detections
    valid_fraction: float


def cut_tiles(
    image: np.ndarray,
    detections: Detections | None,
    tile_size: int,
    mode: str,
    valid: np.ndarray | None = None,
    where: str = "<image>",
    min_inside: float = 0.5,
) -> Iterator[Tile]:
    """Cut an image into tiles (see :func:`tile_offsets`), assigning boxes by the 50 % rule.

    Raises:
        InputError: the tile is larger than the image.
    """
    h, w = image.shape[:2]
    if tile_size > w or tile_size > h:
        raise InputError(where, f"tile size {tile_size} is larger than the {w}x{h} image (after resampling)")
    dets = detections if detections is not None else Detections.empty()
    for y0 in tile_offsets(h, tile_size, mode):
        for x0 in tile_offsets(w, tile_size, mode):
            kept, ignore = assign_boxes(dets, x0, y0, tile_size, tile_size, min_inside)
            pix = image[y0 : y0 + tile_size, x0 : x0 + tile_size]
            vf = 1.0 if valid is None else float(valid[y0 : y0 + tile_size, x0 : x0 + tile_size].mean())
            yield Tile(x0, y0, np.ascontiguousarray(pix), kept, ignore, vf)
