"""Sliced detection over a large raster, written as GeoJSON in the raster's CRS.

The raster (read by :func:`aerosynth.data.rasters.read_raster`, 8-bit RGB) is optionally resampled to the
detector's ground sampling distance, cut into overlapping square windows (the last row and
column of windows are shifted back so that they end at the border; a raster smaller than a
window is padded), each window goes through the detector, and the boxes, moved to raster pixels,
are merged by a greedy NMS. Two boxes are the same vehicle when their IoU exceeds ``iou`` or
when the smaller lies mostly inside the larger (intersection over the smaller area above
``ios``): a vehicle cut by a window edge leaves a partial box that plain IoU would keep. Boxes
touching an inner window edge rank after complete boxes. Windows that are entirely nodata are
skipped. The boxes are converted with :func:`aerosynth.data.geo.detections_to_geojson` (pixel corner
convention of the raster's affine transform).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError

Predictor = Callable[[list[np.ndarray]], list[Detections]]
#: A block as read: its RGB pixels, their top-left corner ``(x0, y0)``, the corners of its windows to run.
BlockPixels = tuple[np.ndarray, tuple[int, int], list[tuple[int, int]]]
EDGE_PX = 2.0  # a box this close to an inner window edge is "cut"


def window_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` pixels with ``overlap`` along one axis, covering ``length``."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise InputError("overlap", f"need 0 <= overlap ({overlap}) < tile ({tile})")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def windows(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``(x0, y0)`` of every window, row by row."""
    return [(x, y) for y in window_origins(height, tile, overlap) for x in window_origins(width, tile, overlap)]


def _crop(rgb: np.ndarray, x0: int, y0: int, tile: int) -> np.ndarray:
    crop = rgb[y0 : y0 + tile, x0 : x0 + tile]
    if crop.shape[0] == tile and crop.shape[1] == tile:
        return np.ascontiguousarray(crop)
    out = np.zeros((tile, tile, 3), np.uint8)
    out[: crop.shape[0], : crop.shape[1]] = crop
    return out


def _cut_mask(xyxy: np.ndarray, x0: np.ndarray, y0: np.ndarray, tile: int, width: int, height: int) -> np.ndarray:
    """Boxes (window pixels) touching an edge of their window that is not the raster border.

    Args:
        xyxy: ``(N, 4)`` boxes, each in the pixels of its window.
        x0: ``(N,)`` left edge of each box's window in the raster.
        y0: ``(N,)`` top edge of each box's window.
        tile: window size.
        width: raster width.
        height: raster height.
    """
    return (
        ((x0 > 0) & (xyxy[:, 0] <= EDGE_PX))
        | ((y0 > 0) & (xyxy[:, 1] <= EDGE_PX))
        | ((x0 + tile < width) & (xyxy[:, 2] >= tile - EDGE_PX))
        | ((y0 + tile < height) & (xyxy[:, 3] >= tile - EDGE_PX))
    )


