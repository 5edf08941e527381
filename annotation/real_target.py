"""Label the *real* target tiles without target boxes: weak flags plus boxes from a label-free source.

A target-train tile carries one flag, "contains a vehicle or not". Two sources propose boxes on the
real tile itself:

* ``detector``: F_S, the source-only detector (one round of self-training with the flag as a
  constraint, the weakly supervised baseline AGenDA compares against);
* ``heatmap``: the generator's "cars" cross-attention map of the real tile (one UNet pass, as
  ``aerosynth map-quality`` does), turned into boxes by :func:`aerosynth.annotation.heatmap_boxes.boxes_from_heatmap`;
* ``fused``: both, fused tile by tile (:func:`aerosynth.annotation.fusion.fuse_proposers`).

Both are passed in as per-tile :class:`~aerosynth.data.detections.Detections` with confidences, so this
module needs neither a detector nor an LDM. The flag decides the rest:

* a tile flagged empty gets no box, whatever was proposed (its negatives are real);
* a flagged tile keeps the proposals at or above ``threshold`` (chosen on labelled *source-val*:
  the F1-optimal confidence of the same proposer there, :func:`source_threshold`), and at least its
  best proposal (the flag says there is a vehicle);
* with ``mask_uncertain`` set, the proposals of a flagged tile that were not kept but reach
  ``mask_uncertain x threshold`` are uncertain: they are painted over with the tile's mean colour
  (an ignore region: the detector is taught neither "car" nor "background" there) and listed as
  ignore regions in COCO exports. Tiles flagged empty are never masked (their negatives are real);
* with ``image_level`` set, a flagged tile where no proposal reaches the threshold keeps no box instead
  of its best one: it is written without a label and listed in ``image_level.json``
  (:class:`~aerosynth.data.exporters.LabelledImage`), so the detector learns "this tile holds a vehicle"
  from it through an image-level loss (:mod:`aerosynth.detection.image_level`) rather than a forced box,
  and is not taught that the tile is background.

The output is a labelled folder (``images/`` symlinks, ``labels/`` YOLO, ``summary.json``) that the
detector trains on and that ``aerosynth request --real`` exports for an analyst. Target boxes are never
read: only :class:`~aerosynth.data.tileset.WeakTileSplit` is accepted, and nothing under ``evaluation/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig
from aerosynth.annotation.map_quality import MapFunction, boxes_of_maps, normalise_maps
from aerosynth.annotation.metrics import f1_optimal_threshold, match_all
from aerosynth.data.atomic import atomic_directory, atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.exporters import LabelledImage, write_yolo_split
from aerosynth.data.tileset import (
    EVALUATION_DIR,
    LabelledTileSplit,
    WeakTileSplit,
    is_source_labelled,
    open_split,
)

SUMMARY_FILE = "summary.json"
METHODS = ("detector", "heatmap", "fused")


@dataclass
class RealTargetConfig:
    """How proposals and flags become labels.

    Attributes:
        keep_best_on_flagged: a flagged tile keeps its best proposal even below the threshold.
        max_boxes: at most this many boxes per tile (highest confidence first).
        mask_uncertain: on flagged tiles, proposals below the threshold but at or above this fraction of
            it are masked out of the image (``None``: no masking).
        image_level: a flagged tile none of whose proposals reaches the threshold gets no box and is marked
            image-level (its flag taught by the detector's image-level loss); wins over
            ``keep_best_on_flagged``.
    """

    keep_best_on_flagged: bool = True
    max_boxes: int = 100
    mask_uncertain: float | None = None
    image_level: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def heatmap_proposals(
    split: WeakTileSplit | LabelledTileSplit,
    map_fn: MapFunction,
    config: HeatmapBoxConfig | None = None,
    normalise: str = "minmax",
) -> list[Detections]:
    """Heat-map boxes (with peak confidences) of every real tile of a split, in ``split.tiles`` order.

    Args:
        split: any opened split (only its images are read).
        map_fn: ``rgb -> (h, w)`` "cars" map of a real tile (e.g. ``generation.real_maps.cars_map_function``).
        config: the direct method's options.
        normalise: how maps are brought to ``[0, 1]`` (:func:`aerosynth.annotation.map_quality.normalise_maps`;
            ``split`` scales by the maps of all of the split's tiles).
    """
    config = (config or HeatmapBoxConfig()).validate()
    maps, sizes = [], set()
    for tile in split.tiles:
        rgb = split.image(tile.tile_id)
        maps.append(map_fn(rgb))
        sizes.add((rgb.shape[1], rgb.shape[0]))
    if len(sizes) > 1:
        raise InputError(split.root, f"tiles of several sizes: {sorted(sizes)}")
    size = sizes.pop() if sizes else (split.info.tile_size, split.info.tile_size)
    return boxes_of_maps(normalise_maps(maps, normalise), config, split.info.gsd, size)


def source_threshold(
    proposals: Sequence[Detections], split: LabelledTileSplit, floor: float = 0.0, tiles: str = "all"
) -> tuple[float, dict]:
    """The F1-optimal confidence of a proposer on a labelled *source* split, and its scores there.

    Args:
        proposals: the proposer's boxes for every tile of ``split``, in ``split.tiles`` order.
        split: a labelled source split (source-val); a target split is refused.
        floor: lowest threshold returned.
        tiles: ``all`` of the split's tiles, or only those holding a vehicle (``flagged``): the condition a
            target tile's boxes are kept under, since only tiles flagged "vehicle" keep proposals.
    """
    if not is_source_labelled(split):
        raise InputError(getattr(split, "root", "split"), "thresholds are chosen on labelled source tiles only")
    if len(proposals) != len(split.tiles):
        raise InputError("proposals", f"{len(proposals)} entries for {len(split.tiles)} tiles of {split.name}")
    if tiles not in ("all", "flagged"):
        raise InputError("threshold_on", f"unknown tile choice {tiles!r} (all or flagged)")
    gts = [split.labels(t.tile_id) for t in split.tiles]
    ignores = [split.ignore_regions(t.tile_id) for t in split.tiles]
    keep = [i for i, g in enumerate(gts) if tiles == "all" or len(g)]
    if not keep:
        raise InputError(split.root, "no source tile with a vehicle to choose the threshold on")
    best = f1_optimal_threshold(
        match_all([proposals[i] for i in keep], [gts[i] for i in keep], [ignores[i] for i in keep])
    )
    scores = best.to_dict()
    return max(float(scores["threshold"]), floor), scores


def apply_flags(
    split: WeakTileSplit, proposals: Sequence[Detections], threshold: float, config: RealTargetConfig | None = None
) -> list[Detections]:
    """Per tile of a weak split: no box when flagged empty, else the proposals kept by the threshold rule."""
    config = config or RealTargetConfig()
    if not isinstance(split, WeakTileSplit):
        raise InputError(getattr(split, "root", "split"), "real-target labelling takes a weak target split")
    if len(proposals) != len(split.tiles):
        raise InputError("proposals", f"{len(proposals)} entries for {len(split.tiles)} tiles of {split.name}")
    return [
        dets[_kept(tile.has_vehicle, dets, threshold, config)].with_class(0)
        if tile.has_vehicle and len(dets)
        else Detections.empty(with_confidence=True)
        for tile, dets in zip(split.tiles, proposals, strict=True)
    ]


def _confidence(dets: Detections) -> np.ndarray:
    return dets.confidence if dets.confidence is not None else np.ones(len(dets))


def _kept(flagged: bool, dets: Detections, threshold: float, config: RealTargetConfig) -> np.ndarray:
    """Indices of the proposals a tile keeps: none when flagged empty, else those at or above the
    threshold (highest first, at most ``max_boxes``), or the best one when none is."""
    if not flagged or len(dets) == 0:
        return np.zeros(0, dtype=int)
    conf = _confidence(dets)
    order = np.argsort(-conf, kind="stable")
    keep = [i for i in order if conf[i] >= threshold]
    if not keep and config.keep_best_on_flagged and not config.image_level:
        keep = [int(order[0])]
    return np.asarray(keep[: config.max_boxes], dtype=int)


def uncertain_boxes(
    split: WeakTileSplit, proposals: Sequence[Detections], threshold: float, config: RealTargetConfig
) -> list[Detections]:
    """Per tile: the proposals of a flagged tile in ``[mask_uncertain x threshold, threshold)`` that it did
    not keep (the uncertain area; none on tiles flagged empty or without ``mask_uncertain``)."""
    out = []
    for tile, dets in zip(split.tiles, proposals, strict=True):
        if config.mask_uncertain is None or not tile.has_vehicle or len(dets) == 0:
            out.append(Detections.empty())
            continue
        conf = _confidence(dets)
        uncertain = (conf >= config.mask_uncertain * threshold) & (conf < threshold)
        uncertain[_kept(True, dets, threshold, config)] = False  # the best box kept below it stays a label
        out.append(Detections(dets.xyxy[uncertain]))
    return out


def mask_regions(rgb: np.ndarray, regions: Detections) -> np.ndarray:
    """``rgb`` with every region painted with the image's mean colour."""
    out = rgb.copy()
    if len(regions):
        h, w = rgb.shape[:2]
        out[regions.pixel_mask(w, h)] = np.rint(rgb.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    return out


def label_real_tiles(
    split_dir: str | Path,
    proposals: Sequence[Detections],
    threshold: float,
    out_dir: str | Path,
    method: str,
    config: RealTargetConfig | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write the labelled real target tiles (``images/``, ``labels/``, ``summary.json``) atomically.

    Args:
        split_dir: the weak target split (target-train).
        proposals: boxes with confidences for every tile, in ``split.tiles`` order.
        threshold: confidence threshold (from source-val, :func:`source_threshold`).
        out_dir: the output folder (replaced as a whole).
        method: ``detector``, ``heatmap`` or ``fused`` (recorded).
        config: the flag rule.
        provenance: what proposed the boxes (model path, sha256, settings), recorded in the summary.

    Returns:
        ``out_dir``.

    Raises:
        InputError: a labelled (non-weak) split, a split under ``evaluation/``, or a bad method.
    """
    if method not in METHODS:
        raise InputError("method", f"unknown labelling method {method!r} ({', '.join(METHODS)})")
    if EVALUATION_DIR in Path(split_dir).resolve().parts:
        raise InputError(split_dir, "target labels under evaluation/ are never read for training")
    split = open_split(split_dir)
    config = config or RealTargetConfig()
    labels = apply_flags(split, proposals, threshold, config)  # type: ignore[arg-type]
    ignore = uncertain_boxes(split, proposals, threshold, config)  # type: ignore[arg-type]
    flagged = [t.has_vehicle for t in split.tiles]
    image_level = [config.image_level and f and not len(d) for f, d in zip(flagged, labels, strict=True)]
    items = [
        LabelledImage(
            t.tile_id,
            mask_regions(split.image(t.tile_id), g) if len(g) else split.image_path(t.tile_id),
            d.with_class(0),
            g if len(g) else None,
            image_level=lev,
        )
        for t, d, g, lev in zip(split.tiles, labels, ignore, image_level, strict=True)
    ]
    summary = {
        "method": method,
        "split": split.info.name,
        "domain": split.info.domain,
        "gsd": split.info.gsd,
        "tiles": len(items),
        "flagged_tiles": int(sum(flagged)),
        "boxes": int(sum(len(d) for d in labels)),
        "flagged_tiles_with_boxes": int(sum(1 for d, f in zip(labels, flagged, strict=True) if f and len(d))),
        "kept_below_threshold": int(
            sum(1 for d in labels if len(d) and d.confidence is not None and float(d.confidence.max()) < threshold)
        ),
        "threshold": float(threshold),
        "masked_regions": int(sum(len(g) for g in ignore)),
        "image_level_tiles": int(sum(image_level)),
        "config": config.to_dict(),
        "provenance": provenance or {},
    }
    with atomic_directory(Path(out_dir), overwrite=True) as tmp:
        write_yolo_split(tmp, items)
        atomic_write_json(tmp / SUMMARY_FILE, summary)
    return Path(out_dir)
