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
from pathlib import Path

import cv2
import numpy as np

from aerosynth.data.detections import Detections, box_iou
from aerosynth.data.errors import InputError

Predictor = Callable[[list[np.ndarray]], list[Detections]]
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


def _cut_mask(dets: Detections, x0: int, y0: int, tile: int, width: int, height: int) -> np.ndarray:
    """Boxes (window pixels) touching a window edge that is not the raster border."""
    b = dets.xyxy
    cut = np.zeros(len(dets), bool)
    if x0 > 0:
        cut |= b[:, 0] <= EDGE_PX
    if y0 > 0:
        cut |= b[:, 1] <= EDGE_PX
    if x0 + tile < width:
        cut |= b[:, 2] >= tile - EDGE_PX
    if y0 + tile < height:
        cut |= b[:, 3] >= tile - EDGE_PX
    return cut


def merge_boxes(dets: Detections, cut: np.ndarray | None = None, iou: float = 0.5, ios: float = 0.7) -> Detections:
    """Greedy NMS over boxes from overlapping windows (class-agnostic).

    Args:
        dets: boxes with confidences, raster pixels.
        cut: per box, whether it touches an inner window edge (ranked after complete boxes).
        iou: suppress a box whose IoU with a kept box exceeds this.
        ios: suppress a box whose intersection over the smaller area with a kept box exceeds this.
    """
    n = len(dets)
    if n == 0:
        return dets
    conf = dets.confidence if dets.confidence is not None else np.ones(n)
    cut = np.zeros(n, bool) if cut is None else np.asarray(cut, bool)
    order = np.lexsort((-conf, cut))  # complete boxes first, then by confidence
    area = dets.area
    ious = box_iou(dets.xyxy, dets.xyxy)
    inter = ious * (area[:, None] + area[None, :]) / (1 + ious)
    smaller = np.maximum(np.minimum(area[:, None], area[None, :]), 1e-12)
    same = (ious > iou) | (inter / smaller > ios)
    suppressed = np.zeros(n, bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= same[i]
    return dets[np.array(sorted(keep), dtype=np.int64)]


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


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
    parts: list[Detections] = []
    cuts: list[np.ndarray] = []
    for chunk in _batches(origins, batch):
        results = predictor([_crop(rgb, x, y, tile) for x, y in chunk])
        if len(results) != len(chunk):
            raise RuntimeError(f"predictor returned {len(results)} results for {len(chunk)} windows")
        for (x, y), dets in zip(chunk, results, strict=True):
            if len(dets) == 0:
                continue
            if dets.confidence is None:
                dets = Detections(dets.xyxy, np.ones(len(dets)), dets.class_id)
            cuts.append(_cut_mask(dets, x, y, tile, width, height))
            parts.append(dets.translate(x, y))
    if not parts:
        return Detections.empty(with_confidence=True)
    merged_in = Detections.merge(parts)
    merged = merge_boxes(merged_in, np.concatenate(cuts), iou, ios).clip(width, height)
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
        gsd = json.loads(manifest.read_text()).get("gsd")
    except ValueError:
        return None
    return None if gsd is None else float(gsd)


def detect_raster(
    raster_path: str | Path,
    model_path: str | Path,
    out_geojson: str | Path,
    tile: int = 128,
    overlap: int = 32,
    conf: float = 0.25,
    target_gsd: float | None = None,
    bands: list[int] | None = None,
    iou: float = 0.5,
    to_wgs84: bool = False,
    device: str = "cpu",
    predictor: Predictor | None = None,
) -> int:
    """Detect vehicles over a GeoTIFF and write them as GeoJSON polygons; return their number.

    Args:
        raster_path: the raster (three bands, or choose ``bands``).
        model_path: a trained detector ``.pt`` (ignored when ``predictor`` is given).
        out_geojson: output file, in the raster's CRS (WGS84 with ``to_wgs84``).
        tile: window size in (resampled) pixels; the detector's input size.
        overlap: overlap between neighbouring windows.
        conf: lowest confidence kept.
        target_gsd: the detector's GSD in m/px; the raster is resampled to it first (needs a CRS).
            ``None``: the ``gsd`` recorded in the ``detector.json`` next to the model, when there is one.
        bands: 1-based band selection passed to :func:`aerosynth.data.rasters.read_raster`.
        iou: merge threshold (see :func:`merge_boxes`).
        to_wgs84: write longitude/latitude instead of the raster's CRS.
        device: inference device.
        predictor: a stand-in for the model (windows in, detections out), for tests and other detectors.

    Raises:
        InputError: unreadable raster, no CRS, bad window settings, missing model.
    """
    from aerosynth.data.geo import detections_to_geojson, write_geojson
    from aerosynth.data.rasters import read_raster

    raster = read_raster(raster_path, bands)
    if raster.crs is None or raster.transform is None:
        raise InputError(raster_path, "raster has no CRS/transform: GeoJSON output needs one")
    rgb, valid = raster.rgb, raster.valid
    if target_gsd is None and predictor is None:
        target_gsd = detector_gsd(model_path)
    factor = 1.0
    if target_gsd is not None:
        if target_gsd <= 0:
            raise InputError("target_gsd", f"must be positive, got {target_gsd}")
        if raster.gsd is None:
            raise InputError(raster_path, "raster GSD unknown: cannot resample to target_gsd")
        factor = raster.gsd / target_gsd
        if abs(factor - 1) > 1e-3:
            rgb, valid = _resample(rgb, valid, factor)
    if predictor is None:
        from aerosynth.detection.prediction import load_model, predict

        load_model(model_path)  # fail early on a missing file
        predictor = functools.partial(predict, model_path, conf=conf, imgsz=tile, max_det=300, device=device)
    dets = detect_array(rgb, predictor, tile, overlap, valid, iou).filter_confidence(conf)
    if factor != 1.0:
        sx = raster.width / rgb.shape[1]
        sy = raster.height / rgb.shape[0]
        dets = dets.scale(sx, sy).clip(raster.width, raster.height)
    names = ["vehicle"] if not np.any(dets.class_id) else None
    doc = detections_to_geojson(dets, raster.transform, raster.crs, to_wgs84=to_wgs84, class_names=names)
    write_geojson(out_geojson, doc)
    return len(dets)
