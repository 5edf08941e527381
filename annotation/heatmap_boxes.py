"""The direct method: vehicle boxes read straight out of a cross-attention heat map.

Steps, for one ``(H, W)`` map with values in ``[0, 1]``:

0. optional bicubic resampling by an integer factor (``upsample``): cross-attention maps are
   coarse (16 x 16 for a 128 px tile), and boxes read off the raw grid are quantised to 8 px,
   too coarse for IoU 0.5 on 2 x 4 m vehicles; values are clipped back to ``[0, 1]``;
1. optional Gaussian smoothing (``smooth_sigma_px``);
2. a threshold: ``fixed`` (an absolute value), ``max_fraction`` (a fraction of the map's
   maximum) or ``otsu`` (Otsu's between-class variance on a 256-bin histogram), never
   below ``min_threshold``;
3. 8-connected components of the pixels at or above the threshold (``scipy.ndimage``);
   with ``split_peaks`` a component holding several local maxima at least
   ``peak_min_distance_px`` apart is split between them (each pixel goes to its nearest
   peak), so that two parked cars touching in the map give two boxes;
4. a component (or part) smaller than ``min_area_px`` or larger than ``max_area_px``
   pixels is dropped;
5. one box per component: its tight pixel box (``box_mode="component"``), or a square of
   ``box_side_m`` metres centred on its peak pixel (``box_mode="fixed"``; AGenDA uses
   5.3 m, i.e. 42.4 px at 0.125 m/px);
6. confidence = the peak (or mean) heat of the component; boxes clipped to the image,
   then non-maximum suppression.

Pixel convention (as :mod:`aerosynth.data.detections`): the top-left pixel's corner is ``(0, 0)``,
so a component covering columns ``c0..c1`` gives ``x1 = c0, x2 = c1 + 1`` and a peak at
``(row, col)`` is centred at ``(col + 0.5, row + 0.5)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from aerosynth.data.detections import Detections, nms
from aerosynth.data.errors import InputError

THRESHOLD_MODES = ("fixed", "max_fraction", "otsu")
BOX_MODES = ("component", "fixed")
CONFIDENCE_MODES = ("peak", "mean")

#: AGenDA's fixed vehicle box side in metres.
AGENDA_BOX_SIDE_M = 5.3


@dataclass
class HeatmapBoxConfig:
    """How :func:`boxes_from_heatmap` turns a heat map into boxes.

    Attributes:
        threshold_mode: ``fixed``, ``max_fraction`` or ``otsu``.
        threshold: the absolute threshold of ``fixed`` mode (map values are in ``[0, 1]``).
        max_fraction: the fraction of the map's maximum used by ``max_fraction`` mode.
        min_threshold: floor under any adaptive threshold (a flat, weak map gives nothing).
        upsample: bicubic resampling factor of the map before anything else (1 = none).
        smooth_sigma_px: Gaussian smoothing before thresholding (0 = none).
        split_peaks: split components between their local maxima.
        peak_min_distance_px: minimal distance between two peaks of one component, in pixels
            of the map as given (scaled by ``upsample``).
        box_mode: ``component`` (tight box) or ``fixed`` (square centred on the peak).
        box_side_m: side of a fixed box in metres (converted with the GSD).
        min_area_px: smallest component (pixels) that makes a box.
        max_area_px: largest component (pixels) that makes a box; ``None`` = no limit.
        confidence: ``peak`` or ``mean`` heat of the component.
        nms_iou: IoU of the final non-maximum suppression; ``None`` = none.
        max_boxes: keep at most this many boxes (highest confidence first); ``None`` = all.
        view: which heat map of a synthetic set to read (``cars``, ``V1``, ``foreground``,
            ``cars*foreground``); used by :func:`annotate_direct`.
        raw_maps: read ``maps/*.npy`` instead of the 8-bit heat-map PNGs.
    """

    threshold_mode: str = "max_fraction"
    threshold: float = 0.5
    max_fraction: float = 0.5
    min_threshold: float = 0.0
    upsample: int = 1
    smooth_sigma_px: float = 0.0
    split_peaks: bool = False
    peak_min_distance_px: int = 8
    box_mode: str = "component"
    box_side_m: float = AGENDA_BOX_SIDE_M
    min_area_px: int = 4
    max_area_px: int | None = None
    confidence: str = "peak"
    nms_iou: float | None = 0.5
    max_boxes: int | None = None
    view: str = "cars"
    raw_maps: bool = False

    def validate(self) -> HeatmapBoxConfig:
        """Raise :class:`InputError` naming the first bad field."""
        checks = [
            ("threshold_mode", self.threshold_mode in THRESHOLD_MODES, f"one of {THRESHOLD_MODES}"),
            ("box_mode", self.box_mode in BOX_MODES, f"one of {BOX_MODES}"),
            ("confidence", self.confidence in CONFIDENCE_MODES, f"one of {CONFIDENCE_MODES}"),
            ("threshold", 0.0 <= self.threshold <= 1.0, "in [0, 1]"),
            ("max_fraction", 0.0 < self.max_fraction <= 1.0, "in (0, 1]"),
            ("min_threshold", 0.0 <= self.min_threshold <= 1.0, "in [0, 1]"),
            ("upsample", isinstance(self.upsample, int) and 1 <= self.upsample <= 16, "an integer in [1, 16]"),
            ("smooth_sigma_px", self.smooth_sigma_px >= 0, ">= 0"),
            ("peak_min_distance_px", self.peak_min_distance_px >= 1, ">= 1"),
            ("box_side_m", self.box_side_m > 0, "> 0"),
            ("min_area_px", self.min_area_px >= 1, ">= 1"),
            ("max_area_px", self.max_area_px is None or self.max_area_px >= self.min_area_px, ">= min_area_px"),
            ("nms_iou", self.nms_iou is None or 0.0 < self.nms_iou <= 1.0, "in (0, 1]"),
            ("max_boxes", self.max_boxes is None or self.max_boxes >= 1, ">= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"HeatmapBoxConfig.{name}", f"got {getattr(self, name)!r}, expected {expected}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in ``[0, 1]`` (the bin edge maximising between-class variance)."""
    v = np.clip(np.asarray(values, dtype=np.float64).ravel(), 0.0, 1.0)
    if v.size == 0 or np.ptp(v) == 0:
        return float(v.max()) if v.size else 1.0
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / v.size
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    mu_t = mu[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    k = int(np.argmax(between))
    return float(edges[k + 1])


def heatmap_threshold(heatmap: np.ndarray, config: HeatmapBoxConfig) -> float:
    """The threshold :func:`boxes_from_heatmap` applies to this map."""
    if config.threshold_mode == "fixed":
        thr = config.threshold
    elif config.threshold_mode == "max_fraction":
        thr = config.max_fraction * float(np.max(heatmap)) if heatmap.size else 1.0
    else:
        thr = otsu_threshold(heatmap)
    return max(float(thr), config.min_threshold)


def _peaks(values: np.ndarray, mask: np.ndarray, min_distance: int) -> np.ndarray:
    """``(K, 2)`` row/col of local maxima of ``values`` inside ``mask`` (one per plateau)."""
    masked = np.where(mask, values, -np.inf)
    size = 2 * min_distance + 1
    is_max = (masked == ndimage.maximum_filter(masked, size=size, mode="constant", cval=-np.inf)) & mask
    plateaus, n = ndimage.label(is_max, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros((0, 2), np.int64)
    # one representative per plateau: its first pixel in raster order
    flat = np.flatnonzero(plateaus.ravel())
    labels = plateaus.ravel()[flat]
    _, first = np.unique(labels, return_index=True)
    rows, cols = np.unravel_index(flat[first], values.shape)
    return np.stack([rows, cols], axis=1)


def _component_parts(
    heat: np.ndarray, comp_mask: np.ndarray, config: HeatmapBoxConfig
) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """The pixel sets (row/col arrays) of one component, split between its peaks if asked.

    Returns:
        A list of ``(pixels, peak)``: ``pixels`` is ``(P, 2)`` row/col, ``peak`` the row/col
        of the part's maximum.
    """
    pix = np.argwhere(comp_mask)
    vals = heat[pix[:, 0], pix[:, 1]]
    if config.split_peaks:
        peaks = _peaks(heat, comp_mask, config.peak_min_distance_px * config.upsample)
    else:
        peaks = np.zeros((0, 2), np.int64)
    if len(peaks) <= 1:
        k = int(np.argmax(vals))
        return [(pix, (int(pix[k, 0]), int(pix[k, 1])))]
    d2 = ((pix[:, None, :] - peaks[None, :, :]) ** 2).sum(axis=2)
    owner = np.argmin(d2, axis=1)
    parts = []
    for j in range(len(peaks)):
        sel = pix[owner == j]
        if len(sel):
            parts.append((sel, (int(peaks[j, 0]), int(peaks[j, 1]))))
    return parts


def boxes_from_heatmap(
    heatmap: np.ndarray,
    config: HeatmapBoxConfig | None = None,
    gsd: float = 0.125,
    image_size: tuple[int, int] | None = None,
) -> Detections:
    """Vehicle boxes from one heat map (see the module docstring for the steps).

    Args:
        heatmap: ``(H, W)`` values in ``[0, 1]`` (8-bit maps: divide by 255 first); split-normalised
            maps may exceed 1, and fixed thresholds and confidences read them as given.
        config: thresholds and box options; defaults to :class:`HeatmapBoxConfig()`.
        gsd: metres per pixel of the *image* (converts ``box_side_m`` to pixels).
        image_size: ``(width, height)`` of the image when the map has another resolution;
            boxes are scaled to it.

    Returns:
        Detections in image pixels, class 0, confidence = peak (or mean) heat.

    Raises:
        InputError: a map that is not 2-D or holds non-finite values; a bad config.
    """
    config = (config or HeatmapBoxConfig()).validate()
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2 or heat.size == 0:
        raise InputError("heatmap", f"expected a non-empty (H, W) array, got shape {heat.shape}")
    if not np.all(np.isfinite(heat)):
        raise InputError("heatmap", "holds NaN or infinite values")
    if gsd <= 0:
        raise InputError("gsd", f"must be positive, got {gsd}")
    h, w = heat.shape
    img_w, img_h = image_size if image_size is not None else (w, h)
    if config.upsample > 1:
        heat = np.maximum(
            cv2.resize(heat, (w * config.upsample, h * config.upsample), interpolation=cv2.INTER_CUBIC), 0.0
        )
        h, w = heat.shape
    sx, sy = img_w / w, img_h / h
    if config.smooth_sigma_px > 0:
        heat = ndimage.gaussian_filter(heat, sigma=config.smooth_sigma_px / max(sx, sy), mode="nearest")
    thr = heatmap_threshold(heat, config)
    mask = heat >= thr
    if thr <= 0 or not mask.any() or float(heat.max()) <= 0:
        return Detections.empty(with_confidence=True)
    components, n = ndimage.label(mask, structure=np.ones((3, 3)))
    side_px = config.box_side_m / gsd
    boxes: list[list[float]] = []
    scores: list[float] = []
    slices = ndimage.find_objects(components)
    for label in range(1, n + 1):
        sl = slices[label - 1]
        comp_mask = np.zeros_like(mask)
        comp_mask[sl] = components[sl] == label
        for pix, (pr, pc) in _component_parts(heat, comp_mask, config):
            area = len(pix)
            if area < config.min_area_px or (config.max_area_px is not None and area > config.max_area_px):
                continue
            vals = heat[pix[:, 0], pix[:, 1]]
            score = float(vals.max()) if config.confidence == "peak" else float(vals.mean())
            if config.box_mode == "component":
                y1, x1 = pix.min(axis=0)
                y2, x2 = pix.max(axis=0) + 1
                box = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
            else:
                cx, cy = (pc + 0.5) * sx, (pr + 0.5) * sy
                box = [cx - side_px / 2, cy - side_px / 2, cx + side_px / 2, cy + side_px / 2]
            boxes.append([float(v) for v in box])
            scores.append(score)
    if not boxes:
        return Detections.empty(with_confidence=True)
    dets = Detections(np.array(boxes), np.array(scores)).clip(img_w, img_h)
    dets = dets[(dets.xyxy[:, 2] > dets.xyxy[:, 0]) & (dets.xyxy[:, 3] > dets.xyxy[:, 1])]
    if config.nms_iou is not None:
        dets = nms(dets, config.nms_iou)
    if config.max_boxes is not None and len(dets) > config.max_boxes:
        order = np.argsort(-dets.confidence, kind="stable")[: config.max_boxes]
        dets = dets[np.sort(order)]
    return dets


def annotate_direct(
    set_dir: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    config: HeatmapBoxConfig | None = None,
    preview_count: int = 16,
) -> Path:
    """Label one or several synthetic sets with the direct method and export the dataset.

    Images of a set generated without vehicles (``with_vehicles: false``) get no boxes.

    Args:
        set_dir: a synthetic set folder, or a list of them.
        out_dir: the export folder (replaced atomically; see :func:`aerosynth.annotation.export.export_dataset`).
        config: the heat-map -> boxes options.
        preview_count: images in the preview grid.

    Returns:
        ``out_dir``.
    """
    from aerosynth.annotation.export import AnnotatedImage, export_dataset
    from aerosynth.annotation.synthetic_set import open_synthetic_set

    config = (config or HeatmapBoxConfig()).validate()
    dirs = [set_dir] if isinstance(set_dir, (str, Path)) else list(set_dir)
    if not dirs:
        raise InputError("set_dir", "no synthetic set given")
    sets = [open_synthetic_set(d) for d in dirs]
    items: list[AnnotatedImage] = []
    for sset in sets:
        size = sset.info.image_size
        for name in sset.names:
            if sset.with_vehicles:
                heat = sset.heatmap(name, config.view, raw=config.raw_maps)
                dets = boxes_from_heatmap(heat, config, gsd=sset.info.gsd, image_size=(size, size))
            else:
                dets = Detections.empty(with_confidence=True)
            items.append(
                AnnotatedImage(
                    name=f"{sset.name}_{name}",
                    image_path=sset.image_path(name),
                    heatmap_path=sset.heatmap_path(name),
                    detections=dets,
                    status=["kept"] * len(dets),
                    set_name=sset.name,
                    with_vehicles=sset.with_vehicles,
                )
            )
    return export_dataset(
        items,
        out_dir,
        gsd=sets[0].info.gsd,
        method="direct",
        inputs=[s.fingerprint() for s in sets],
        settings={"heatmap_boxes": config.to_dict()},
        preview_count=preview_count,
    )
