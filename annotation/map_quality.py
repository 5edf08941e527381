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

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
NORMALISE_MODES = ("minmax", "max", "none", "split")
#: ``split`` normalisation divides every map of a split by this percentile of the maps' maxima.
SPLIT_PERCENTILE = 90.0

#: The readouts :func:`choose_readout` tries: how maps are normalised, whether they are resampled before
#: thresholding, the fixed threshold, and whether touching vehicles are split between peaks. Only
#: normalisations blind to a domain's overall attention strength are tried: a readout is chosen on
#: source tiles and must carry over to a target whose maps are weaker or stronger as a whole (raw
#: maps, ``none``, scored best on Madison source-val but lost 0.08 AP50 on KIT, whose maps peak lower).
READOUT_GRID: dict[str, tuple] = {
    "normalise": ("minmax", "split"),
    "upsample": (1, 4),
    "threshold": (0.2, 0.3, 0.35, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8),
    "peaks": (None, 1, 2),
}


@dataclass(frozen=True)
class MapReadout:
    """How a raw "cars" map of a real tile becomes boxes: the normalisation and the direct method's options.

    Attributes:
        normalise: :func:`normalise_maps` mode applied to the raw maps.
        config: the direct method's options (:class:`~aerosynth.annotation.heatmap_boxes.HeatmapBoxConfig`).
    """

    normalise: str = "minmax"
    config: HeatmapBoxConfig = field(default_factory=HeatmapBoxConfig)

    def to_dict(self) -> dict:
        return {"normalise": self.normalise, "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> MapReadout:
        """The readout written by :meth:`to_dict` (e.g. the ``chosen`` entry of a source-val report)."""
        try:
            readout = cls(str(doc.get("normalise", "minmax")), HeatmapBoxConfig(**dict(doc.get("config", {}))))
        except TypeError as exc:
            raise InputError("readout", f"not a map readout: {exc}") from None
        if readout.normalise not in NORMALISE_MODES:
            raise InputError("readout.normalise", f"unknown mode {readout.normalise!r} ({', '.join(NORMALISE_MODES)})")
        readout.config.validate()
        return readout

    def boxes(self, raw_maps: Sequence[np.ndarray], gsd: float, image_size: tuple[int, int]) -> list[Detections]:
        """The boxes of the raw maps of a split's tiles (all of them: ``split`` scales by the whole set)."""
        return boxes_of_maps(normalise_maps(raw_maps, self.normalise), self.config, gsd, image_size)


def boxes_of_maps(
    maps: Sequence[np.ndarray], config: HeatmapBoxConfig, gsd: float, image_size: tuple[int, int]
) -> list[Detections]:
    """:func:`boxes_from_heatmap` of each normalised map."""
    return [boxes_from_heatmap(m, config, gsd=gsd, image_size=image_size) for m in maps]


def memoised(map_fn: MapFunction) -> MapFunction:
    """``map_fn`` computed once per distinct image (keyed by its bytes): score several readouts of one pass."""
    import hashlib

    seen: dict[bytes, np.ndarray] = {}

    def cached(rgb: np.ndarray) -> np.ndarray:
        key = hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).digest() + repr(rgb.shape).encode()
        if key not in seen:
            seen[key] = np.asarray(map_fn(rgb))
        return seen[key]

    return cached


def readout_candidates(grid: Mapping[str, Sequence] | None = None) -> list[MapReadout]:
    """Every readout of a grid (:data:`READOUT_GRID` by default): fixed thresholds, ``peaks`` None = no split."""
    grid = {**READOUT_GRID, **(grid or {})}
    out = []
    axes = (grid["normalise"], grid["upsample"], grid["threshold"], grid["peaks"])
    for norm, up, thr, peaks in itertools.product(*axes):
        cfg = HeatmapBoxConfig(
            threshold_mode="fixed",
            threshold=float(thr),
            upsample=int(up),
            split_peaks=peaks is not None,
            peak_min_distance_px=int(peaks or 1),
        )
        out.append(MapReadout(norm, cfg.validate()))
    return out


