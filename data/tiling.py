"""GSD resampling and fixed-size tiles with the 50 %-inside box rule.

:func:`resample` resizes a whole image with OpenCV; :func:`axis_taps` and :func:`resample_window` give any
window of that same resampling from the source pixels under it (a raster cut window by window).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from affine import Affine

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError


def resample_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``(round(W * scale), round(H * scale))``, at least 1: the size :func:`resample` gives."""
    if scale <= 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be positive, got {scale}")
    return max(1, round(width * scale)), max(1, round(height * scale))


def resample(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize by ``scale`` to ``round(W * scale) x round(H * scale)``.

    Area resampling when shrinking, Lanczos when enlarging, nothing when ``scale == 1``.
    """
    h, w = image.shape[:2]
    nw, nh = resample_size(w, h, scale)
    if (nw, nh) == (w, h):
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4
    return cv2.resize(image, (nw, nh), interpolation=interp)


def _area_taps(src_len: int, out: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    # OpenCV's INTER_AREA table: the source span [i * ratio, (i + 1) * ratio) of output pixel i, partial
    # pixels at its ends weighted by their overlap (overlaps under 1e-3 px dropped, as OpenCV does)
    f1 = out * ratio
    f2 = f1 + ratio
    cell = np.minimum(ratio, src_len - f1)
    s2 = np.minimum(np.floor(f2).astype(np.int64), src_len - 1)
    s1 = np.minimum(np.ceil(f1).astype(np.int64), s2)
    index = (s1 - 1)[:, None] + np.arange(math.ceil(ratio) + 2)
    weight = np.where((index >= s1[:, None]) & (index < s2[:, None]), 1.0 / cell[:, None], 0.0)
    left = s1 - f1
    weight[:, 0] = np.where(left > 1e-3, left / cell, 0.0)
    right = f2 - s2
    at_right = (index == s2[:, None]) & (right > 1e-3)[:, None]
    weight = np.where(at_right, (np.minimum(np.minimum(right, 1.0), cell) / cell)[:, None], weight)
    return index, weight


#: OpenCV's fixed point for 8-bit Lanczos weights (``INTER_RESIZE_COEF_BITS``).
_COEF_BITS = 11
_S45 = math.sqrt(0.5)
_LANCZOS_CS = np.array([(1, 0), (-_S45, -_S45), (0, 1), (_S45, -_S45), (-1, 0), (_S45, _S45), (0, -1), (-_S45, _S45)])


def _lanczos_taps(out: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    # OpenCV's INTER_LANCZOS4 for 8-bit images: 8 taps around the centre (i + 0.5) * ratio - 0.5, the
    # weights computed in single precision and rounded to 11-bit fixed point, step by step as OpenCV does
    centre = ((out + 0.5) * ratio - 0.5).astype(np.float32)
    first = np.floor(centre).astype(np.int64)
    x = centre - first.astype(np.float32)
    index = (first - 3)[:, None] + np.arange(8)
    y0 = -(x + np.float32(3)).astype(np.float64) * math.pi * 0.25
    s0, c0 = np.sin(y0)[:, None], np.cos(y0)[:, None]
    t = (x + np.float32(3))[:, None] - np.arange(8, dtype=np.float32)
    y = -t.astype(np.float64) * math.pi * 0.25
    with np.errstate(divide="ignore", invalid="ignore"):
        c = ((_LANCZOS_CS[:, 0] * s0 + _LANCZOS_CS[:, 1] * c0) / (y * y)).astype(np.float32)
    c = np.where(np.abs(t) >= np.float32(1e-6), c, np.float32(1e30))
    total = c[:, 0].copy()
    for k in range(1, 8):
        total += c[:, k]
    c *= (np.float32(1) / total)[:, None]
    return index, np.rint(c * np.float32(1 << _COEF_BITS)).astype(np.int64)


@dataclass(frozen=True)
class AxisTaps:
    """Source pixels and weights of a run of output pixels along one axis (:func:`axis_taps`).

    Attributes:
        index: ``(n, k)`` source pixels of each output pixel.
        weight: ``(n, k)`` their weights (Lanczos: integers, in units of ``2 ** -11``).
        ratio: source pixels per output pixel (OpenCV's scale).
    """

    index: np.ndarray
    weight: np.ndarray
    ratio: float

    @property
    def span(self) -> tuple[int, int]:
        """The source pixels read: ``(first, one past the last)``."""
        return int(self.index.min()), int(self.index.max()) + 1


def axis_taps(src_len: int, out_len: int, start: int, stop: int, enlarge: bool) -> AxisTaps:
    """Source pixels and weights of output pixels ``start .. stop - 1`` of one axis of :func:`resample`.

    The tables OpenCV builds for the whole image (area when shrinking, Lanczos with 8 taps when
    enlarging, source pixels past the image's edges replaced by the edge pixel), restricted to the pixels
    asked for, so that a window of the resampled image can be made from the source window under it
    (:func:`resample_window`) with the pixels :func:`resample` gives for 8-bit images.

    Args:
        src_len: source image size along the axis.
        out_len: resampled size along the axis.
        start: first output pixel.
        stop: one past the last output pixel.
        enlarge: Lanczos (``scale >= 1`` in :func:`resample`) rather than area.

    Returns:
        The taps: output pixel ``start + i`` is ``sum(weight[i] * source[index[i]])``.
    """
    out = np.arange(start, stop, dtype=np.int64)
    ratio = 1.0 / (out_len / src_len)  # OpenCV's scale
    if out_len == src_len:
        return AxisTaps(out[:, None], np.full((len(out), 1), 1 << _COEF_BITS if enlarge else 1.0), ratio)
    index, weight = _lanczos_taps(out, ratio) if enlarge else _area_taps(src_len, out, ratio)
    return AxisTaps(np.clip(index, 0, src_len - 1), weight, ratio)


def resample_window(window: np.ndarray, rows: AxisTaps, cols: AxisTaps, origin: tuple[int, int]) -> np.ndarray:
    """Resample a window of source pixels with the taps of :func:`axis_taps` (columns first, as OpenCV).

    Args:
        window: ``(H, W)`` or ``(H, W, C)`` uint8 source pixels; they must hold every pixel the taps name.
        rows: :func:`axis_taps` of the output rows.
        cols: :func:`axis_taps` of the output columns.
        origin: ``(row, col)`` of the window's top-left pixel in the source image.

    Returns:
        The output pixels (uint8, rounded to nearest as OpenCV rounds).
    """
    tail = (1,) * (window.ndim - 2)
    ri, rw, ci, cw = rows.index - origin[0], rows.weight, cols.index - origin[1], cols.weight
    fixed = rw.dtype.kind == "i"  # Lanczos: OpenCV's integer arithmetic; area: its single-precision sums
    kind = np.int64 if fixed else np.float32
    across = np.zeros((window.shape[0], ci.shape[0], *window.shape[2:]), kind)
    part = np.empty_like(across)
    for k in range(ci.shape[1]):
        np.multiply(np.take(window, ci[:, k], axis=1), cw[:, k].astype(kind).reshape(1, -1, *tail), out=part)
        across += part
    down = np.zeros((ri.shape[0], *across.shape[1:]), kind)
    part = np.empty_like(down)
    for k in range(ri.shape[1]):
        np.multiply(np.take(across, ri[:, k], axis=0), rw[:, k].astype(kind).reshape(-1, 1, *tail), out=part)
        down += part
    if fixed:
        down = (down + (1 << (2 * _COEF_BITS - 1))) >> (2 * _COEF_BITS)
    elif rows.ratio == 2 and cols.ratio == 2 and (window.ndim == 2 or window.shape[-1] in (1, 3, 4)):
        down = np.floor(down + 0.5)  # OpenCV's 2x2 average rounds halves up
    else:
        down = np.rint(down)
    return np.clip(down, 0, 255).astype(np.uint8)


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
