"""How good is the direct method on real images? Maps -> boxes, scored against real boxes.

The generation stage provides the map function (encode a real labelled tile, noise it to a
timestep, one denoising pass, capture the "cars" cross-attention map). Here it is only a
parameter, ``map_fn(rgb) -> (h, w) map``, so this module runs without the LDM.

Maps are computed once per tile; the direct-method config and a sweep of fixed thresholds
are then scored on them (precision, recall, F1 at IoU 0.5 on all boxes the method returns;
AP50 ranking them by confidence). Use it on *source* splits (real labels) to choose the
direct method's settings; target labels only through the evaluation API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig, boxes_from_heatmap
from aerosynth.annotation.metrics import f1_optimal_threshold, match_all, score_at
from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.tileset import LabelledTileSplit, open_split

MapFunction = Callable[[np.ndarray], np.ndarray]
DEFAULT_SWEEP = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def normalise_map(values: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """A map to ``[0, 1]``: ``minmax`` (as the heat-map PNGs), ``max`` (divide by the max) or ``none`` (clip)."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise InputError("map_fn", f"returned shape {a.shape}, expected (H, W)")
    if not np.all(np.isfinite(a)):
        raise InputError("map_fn", "returned NaN or infinite values")
    if mode == "none":
        return np.clip(a, 0.0, 1.0)
    if mode == "max":
        m = float(a.max())
        return np.clip(a / m, 0.0, 1.0) if m > 0 else np.zeros_like(a)
    if mode == "minmax":
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    raise InputError("normalise", f"unknown mode {mode!r} (minmax, max or none)")


def score_boxes(preds: Sequence[Detections], gts: Sequence[Detections], ignores: Sequence[Detections]) -> dict:
    """Precision/recall/F1 of all boxes, AP50, and the F1-optimal confidence threshold."""
    m = match_all(preds, gts, ignores)
    all_boxes = score_at(m, -np.inf).to_dict()
    all_boxes["threshold"] = None
    best = f1_optimal_threshold(m).to_dict()
    return {**all_boxes, "predictions": int(len(m.confidence)), "f1_optimal": best}


def evaluate_map_quality(
    split: str | Path | LabelledTileSplit,
    map_fn: MapFunction,
    out_json: str | Path | None = None,
    config: HeatmapBoxConfig | None = None,
    sweep_thresholds: Sequence[float] = DEFAULT_SWEEP,
    normalise: str = "minmax",
    limit: int | None = None,
    only_with_vehicles: bool = False,
) -> dict:
    """Score the direct method's boxes on the maps of real labelled tiles.

    Args:
        split: a labelled split folder (source) or an opened :class:`LabelledTileSplit`
            (target splits through :func:`aerosynth.data.tileset.open_evaluation_split` only).
        map_fn: ``rgb (H, W, 3) uint8 -> (h, w)`` "cars" map of that image (any resolution;
            boxes are scaled to the tile).
        out_json: where to write the report (atomically); ``None`` = don't write.
        config: the direct-method options scored as given.
        sweep_thresholds: fixed thresholds also scored (``threshold_mode="fixed"``) on the same maps.
        normalise: how maps are brought to ``[0, 1]`` (see :func:`normalise_map`).
        limit: score only the first ``limit`` tiles (in split order).
        only_with_vehicles: skip tiles whose weak label is "no vehicle".

    Returns:
        The report: split, counts, the config's scores, the sweep, the best sweep entry by F1.

    Raises:
        InputError: a weak split passed by path or as an opened :class:`WeakTileSplit`, or a map
            function returning a bad map.
    """
    config = (config or HeatmapBoxConfig()).validate()
    if not isinstance(split, (str, Path, LabelledTileSplit)):
        where = getattr(split, "root", "split")
        raise InputError(where, "a weak split has no boxes to score against (open it with the evaluation API)")
    if not isinstance(split, LabelledTileSplit):
        opened = open_split(split)
        if not isinstance(opened, LabelledTileSplit):
            raise InputError(split, "a weak split has no boxes to score against (open it with the evaluation API)")
        split = opened
    tiles = [t for t in split.tiles if t.has_vehicle or not only_with_vehicles]
    if limit is not None:
        tiles = tiles[:limit]
    if not tiles:
        raise InputError(split.root, "no tile to score")
    gsd = split.info.gsd
    maps, gts, ignores, sizes = [], [], [], []
    for tile in tiles:
        rgb = split.image(tile.tile_id)
        maps.append(normalise_map(map_fn(rgb), normalise))
        gts.append(split.labels(tile.tile_id))
        ignores.append(split.ignore_regions(tile.tile_id))
        sizes.append((rgb.shape[1], rgb.shape[0]))

    report = {
        "split": split.info.name,
        "domain": split.info.domain,
        "weak_split": bool(split.info.weak),
        "gsd": gsd,
        "tiles": len(tiles),
        "ground_truth_boxes": int(sum(len(g) for g in gts)),
        "normalise": normalise,
        **_score_maps(maps, sizes, gts, ignores, gsd, config, sweep_thresholds),
    }
    if out_json is not None:
        atomic_write_json(out_json, report)
    return report