def choose_readout(
    split: LabelledTileSplit,
    map_fn: MapFunction | None = None,
    raw_maps: Sequence[np.ndarray] | None = None,
    candidates: Sequence[MapReadout] | None = None,
    limit: int | None = None,
) -> tuple[MapReadout, dict]:
    """The readout with the best AP50 of heat-map boxes on a labelled *source* split (source-val).

    The maps of a box-supervised model are attention probabilities: comparable across tiles without
    per-tile min-max scaling, and coarse (one cell per 8 px), so the best readout is usually an absolute
    threshold on a resampled map. Which one is chosen here, on source labels only; target splits are refused.

    Args:
        split: a labelled source split (never one opened through the evaluation API).
        map_fn: ``rgb -> (h, w)`` raw map; or give ``raw_maps`` (one per tile, in split order).
        raw_maps: precomputed raw maps.
        candidates: readouts to try (default :func:`readout_candidates`).
        limit: use only the first ``limit`` tiles.

    Returns:
        ``(readout, report)``: the report lists every candidate's AP50, precision and recall.
    """
    from aerosynth.data.tileset import is_source_labelled

    if not is_source_labelled(split):
        raise InputError(getattr(split, "root", "split"), "a readout is chosen on labelled source tiles only")
    tiles = split.tiles[:limit] if limit is not None else split.tiles
    if not tiles:
        raise InputError(split.root, "no tile to choose a readout on")
    if raw_maps is None:
        if map_fn is None:
            raise InputError("map_fn", "give a map function or the raw maps")
        raw_maps = [map_fn(split.image(t.tile_id)) for t in tiles]
    if len(raw_maps) != len(tiles):
        raise InputError("raw_maps", f"{len(raw_maps)} maps for {len(tiles)} tiles")
    gts = [split.labels(t.tile_id) for t in tiles]
    ignores = [split.ignore_regions(t.tile_id) for t in tiles]
    size = (split.info.tile_size, split.info.tile_size)
    tried = []
    normalised: dict[str, list[np.ndarray]] = {}
    for readout in candidates or readout_candidates():
        if readout.normalise not in normalised:
            normalised[readout.normalise] = normalise_maps(raw_maps, readout.normalise)
        preds = boxes_of_maps(normalised[readout.normalise], readout.config, split.info.gsd, size)
        sc = score_boxes(preds, gts, ignores)
        tried.append({**readout.to_dict(), "ap50": sc["ap50"], "precision": sc["precision"], "recall": sc["recall"]})
    # ties go to the earlier (simpler) candidate
    best = max(range(len(tried)), key=lambda i: (round(tried[i]["ap50"], 6), -i))
    chosen = MapReadout.from_dict(tried[best])
    report = {"split": split.info.name, "tiles": len(tiles), "chosen": tried[best], "candidates": tried}
    return chosen, report


def choose_map_source(
    split: LabelledTileSplit,
    sources: Mapping[str, MapFunction],
    candidates: Sequence[MapReadout] | None = None,
    limit: int | None = None,
) -> tuple[str, MapReadout, dict]:
    """The map source (e.g. a model and a noise level) and readout with the best AP50 on a *source* split.

    Each source's readout is chosen by :func:`choose_readout` on the same labelled source tiles; the
    source whose chosen readout scores best wins (ties go to the earlier source, so list the cheaper or
    simpler one first). Target splits are refused, as there.

    Args:
        split: a labelled source split (source-val).
        sources: name -> map function, in order of preference.
        candidates: readouts to try per source (default :func:`readout_candidates`).
        limit: use only the first ``limit`` tiles.

    Returns:
        ``(name, readout, report)``; the report holds every source's chosen readout and its AP50.
    """
    if not sources:
        raise InputError("sources", "no map source to choose from")
    tried: dict[str, dict] = {}
    readouts: dict[str, MapReadout] = {}
    for name, fn in sources.items():
        readouts[name], report = choose_readout(split, fn, candidates=candidates, limit=limit)
        tried[name] = report["chosen"]
    names = list(tried)
    name = names[max(range(len(names)), key=lambda i: (round(tried[names[i]]["ap50"], 6), -i))]
    return name, readouts[name], {"split": split.info.name, "chosen": name, "sources": tried}


