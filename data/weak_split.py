"""Weak tile splits cut from new imagery, and the tiles folder of a retrain run built around one.

A weak split (:func:`build_weak_split`) has one flag per tile (has a vehicle or not) and no boxes.
Tiles are cut exactly as :mod:`aerosynth.data.prepare` cuts target splits: resampled to the GSD, a grid
from the top-left corner, tiles with too few valid pixels skipped; tile ids are
``<raster stem>_<x0>_<y0>``. Each flag comes from, in this order (``flags="auto"``): a ``flags.json``
entry for the tile id, else the raster's ``<stem>.geojson`` labels (a tile with a kept box has a
vehicle), else a ``flags.json`` entry for the raster (file name or stem), else a detector (a
detection with confidence >= the threshold on the tile). ``"given"`` requires given flags;
``"detector"`` ignores them.

:func:`assemble_run_tiles` makes the tiles folder of a retrain run: the source splits of a prepared
tiles folder (hard links), the new weak ``target-train`` and the evaluation split as ``target-test``
(its boxes under ``evaluation/``, never trained on), with a manifest.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from affine import Affine

from aerosynth.data.atomic import atomic_write_json, link_or_copy
from aerosynth.data.detections import Detections
from aerosynth.data.domains import Domain, DomainImage
from aerosynth.data.errors import InputError
from aerosynth.data.geo import crs_to_string
from aerosynth.data.imageio import write_png
from aerosynth.data.manifest import MANIFEST_FILE, tree_sha256, write_manifest
from aerosynth.data.tileset import (
    EVALUATION_DIR,
    TILES_FILE,
    SplitInfo,
    TileRecord,
    open_evaluation_split,
    tiles_document,
)
from aerosynth.data.tiling import cut_tiles, resample, resample_labels, resample_transform
from aerosynth.data.watch import NewRaster

FlagMode = Literal["auto", "given", "detector"]
#: Images (RGB arrays) in, one :class:`Detections` with confidences per image out.
Predictor = Callable[[list[np.ndarray]], list[Detections]]


@dataclass
class WeakSplitSummary:
    """What :func:`build_weak_split` wrote and where each flag came from.

    Attributes:
        tiles: tiles cut.
        with_vehicle: tiles flagged as having a vehicle.
        rasters: rasters cut.
        by_source: number of flags per source (``flags.json``, ``labels``, ``detector``).
        per_tile: tile id -> ``{"has_vehicle", "source"}`` (and ``max_confidence`` for detector flags).
    """

    tiles: int
    with_vehicle: int
    rasters: int
    by_source: dict[str, int]
    per_tile: dict[str, dict] = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def build_weak_split(
    rasters: Sequence[NewRaster],
    out_dir: str | Path,
    domain: str,
    gsd: float,
    tile_size: int,
    flags: FlagMode = "auto",
    given: dict[str, bool] | None = None,
    predictor: Predictor | None = None,
    threshold: float = 0.25,
    bands: list[int] | None = None,
    min_valid_fraction: float = 0.5,
    split_name: str = "target-train",
) -> WeakSplitSummary:
    """Cut new rasters into a weak tile split (``images/``, ``tiles.json``) with one flag per tile.

    Tiles are cut like ``aerosynth.data.prepare`` cuts target splits: resampled to ``gsd``, a grid from the
    top-left corner, tiles with less than ``min_valid_fraction`` valid pixels skipped.

    Args:
        rasters: the new imagery.
        out_dir: the split folder to write.
        domain: domain name of the split (the registry's target domain).
        gsd: metres per pixel of the tiles.
        tile_size: tile side in pixels.
        flags: ``"auto"``, ``"given"`` or ``"detector"`` (see the module docstring).
        given: ``flags.json`` content (tile id or raster name -> flag).
        predictor: the production detector, for tiles without a given flag.
        threshold: lowest confidence that makes a detection count as a vehicle.
        bands: band selection of rasters with other than three bands.
        min_valid_fraction: tiles with fewer valid (non-nodata) pixels are skipped.
        split_name: name written in ``tiles.json``.

    Raises:
        InputError: a raster without georeference, a tile without a flag (``"given"``, or no
            predictor), no tile cut at all.
    """
    if flags not in ("auto", "given", "detector"):
        raise InputError("flags", f"unknown flag source {flags!r} (auto, given or detector)")
    given = dict(given or {})
    out_dir = Path(out_dir)
    use_labels = flags != "detector"
    items = [DomainImage(r.path.stem, r.path, r.path.stem, r.labels if use_labels else None) for r in rasters]
    dom = Domain(domain, items, bands=bands, missing_labels="error")
    records: list[TileRecord] = []
    sources: dict[str, str] = {}
    pending: list[tuple[int, np.ndarray]] = []  # tiles whose flag the detector decides
    for item in dom.images:
        loaded = dom.load(item)
        if loaded.gsd is None or loaded.transform is None:
            raise InputError(item.path, "raster without georeference: its ground sample distance is unknown")
        h, w = loaded.rgb.shape[:2]
        scale = loaded.gsd / gsd
        rgb = resample(loaded.rgb, scale)
        nh, nw = rgb.shape[:2]
        valid = None
        if loaded.valid is not None and not loaded.valid.all():
            valid = resample(loaded.valid.astype(np.uint8) * 255, scale) >= 128
        dets = None if loaded.detections is None else resample_labels(loaded.detections, (w, h), (nw, nh))
        transform = resample_transform(loaded.transform, (w, h), (nw, nh))
        crs = crs_to_string(loaded.crs) if loaded.crs is not None else None
        for tile in cut_tiles(rgb, dets, tile_size, "grid", valid, str(item.path)):
            if tile.valid_fraction < min_valid_fraction:
                continue
            tile_id = f"{item.image_id}_{tile.x0}_{tile.y0}"
            flag, source = None, None
            if flags != "detector":
                if tile_id in given:
                    flag, source = given[tile_id], "flags.json"
                elif dets is not None:
                    flag, source = bool(len(tile.boxes)), "labels"
                elif item.path.name in given or item.path.stem in given:
                    flag, source = given.get(item.path.name, given.get(item.path.stem)), "flags.json"
            if flag is None:
                if flags == "given":
                    raise InputError(item.path, f"tile {tile_id} has no given flag (no labels, no flags.json entry)")
                if predictor is None:
                    raise InputError(
                        item.path, "no labels or flags for this raster and no production detector to compute them"
                    )
                pending.append((len(records), tile.pixels))
                source = "detector"
            write_png(out_dir / "images" / f"{tile_id}.png", tile.pixels)
            tt = transform @ Affine.translation(tile.x0, tile.y0)
            records.append(
                TileRecord(
                    tile_id,
                    item.path.name,
                    item.group,
                    tile.x0,
                    tile.y0,
                    tile_size,
                    tile_size,
                    bool(flag),
                    tuple(float(v) for v in tt[:6]),
                    crs,
                )
            )
            sources[tile_id] = source
    if not records:
        raise InputError(split_name, "no tile could be cut from the new imagery (rasters smaller than a tile?)")
    per_tile: dict[str, dict] = {}
    if pending:
        preds = predictor([pix for _, pix in pending])
        if len(preds) != len(pending):
            raise RuntimeError(f"predictor returned {len(preds)} results for {len(pending)} tiles")
        for (i, _), det in zip(pending, preds, strict=True):
            conf = det.confidence if det.confidence is not None else np.ones(len(det))
            top = float(conf.max()) if len(det) else 0.0
            records[i].has_vehicle = bool(top >= threshold)
            per_tile[records[i].tile_id] = {"max_confidence": round(top, 4)}
    for r in records:
        per_tile.setdefault(r.tile_id, {}).update({"has_vehicle": r.has_vehicle, "source": sources[r.tile_id]})
    info = SplitInfo(split_name, domain, gsd, tile_size, True, ["vehicle"])
    atomic_write_json(out_dir / TILES_FILE, tiles_document(info, records))
    by_source: dict[str, int] = {}
    for s in sources.values():
        by_source[s] = by_source.get(s, 0) + 1
    return WeakSplitSummary(len(records), sum(r.has_vehicle for r in records), len(rasters), by_source, per_tile)


def link_tree(src: Path, dst: Path) -> None:
    """Copy a folder with hard links where the file system allows (real files: hashing sees them)."""
    shutil.copytree(src, dst, copy_function=link_or_copy)


def read_base_manifest(base: Path) -> dict:
    """The ``manifest.json`` of a prepared tiles folder (``{}`` without one)."""
    return json.loads((base / MANIFEST_FILE).read_text()) if (base / MANIFEST_FILE).is_file() else {}


def assemble_run_tiles(
    out: Path,
    base: Path,
    split: str,
    rasters: Sequence[NewRaster],
    flags: FlagMode = "auto",
    given: dict[str, bool] | None = None,
    predictor: Predictor | None = None,
    threshold: float = 0.25,
    bands: list[int] | None = None,
) -> WeakSplitSummary:
    """Fill ``out`` with a retrain run's tiles: base source splits, new weak target-train, evaluation split.

    Args:
        out: the tiles folder (anything in it is removed first: leftovers of an interrupted build).
        base: a prepared tiles folder with ``source-train`` (``source-val``) and the evaluation split.
        split: the evaluation split of ``base`` (with boxes); it becomes ``target-test``.
        rasters: the new imagery, cut into the weak ``target-train`` (:func:`build_weak_split`).
        flags: ``"auto"``, ``"given"`` or ``"detector"``.
        given: ``flags.json`` content (tile id or raster name -> flag).
        predictor: the detector for tiles without a given flag.
        threshold: lowest confidence that makes a detection count as a vehicle.
        bands: band selection of rasters with other than three bands.

    Returns:
        What the weak split holds and where each flag came from.

    Raises:
        InputError: the evaluation split has no boxes, or the weak split cannot be built.
    """
    base_manifest = read_base_manifest(base)
    evaluation = open_evaluation_split(base, split)
    domain, gsd, tile_size = evaluation.info.domain, evaluation.info.gsd, evaluation.info.tile_size
    for child in out.iterdir():  # leftovers of an interrupted build
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    splits: dict[str, dict] = {}
    for name in ("source-train", "source-val"):
        if (base / name / TILES_FILE).is_file():
            link_tree(base / name, out / name)
            splits[name] = dict(base_manifest.get("splits", {}).get(name, {}))
    weak = build_weak_split(
        rasters, out / "target-train", domain, gsd, tile_size, flags, given, predictor, threshold, bands
    )
    link_tree(evaluation.root, out / "target-test")
    if evaluation.labels_root != evaluation.root:
        link_tree(evaluation.labels_root, out / EVALUATION_DIR / "target-test")
    splits["target-train"] = {
        "domain": domain,
        "weak": True,
        "images": len(rasters),
        "groups": sorted({r.path.stem for r in rasters}),
        "tiles": weak.tiles,
        "tiles_with_vehicles": weak.with_vehicle,
        "boxes": 0,
        "ignore_regions": 0,
        "flag_sources": weak.by_source,
    }
    splits["target-test"] = {**base_manifest.get("splits", {}).get(split, {}), "evaluation_split": split}
    for name, entry in splits.items():
        entry.setdefault("domain", domain)
        entry["content_sha256"] = tree_sha256(out / name)
    write_manifest(
        out,
        {
            "kind": "aerosynth.tiles",
            "preset": "retrain",
            "target_gsd": gsd,
            "tile_size": tile_size,
            "base_tiles": str(base),
            "splits": splits,
        },
    )
    return weak