def evaluate_map_quality_levels(
    split: str | Path | LabelledTileSplit,
    map_fns: Mapping[float, MapFunction],
    out_json: str | Path | None = None,
    **options: Any,
) -> dict:
    """:func:`evaluate_map_quality` at several noise levels of the single pass, in one report.

    Args:
        split: as for :func:`evaluate_map_quality` (a target split only as opened by
            :func:`aerosynth.data.tileset.open_evaluation_split`: a diagnostic, never used to choose anything).
        map_fns: one map function per noise level (fraction of the schedule), in report order.
        out_json: where to write the report (atomically); ``None`` = don't write.
        **options: passed on to :func:`evaluate_map_quality` (``config``, ``limit``, ...).

    Returns:
        With one level, the report of :func:`evaluate_map_quality` plus ``noise``; with several, the
        split's counts, ``noise_levels`` and ``by_noise``: one entry per level (``noise``, ``config``,
        ``scores``, ``sweep``, ``best_sweep``).

    Raises:
        InputError: no level given, or what :func:`evaluate_map_quality` raises.
    """
    if not map_fns:
        raise InputError("noise", "no noise level given")
    reports = [
        {"noise": float(level), **evaluate_map_quality(split, fn, None, **options)} for level, fn in map_fns.items()
    ]
    if len(reports) == 1:
        report = reports[0]
    else:
        shared = ("split", "domain", "weak_split", "gsd", "tiles", "ground_truth_boxes", "normalise")
        per_level = ("noise", "config", "scores", "sweep", "best_sweep")
        report = {
            **{k: reports[0][k] for k in shared},
            "noise_levels": [r["noise"] for r in reports],
            "by_noise": [{k: r[k] for k in per_level} for r in reports],
        }
    if report["weak_split"]:
        report["note"] = "target labels read through the evaluation API: a diagnostic, never used to choose settings"
    if out_json is not None:
        atomic_write_json(out_json, report)
    return report


def _score_maps(
    maps: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    gts: Sequence[Detections],
    ignores: Sequence[Detections],
    gsd: float,
    config: HeatmapBoxConfig,
    sweep_thresholds: Sequence[float],
) -> dict:
    """The config's scores on the maps, the fixed-threshold sweep and its best entry by F1."""

    def run(cfg: HeatmapBoxConfig) -> dict:
        preds = [boxes_from_heatmap(m, cfg, gsd=gsd, image_size=s) for m, s in zip(maps, sizes, strict=True)]
        return score_boxes(preds, gts, ignores)

    sweep = [
        {"fixed_threshold": float(t), **run(replace(config, threshold_mode="fixed", threshold=float(t)))}
        for t in sweep_thresholds
    ]
    return {
        "config": config.to_dict(),
        "scores": run(config),
        "sweep": sweep,
        "best_sweep": max(sweep, key=lambda e: (e["f1"], -e["fixed_threshold"])) if sweep else None,
    }


def evaluate_translation_set(
    set_dir: str | Path,
    out_json: str | Path | None = None,
    config: HeatmapBoxConfig | None = None,
    sweep_thresholds: Sequence[float] = DEFAULT_SWEEP,
) -> dict:
    """Score the direct method on a ``translation`` synthetic set against the boxes it carries.

    A translation set is a real source tile re-generated by the LDM, its real boxes carried
    over in ``labels/``: its heat maps can be scored without any target label.

    Raises:
        InputError: a set that is not a translation set.
    """
    from aerosynth.annotation.synthetic_set import open_synthetic_set

    config = (config or HeatmapBoxConfig()).validate()
    sset = open_synthetic_set(set_dir)
    if sset.info.set != "translation":
        raise InputError(set_dir, f"a {sset.info.set!r} set carries no boxes; only translation sets can be scored")
    size = (sset.info.image_size, sset.info.image_size)
    maps = [sset.heatmap(n, config.view, raw=config.raw_maps) for n in sset.names]
    gts = [sset.yolo_labels(n) for n in sset.names]
    ignores = [Detections.empty() for _ in gts]

    report = {
        "set": sset.info.set,
        "domain": sset.info.domain,
        "gsd": sset.info.gsd,
        "images": len(sset),
        "ground_truth_boxes": int(sum(len(g) for g in gts)),
        **_score_maps(maps, [size] * len(maps), gts, ignores, sset.info.gsd, config, sweep_thresholds),
    }
    if out_json is not None:
        atomic_write_json(out_json, report)
    return report