def _as_map(values: np.ndarray) -> np.ndarray:
    """A map as a finite ``(H, W)`` float array (a leading axis of 1 is dropped)."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise InputError("map_fn", f"returned shape {a.shape}, expected (H, W)")
    if not np.all(np.isfinite(a)):
        raise InputError("map_fn", "returned NaN or infinite values")
    return a


def normalise_map(values: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """A map to ``[0, 1]``: ``minmax`` (as the heat-map PNGs), ``max`` (divide by the max) or ``none`` (clip)."""
    a = _as_map(values)
    if mode == "none":
        return np.clip(a, 0.0, 1.0)
    if mode == "max":
        m = float(a.max())
        return np.clip(a / m, 0.0, 1.0) if m > 0 else np.zeros_like(a)
    if mode == "minmax":
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if mode == "split":
        raise InputError("normalise", "split normalisation needs every map of the split (normalise_maps)")
    raise InputError("normalise", f"unknown mode {mode!r} ({', '.join(NORMALISE_MODES)})")


def normalise_maps(maps: Sequence[np.ndarray], mode: str = "minmax") -> list[np.ndarray]:
    """The maps of a set of tiles to ``[0, 1]``: per map (:func:`normalise_map`), or ``split``.

    ``split`` divides every map by one number, the :data:`SPLIT_PERCENTILE` percentile of the maps'
    maxima (no label read): the maps of one split stay comparable with each other, as raw maps are,
    while a domain whose attention is weaker or stronger overall is brought to the same scale. Values
    above 1 are kept, not clipped: a clip tied every map stronger than the percentile at confidence 1 and
    lost the order of the most confident boxes (0.765 -> 0.776 AP50 on real source-val, ``stageA-high``).
    """
    if mode != "split":
        return [normalise_map(m, mode) for m in maps]
    raw = [_as_map(m) for m in maps]
    if not raw:
        return []
    scale = float(np.percentile([float(m.max()) for m in raw], SPLIT_PERCENTILE))
    if scale <= 0:
        return [np.zeros_like(m) for m in raw]
    return [np.maximum(m / scale, 0.0) for m in raw]


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
        normalise: how maps are brought to ``[0, 1]`` (see :func:`normalise_maps`).
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
        maps.append(map_fn(rgb))
        gts.append(split.labels(tile.tile_id))
        ignores.append(split.ignore_regions(tile.tile_id))
        sizes.append((rgb.shape[1], rgb.shape[0]))
    maps = normalise_maps(maps, normalise)

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


def flag_auc(maps: Sequence[np.ndarray], flags: Sequence[bool]) -> float | None:
    """How well each tile's map maximum tells tiles flagged "vehicle" from tiles flagged empty (ROC AUC).

    Reads weak flags only, so it may be computed on target-train: 0.5 is a map that ignores vehicles
    (or attends nowhere in that domain), 1.0 one whose strongest response is always on a flagged tile.
    ``None`` when one of the two kinds of tiles is missing.
    """
    peaks = np.array([float(_as_map(m).max()) for m in maps])
    flags_arr = np.asarray(list(flags), dtype=bool)
    if len(peaks) != len(flags_arr):
        raise InputError("flags", f"{len(flags_arr)} flags for {len(peaks)} maps")
    pos, neg = peaks[flags_arr], peaks[~flags_arr]
    if not len(pos) or not len(neg):
        return None
    # Mann-Whitney U: the chance a flagged tile's peak is above an empty tile's (ties count half)
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


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