def same_pairs(xyxy: np.ndarray, iou: float = 0.5, ios: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, of boxes that are the same vehicle under the merge rule.

    Boxes are hashed into a grid of cells as large as the largest box side, by their top-left corner;
    only boxes in the same or neighbouring cells can intersect, so time and memory grow with the number
    of boxes times the boxes per neighbourhood, never with its square.

    Args:
        xyxy: ``(N, 4)`` boxes.
        iou: the pair's IoU exceeds this, or
        ios: its intersection over the smaller box's area exceeds this.
    """
    n = len(xyxy)
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n < 2:
        return none
    wh = np.clip(xyxy[:, 2:] - xyxy[:, :2], 0, None)
    size = max(float(wh.max()), 1.0)
    cx = np.floor(xyxy[:, 0] / size).astype(np.int64)
    cy = np.floor(xyxy[:, 1] / size).astype(np.int64)
    cx -= cx.min()
    cy -= cy.min()
    ncols = int(cx.max()) + 3
    key = cy * ncols + cx
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    firsts, seconds = [], []
    for dy, dx in ((0, 0), (0, 1), (1, -1), (1, 0), (1, 1)):
        target = key + dy * ncols + dx
        lo = np.searchsorted(sorted_key, target, "left")
        counts = np.searchsorted(sorted_key, target, "right") - lo
        total = int(counts.sum())
        if total == 0:
            continue
        a = np.repeat(np.arange(n), counts)
        b = order[np.repeat(lo, counts) + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)]
        if dy == 0 and dx == 0:
            a, b = a[a < b], b[a < b]
        firsts.append(a)
        seconds.append(b)
    if not firsts:
        return none
    a, b = np.concatenate(firsts), np.concatenate(seconds)
    lt = np.maximum(xyxy[a, :2], xyxy[b, :2])
    rb = np.minimum(xyxy[a, 2:], xyxy[b, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = wh[:, 0] * wh[:, 1]
    union = area[a] + area[b] - inter
    ious = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    smaller = np.maximum(np.minimum(area[a], area[b]), 1e-12)
    same = (inter > 0) & ((ious > iou) | (inter / smaller > ios))
    a, b = a[same], b[same]
    swap = a > b
    return np.where(swap, b, a), np.where(swap, a, b)


def _greedy(n: int, order: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Keep mask of the greedy pass over ``order``: a box is kept unless a kept box earlier in order is the same."""
    keep = np.ones(n, bool)
    if len(a) == 0:
        return keep
    ends = np.concatenate([a, b])
    others = np.concatenate([b, a])
    by_end = np.argsort(ends, kind="stable")
    others = others[by_end].tolist()
    indptr = np.searchsorted(ends[by_end], np.arange(n + 1)).tolist()
    linked = np.diff(np.asarray(indptr)) > 0
    suppressed = bytearray(n)
    for i in order[linked[order]].tolist():
        if suppressed[i]:
            keep[i] = False
            continue
        for j in others[indptr[i] : indptr[i + 1]]:
            suppressed[j] = 1
    return keep


def _rank(dets: Detections, cut: np.ndarray) -> np.ndarray:
    conf = dets.confidence if dets.confidence is not None else np.ones(len(dets))
    return np.lexsort((-conf, cut))  # complete boxes first, then by confidence


def merge_boxes(dets: Detections, cut: np.ndarray | None = None, iou: float = 0.5, ios: float = 0.7) -> Detections:
    """Greedy NMS over boxes from overlapping windows (class-agnostic).

    Boxes are taken complete ones first, then by confidence; a box is dropped when a box taken before it
    is the same vehicle: IoU above ``iou``, or intersection over the smaller area above ``ios``. Only
    neighbouring boxes are compared (:func:`same_pairs`): memory is linear in the number of boxes.

    Args:
        dets: boxes with confidences, raster pixels.
        cut: per box, whether it touches an inner window edge (ranked after complete boxes).
        iou: suppress a box whose IoU with a kept box exceeds this.
        ios: suppress a box whose intersection over the smaller area with a kept box exceeds this.

    Returns:
        The kept boxes, in their input order.
    """
    n = len(dets)
    if n == 0:
        return dets
    cut = np.zeros(n, bool) if cut is None else np.asarray(cut, bool)
    a, b = same_pairs(dets.xyxy, iou, ios)
    return dets[np.flatnonzero(_greedy(n, _rank(dets, cut), a, b))]


class BoxMerger:
    """:func:`merge_boxes` over a stream of boxes arriving window row by window row.

    :meth:`flush` returns the boxes whose fate is final: those in groups of same-vehicle boxes that lie
    wholly above a frontier (the top of every window still to come; a later box can only start below
    it, so it cannot be the same as any box of such a group). The greedy rule decides within each group
    independently, so the boxes flushed over a whole raster are exactly :func:`merge_boxes` of all of
    them. Memory holds the boxes not yet final: about one row of windows.

    Args:
        iou: as in :func:`merge_boxes`.
        ios: as in :func:`merge_boxes`.
    """

    def __init__(self, iou: float = 0.5, ios: float = 0.7) -> None:
        self.iou, self.ios = iou, ios
        self.pending = Detections.empty(with_confidence=True)
        self.cut = np.zeros(0, bool)

    def add(self, dets: Detections, cut: np.ndarray) -> None:
        """Add boxes (with confidences) and their cut flags."""
        if len(dets):
            self.pending = Detections.merge([self.pending, dets])
            self.cut = np.concatenate([self.cut, np.asarray(cut, bool)])

    def flush(self, frontier: float | None = None) -> Detections:
        """The kept boxes of every group ending at or above ``frontier`` (``None``: all), in arrival order."""
        dets, n = self.pending, len(self.pending)
        if n == 0:
            return dets
        a, b = same_pairs(dets.xyxy, self.iou, self.ios)
        if frontier is None:
            final = np.ones(n, bool)
        else:
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
            count, label = connected_components(graph, directed=False)
            bottom = np.full(count, -np.inf)
            np.maximum.at(bottom, label, dets.xyxy[:, 3])
            final = bottom[label] <= frontier
        index = np.full(n, -1, np.int64)
        index[final] = np.arange(int(final.sum()))
        inside = final[a] & final[b]
        part, part_cut = dets[np.flatnonzero(final)], self.cut[final]
        keep = _greedy(len(part), _rank(part, part_cut), index[a[inside]], index[b[inside]])
        self.pending, self.cut = dets[np.flatnonzero(~final)], self.cut[~final]
        return part[np.flatnonzero(keep)]

    def state(self) -> dict:
        """The pending boxes as JSON-ready lists."""
        d = self.pending
        return {
            "xyxy": d.xyxy.tolist(),
            "confidence": d.confidence.tolist(),
            "class_id": d.class_id.tolist(),
            "cut": self.cut.tolist(),
        }

    def restore(self, state: dict) -> None:
        """Set the pending boxes from :meth:`state`."""
        xyxy, conf = np.array(state["xyxy"], float), np.array(state["confidence"], float)
        self.pending = Detections(xyxy, conf, state["class_id"])
        self.cut = np.array(state["cut"], bool).reshape(-1)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


def _predict_windows(
    rgb: np.ndarray,
    origins: Sequence[tuple[int, int]],
    offset: tuple[int, int],
    predictor: Predictor,
    batch: int,
    tile: int,
    size: tuple[int, int],
    clip_to_window: bool = True,
) -> tuple[Detections, np.ndarray] | None:
    """The predictor's boxes on every window of ``rgb``, in the pixels of the whole image, and their cut flags.

    Args:
        rgb: the pixels read, whose top-left corner is ``offset`` in the whole image.
        origins: window corners in the whole image.
        offset: where ``rgb`` starts in the whole image.
        predictor: RGB windows in, one :class:`Detections` per window out.
        batch: windows per predictor call.
        tile: window size.
        size: ``(width, height)`` of the whole image (a box at its edge is not cut by the window).
        clip_to_window: clip each window's boxes to the window before they are placed.

    Returns:
        ``None`` when no window found a box.
    """
    ox, oy = offset
    parts: list[Detections] = []
    corners: list[tuple[int, int]] = []
    for chunk in _batches(origins, batch):
        results = predictor([_crop(rgb, x - ox, y - oy, tile) for x, y in chunk])
        if len(results) != len(chunk):
            raise RuntimeError(f"predictor returned {len(results)} results for {len(chunk)} windows")
        for corner, dets in zip(chunk, results, strict=True):
            if len(dets) == 0:
                continue
            if dets.confidence is None:
                dets = Detections(dets.xyxy, np.ones(len(dets)), dets.class_id)
            parts.append(dets)
            corners.append(corner)
    if not parts:
        return None
    found = Detections.merge(parts)  # every window's boxes at once: clipped, flagged and placed as one array
    counts = [len(d) for d in parts]
    x0 = np.repeat(np.array([x for x, _ in corners], np.float64), counts)
    y0 = np.repeat(np.array([y for _, y in corners], np.float64), counts)
    xyxy = np.clip(found.xyxy, 0, tile) if clip_to_window else found.xyxy
    cut = _cut_mask(xyxy, x0, y0, tile, *size)
    return Detections(xyxy + np.stack([x0, y0, x0, y0], axis=1), found.confidence, found.class_id), cut


def detect_array(
    rgb: np.ndarray,
    predictor: Predictor,
    tile: int = 128,
    overlap: int = 32,
    valid: np.ndarray | None = None,
    iou: float = 0.5,
    ios: float = 0.7,
    batch: int = 32,
) -> Detections:
    """Sliced detection on an in-memory ``(H, W, 3)`` uint8 image; boxes in its pixels.

    Args:
        rgb: the image.
        predictor: RGB windows in, one :class:`Detections` (window pixels, with confidence) per window out.
        tile: window size.
        overlap: overlap of neighbouring windows in pixels.
        valid: ``(H, W)`` bool; windows without a valid pixel are skipped.
        iou: merge threshold on IoU.
        ios: merge threshold on intersection over the smaller box.
        batch: windows per predictor call.
    """
    height, width = rgb.shape[:2]
    origins = windows(width, height, tile, overlap)
    if valid is not None:
        origins = [(x, y) for x, y in origins if valid[y : y + tile, x : x + tile].any()]
    found = _predict_windows(rgb, origins, (0, 0), predictor, batch, tile, (width, height), clip_to_window=False)
    if found is None:
        return Detections.empty(with_confidence=True)
    merged = merge_boxes(*found, iou, ios).clip(width, height)
    ok = (merged.xyxy[:, 2] > merged.xyxy[:, 0]) & (merged.xyxy[:, 3] > merged.xyxy[:, 1])
    return merged[np.flatnonzero(ok)]


def _resample(rgb: np.ndarray, valid: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = rgb.shape[:2]
    nw, nh = max(int(round(w * factor)), 1), max(int(round(h * factor)), 1)
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    out = cv2.resize(rgb, (nw, nh), interpolation=interp)
    v = cv2.resize(valid.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
    return out, v


def detector_gsd(model_path: str | Path) -> float | None:
    """The training GSD recorded in the ``detector.json`` beside a model, or ``None``."""
    manifest = Path(model_path).with_name("detector.json")
    if not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
        gsd = info.get("gsd", info.get("gsd_m"))  # gsd_m: the detector.json a run hands over
    except (ValueError, AttributeError):
        return None
    return None if gsd is None else float(gsd)


@dataclass
class BlockGrid:
    """The windows of a raster at the detector's GSD, grouped into square blocks of windows.

    Attributes:
        width: raster width at the detector's GSD (pixels).
        height: raster height at the detector's GSD.
        tile: window size.
        overlap: overlap of neighbouring windows.
        block: windows per block side; a block is read, resampled and detected as one piece.
        xs: window left edges.
        ys: window top edges.
    """

    width: int
    height: int
    tile: int
    overlap: int
    block: int
    xs: list[int] = field(init=False)
    ys: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if self.block < 1:
            raise InputError("block", f"must be at least 1 window, got {self.block}")
        self.xs = window_origins(self.width, self.tile, self.overlap)
        self.ys = window_origins(self.height, self.tile, self.overlap)

    @property
    def rows(self) -> int:
        """Block rows."""
        return -(-len(self.ys) // self.block)

    @property
    def cols(self) -> int:
        """Blocks per block row."""
        return -(-len(self.xs) // self.block)

    @property
    def windows(self) -> int:
        """Windows in all."""
        return len(self.xs) * len(self.ys)

    def block_windows(self, row: int, col: int) -> list[tuple[int, int]]:
        """``(x0, y0)`` of the windows of a block, row by row."""
        b = self.block
        return [(x, y) for y in self.ys[row * b : (row + 1) * b] for x in self.xs[col * b : (col + 1) * b]]

    def frontier(self, row: int) -> float | None:
        """Top of the first window after block row ``row`` (``None`` after the last)."""
        nxt = (row + 1) * self.block
        return float(self.ys[nxt]) if nxt < len(self.ys) else None


def read_block(source, grid: BlockGrid, row: int, col: int) -> BlockPixels:
    """Read (and resample) the pixels of one block, and find its windows that hold a valid pixel.

    Args:
        source: an :class:`aerosynth.data.rasters.RasterSource`.
        grid: the windows.
        row: block row.
        col: block column.

    Returns:
        The block's RGB pixels at the detector's GSD, where they start in the raster at that GSD
        ``(x0, y0)``, and the ``(x, y)`` corners of the block's windows with a valid pixel, row by row.
    """
    wins = grid.block_windows(row, col)
    tile = grid.tile
    x0, y0 = wins[0]
    x1 = min(wins[-1][0] + tile, grid.width)
    y1 = min(wins[-1][1] + tile, grid.height)
    sx, sy = source.width / grid.width, source.height / grid.height
    rgb, valid = source.read(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy, out_shape=(y1 - y0, x1 - x0))
    wins = [(x, y) for x, y in wins if valid[y - y0 : y - y0 + tile, x - x0 : x - x0 + tile].any()]
    return rgb, (x0, y0), wins


def _detect_pixels(
    pixels: BlockPixels, grid: BlockGrid, predictor: Predictor, batch: int
) -> tuple[Detections, np.ndarray, int]:
    """:func:`detect_block` on a block's pixels from :func:`read_block`."""
    rgb, origin, wins = pixels
    found = _predict_windows(rgb, wins, origin, predictor, batch, grid.tile, (grid.width, grid.height))
    if found is None:
        return Detections.empty(with_confidence=True), np.zeros(0, bool), len(wins)
    return *found, len(wins)


def detect_block(
    source, grid: BlockGrid, row: int, col: int, predictor: Predictor, batch: int = 32, threads: int | None = None
) -> tuple[Detections, np.ndarray, int]:
    """Detect in one block: read (and resample) its pixels, run its windows, return their boxes.

    Args:
        source: an :class:`aerosynth.data.rasters.RasterSource`.
        grid: the windows.
        row: block row.
        col: block column.
        predictor: windows in, detections (window pixels) out.
        batch: windows per predictor call.
        threads: torch threads to use (in a worker process), or ``None`` to leave them.

    Returns:
        Boxes in pixels of the raster at the detector's GSD, each clipped to its window, with
        confidences; their cut flags; the number of windows run (windows without valid pixels are skipped).
    """
    if threads:
        _use_threads(threads)
    return _detect_pixels(read_block(source, grid, row, col), grid, predictor, batch)


#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Largest buffer glibc keeps in its heap for reuse while detection runs here (its adaptive limit on 64-bit
#: systems); the heap top is handed back to the system beyond twice that, as glibc's own rule does.
HEAP_REUSE_BYTES = 32 * 2**20


@functools.cache
def _steady_heap() -> bool:
    """Let glibc reuse the buffers that every block and forward pass frees instead of unmapping them.

    Each batch allocates and frees activations of several MiB, and GDAL's block cache frees and allocates
    whole blocks. glibc's default serves buffers over a threshold (128 kiB at first, rising only as large
    ones are freed; fixed at 128 kiB when the environment sets ``MALLOC_TRIM_THRESHOLD_``, as Dask's nanny
    does for its workers) with fresh memory maps, and trims the top of its heap beyond twice that: the
    memory goes back to the kernel after a batch and is faulted in, page by page and zeroed, in the next
    one, as system time. Fixing the thresholds at :data:`HEAP_REUSE_BYTES` and twice that keeps these
    buffers in the heap; no result changes. Set once per process; nothing where the C library is not glibc.

    Returns:
        Whether the thresholds are set.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, HEAP_REUSE_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, 2 * HEAP_REUSE_BYTES)
        )
    except (OSError, AttributeError):
        return False


def _use_threads(threads: int) -> None:
    """Use ``threads`` threads for torch and OpenCV in this process (a Dask worker: one each, one worker per core)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if cv2.getNumThreads() != threads:
        cv2.setNumThreads(threads)


def _job_key(source, model_path: str | Path | None, settings: dict[str, Any], predictor_given: bool) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the state."""
    files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime] for p in source.files]
    model = None
    if not predictor_given and model_path is not None and Path(model_path).is_file():
        model = [str(Path(model_path).resolve()), Path(model_path).stat().st_mtime]
    return {"files": files, "model": model, **settings}


def _read_ahead_results(
    source, grid: BlockGrid, jobs: Sequence[tuple[int, int]], predictor: Predictor, batch: int
) -> Iterator[tuple[int, int, tuple[Detections, np.ndarray, int]]]:
    """``(row, col, detect_block(...))`` for each job in this process, reading one block ahead.

    While the detector runs on a block, a second thread reads the next one (GDAL decodes and resamples
    without holding the GIL), so reading takes no time from the detector's thread where a core is free.
    Only that thread touches ``source`` meanwhile; blocks come out in order, the same as reading each one
    when it is detected. An error reading a block is raised where that block's result would be. Closing
    the generator waits for the block being read. The process' heap is made steady (:func:`_steady_heap`).
    """
    from concurrent.futures import ThreadPoolExecutor

    if not jobs:
        return
    _steady_heap()  # the detector runs in this process
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aerosynth-read")
    try:
        ahead = pool.submit(read_block, source, grid, *jobs[0])
        for i, (r, c) in enumerate(jobs):
            pixels = ahead.result()
            if i + 1 < len(jobs):
                ahead = pool.submit(read_block, source, grid, *jobs[i + 1])
            yield r, c, _detect_pixels(pixels, grid, predictor, batch)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _block_results(
    source,
    grid: BlockGrid,
    first_row: int,
    predictor: Predictor,
    batch: int,
    client=None,
    own_workers: bool = False,
) -> Iterator[tuple[int, int, tuple[Detections, np.ndarray, int]]]:
    """``(row, col, detect_block(...))`` for every block from ``first_row`` on, in row-major order.

    In this process (no ``client``), the next block is read while the detector runs
    (:func:`_read_ahead_results`). On Dask, each task is a whole block (``block`` x ``block`` windows, a
    few forward passes of ``batch`` windows), so scheduling costs little beside it; workers use one torch
    and OpenCV thread each, and a predictor that loads a model
    (:class:`aerosynth.detection.prediction.WindowPredictor`) loads it once per worker process, before the
    first block is submitted, and keeps it. Workers started for this run (``own_workers``) also get
    steady heap settings (:func:`_steady_heap`).
    """
    jobs = [(r, c) for r in range(first_row, grid.rows) for c in range(grid.cols)]
    if client is None:
        yield from _read_ahead_results(source, grid, jobs, predictor, batch)
        return
    from collections import deque

    workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    client.run(_prepare_worker, predictor, own_workers)
    src, pred = client.scatter([source, predictor], broadcast=True)
    queue: deque = deque()
    todo = iter(jobs)
    for r, c in todo:
        queue.append((r, c, client.submit(detect_block, src, grid, r, c, pred, batch, 1, pure=False)))
        if len(queue) >= 3 * workers:
            break
    while queue:
        r, c, fut = queue.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            queue.append((*nxt, client.submit(detect_block, src, grid, *nxt, pred, batch, 1, pure=False)))
        yield r, c, fut.result()


def _prepare_worker(predictor: Predictor, steady_heap: bool = False) -> None:
    """On a Dask worker: one torch and OpenCV thread, and the predictor's model loaded (when it has one).

    Args:
        predictor: the window predictor the worker will run.
        steady_heap: also fix the worker's heap thresholds (:func:`_steady_heap`); for workers started by
            this run, not those of a cluster given by address.
    """
    _use_threads(1)
    if steady_heap:
        _steady_heap()
    load = getattr(predictor, "load", None)
    if callable(load):
        load()


@contextmanager
def _dask_client(workers: int, address: str | None):
    if not workers and not address:
        yield None
        return
    from distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            yield client
        return
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


def detect_raster(
    raster_path: str | Path | Sequence[str | Path],
    model_path: str | Path,
    out_path: str | Path,
    tile: int = 128,
    overlap: int = 32,
    conf: float = 0.25,
    target_gsd: float | None = None,
    bands: list[int] | None = None,
    iou: float = 0.5,
    to_wgs84: bool = False,
    device: str = "cpu",
    predictor: Predictor | None = None,
    ios: float = 0.7,
    block: int = 8,
    batch: int = 32,
    workers: int = 0,
    dask_address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Detect vehicles over a raster of any size, streaming them to a vector file; return their number.

    The raster is read block by block (:class:`aerosynth.data.rasters.RasterSource`: a GeoTIFF or COG,
    a ``.vrt``, a folder or a list of files on one grid), each block resampled to the detector's GSD
    as it is read; blocks run in row-major order, in this process (the next block read in a second
    thread while the detector runs, :func:`_read_ahead_results`) or on Dask workers. Boxes are
    merged by :class:`BoxMerger` in this process and written as soon as no later window can
    touch them (:mod:`aerosynth.detection.vector_output`). After every block row the output stream
    and a state file (``OUT.state.json``: rows done and the boxes still pending) are saved: a rerun of
    the same job continues from there and ends with the same features. Memory holds a block and
    about one block row of boxes, whatever the raster's size.

    Args:
        raster_path: the raster(s) (three bands, or choose ``bands``).
        model_path: a trained detector ``.pt`` (ignored when ``predictor`` is given).
        out_path: output file: ``.geojson``, ``.geojsonl``/``.jsonl``, ``.gpkg`` or ``.fgb``; in the
            raster's CRS (WGS84 with ``to_wgs84``).
        tile: window size in (resampled) pixels; the detector's input size.
        overlap: overlap between neighbouring windows.
        conf: lowest confidence kept.
        target_gsd: the detector's GSD in m/px; blocks are resampled to it (needs a CRS).
            ``None``: the ``gsd`` recorded in the ``detector.json`` next to the model, when there is one.
        bands: 1-based band selection.
        iou: merge threshold (see :func:`merge_boxes`).
        to_wgs84: write longitude/latitude instead of the raster's CRS.
        device: inference device.
        predictor: a stand-in for the model (windows in, detections out), for tests and other detectors.
        ios: merge threshold on intersection over the smaller box.
        block: windows per block side.
        batch: windows per predictor call.
        workers: run blocks on this many local Dask worker processes (0: in this process).
        dask_address: run blocks on the Dask scheduler at this address.
        progress: called with ``(windows done, windows in all)`` after each block.

    Raises:
        InputError: unreadable raster, no CRS, bad window settings, missing model, unknown output
            format, out of memory, output not writable.
    """
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.rasters import RasterSource
    from aerosynth.detection.vector_output import FeatureStream, check_output_format

    out_path = Path(out_path)
    check_output_format(out_path)
    source = RasterSource(raster_path, bands)
    if source.crs is None or source.transform is None:
        raise InputError(source.where, "raster has no CRS/transform: vector output needs one")
    if target_gsd is None and predictor is None:
        target_gsd = detector_gsd(model_path)
    factor = 1.0
    if target_gsd is not None:
        if target_gsd <= 0:
            raise InputError("target_gsd", f"must be positive, got {target_gsd}")
        if source.gsd is None:
            raise InputError(source.where, "raster GSD unknown: cannot resample to target_gsd")
        factor = source.gsd / target_gsd
    width, height = source.width, source.height
    if abs(factor - 1) > 1e-3:
        width, height = max(int(round(width * factor)), 1), max(int(round(height * factor)), 1)
    grid = BlockGrid(width, height, tile, overlap, block)
    predictor_given = predictor is not None
    if predictor is None:
        from aerosynth.detection import prediction

        if workers or dask_address:
            prediction.check_detector_file(model_path)  # fail early; the workers load the model
        else:
            prediction.load_model(model_path)  # fail early on a missing or unreadable file
        model = str(Path(model_path).resolve())  # the same file for workers in another folder
        predictor = prediction.WindowPredictor(model, conf=conf, imgsz=tile, max_det=300, device=device)

    settings = {"tile": tile, "overlap": overlap, "conf": conf, "size": [width, height], "bands": source.bands}
    settings.update({"iou": iou, "ios": ios, "wgs84": to_wgs84, "block": block})
    job = _job_key(source, model_path, settings, predictor_given)
    state_path = out_path.with_name(out_path.name + ".state.json")
    stream_path = out_path.with_name(out_path.name + ".stream.geojsonl")
    state = _read_state(state_path) if stream_path.is_file() else None
    if state is not None and state.get("job") != job:
        state = None  # another job wrote it: start over
    merger = BoxMerger(iou, ios)
    first_row, windows_done, written = 0, 0, 0
    if state is not None:
        merger.restore(state["pending"])
        first_row, windows_done, written = state["rows_done"], state["windows_done"], state["features"]
    sx, sy = source.width / width, source.height / height
    stream = FeatureStream(stream_path, source.transform, source.crs, to_wgs84, state["stream_bytes"] if state else 0)

    def emit(final: Detections) -> int:
        final = final.clip(width, height)
        ok = (final.xyxy[:, 2] > final.xyxy[:, 0]) & (final.xyxy[:, 3] > final.xyxy[:, 1])
        final = final[np.flatnonzero(ok)].filter_confidence(conf)
        if (sx, sy) != (1.0, 1.0):
            final = final.scale(sx, sy).clip(source.width, source.height)
        stream.write(final)
        return len(final)

    try:
        with (
            stream,
            _dask_client(workers, dask_address) as client,
            closing(_block_results(source, grid, first_row, predictor, batch, client, not dask_address)) as blocks,
        ):  # closing: a block still being read ahead is waited for, whatever ends the loop
            row_left = grid.cols
            for row, col, (dets, cut, _ran) in blocks:
                merger.add(dets, cut)
                windows_done += len(grid.block_windows(row, col))
                if progress is not None:
                    progress(windows_done, grid.windows)
                row_left -= 1
                if row_left:
                    continue
                row_left = grid.cols
                written += emit(merger.flush(grid.frontier(row)))
                checkpoint = {"job": job, "rows_done": row + 1, "windows_done": windows_done, "features": written}
                checkpoint["stream_bytes"] = stream.checkpoint()
                checkpoint["pending"] = merger.state()
                atomic_write_json(state_path, checkpoint)
            written += emit(merger.flush())
            stream.checkpoint()
    except MemoryError:
        raise InputError(out_path, "out of memory (rerun to resume; a smaller --block needs less)") from None
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise InputError(out_path, f"cannot write ({reason}); rerun to resume from the last block row") from None
    from aerosynth.detection.vector_output import finish_output

    finish_output(stream_path, out_path, source.crs, to_wgs84)
    state_path.unlink(missing_ok=True)
    return written


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "rows_done" in state else None
