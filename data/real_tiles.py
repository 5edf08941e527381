"""A run's *real* target-train tiles with the labels the adapt flow gave them, ready to export.

The adapt flow (``annotation.real_target``) labels the real target-train tiles without target boxes
and writes, per method, ``RUN/annotation/real-<method>/dataset/``::

    images/<tile>.png   symlinks to RUN/tiles/target-train/images/<tile>.png
    labels/<tile>.txt   YOLO rows, class 0 = vehicle (empty file: no vehicle)
    summary.json        method, split, domain, gsd, threshold, counts, provenance

:func:`open_real_dataset` reads such a folder together with the split's ``tiles.json`` (per-tile
affine transform and CRS), :func:`pick_real_tiles` chooses ``count`` of them the seeded way and
:func:`common_crs` checks that the chosen tiles share one CRS (an export has one);
:func:`choose_real_tiles` does all three for a request. The ``request`` flow (``aerosynth request --real``)
writes them with :class:`aerosynth.data.tile_export.TileExport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.json_input import read_json_object
from aerosynth.data.manifest import file_sha256
from aerosynth.data.tileset import TILES_FILE, SplitInfo, read_tiles_file

#: ``detector``: labelled by the run's handed-over ``detector.pt`` (made on first request, see
#: ``aerosynth.flows.request``); ``self-training`` / ``heatmap`` / ``fused``: the labels the adapt flow trained on.
REAL_METHODS = ("detector", "self-training", "heatmap", "fused")
#: What makes each method's folder, for the error a run without it gets.
_HOW = {
    "detector": "`aerosynth adapt` writes RUN/detector.pt; `aerosynth request --real detector` then labels the tiles",
}
SUMMARY_FILE = "summary.json"


@dataclass
class RealTile:
    """One labelled real tile.

    Attributes:
        tile_id: its id in the split (file stem).
        png: its RGB PNG (the dataset's symlink to the split's image).
        detections: its boxes in pixels (class 0).
        flagged: its weak flag ("contains a vehicle").
        transform: pixel -> map affine transform from ``tiles.json``, or ``None`` when it has none.
        crs: CRS of ``transform`` (``EPSG:n`` or WKT), or ``None``.
        width: width in pixels.
        height: height in pixels.
    """

    tile_id: str
    png: Path
    detections: Detections
    flagged: bool
    transform: Affine | None
    crs: str | None
    width: int
    height: int


@dataclass
class RealDataset:
    """A labelled real-tile folder of a run.

    Attributes:
        method: ``self-training`` or ``heatmap``.
        folder: ``RUN/annotation/real-<method>/dataset``.
        split_dir: the split its tiles come from (``RUN/tiles/<split>``).
        summary: its ``summary.json`` (threshold, counts, provenance).
        split: header of the split's ``tiles.json`` (domain, GSD, tile size).
        tiles: every tile, in ``tiles.json`` order.
    """

    method: str
    folder: Path
    split_dir: Path
    summary: dict
    split: SplitInfo
    tiles: list[RealTile]


def run_detector(run_dir: str | Path) -> Path:
    """The detector a run handed over, ``RUN/detector.pt`` (``request --real detector`` labels with it).

    Raises:
        InputError: the run has none.
    """
    weights = Path(run_dir) / "detector.pt"
    if not weights.is_file():
        raise InputError(weights, "the run has no handed-over detector; `aerosynth adapt` writes it")
    return weights


def real_dataset_dir(run_dir: str | Path, method: str) -> Path:
    """``RUN/annotation/real-<method>/dataset`` of an adapted run.

    Raises:
        InputError: an unknown method, or a run without that folder (the message says how to make it).
    """
    if method not in REAL_METHODS:
        raise InputError("real", f"unknown labelling method {method!r}; choose one of {', '.join(REAL_METHODS)}")
    folder = Path(run_dir) / "annotation" / f"real-{method}" / "dataset"
    if not (folder / SUMMARY_FILE).is_file() or not (folder / "labels").is_dir():
        how = _HOW.get(
            method,
            f"create them with `aerosynth adapt` (annotation.real_target.enabled: true, methods including {method}) "
            "on this run folder",
        )
        raise InputError(folder, f"no real target tiles labelled by {method} in this run; {how}")
    return folder


def open_real_dataset(run_dir: str | Path, method: str) -> RealDataset:
    """Read a run's labelled real tiles (labels, weak flags and georeference of every tile).

    Args:
        run_dir: the adapted run folder (``WORK`` of the adapt flow).
        method: ``self-training`` or ``heatmap``.

    Raises:
        InputError: the folder is missing (see :func:`real_dataset_dir`), its split is missing, or its
            labels and the split's tiles disagree (a stale folder: rerun ``aerosynth adapt``).
    """
    folder = real_dataset_dir(run_dir, method)
    summary = read_json_object(folder / SUMMARY_FILE)
    split_dir = Path(run_dir) / "tiles" / str(summary.get("split") or "target-train")
    info, records = read_tiles_file(split_dir)
    labelled = {p.stem for p in (folder / "labels").glob("*.txt")}
    known = {r.tile_id for r in records}
    if labelled != known:
        odd = sorted(labelled ^ known)[0]
        raise InputError(
            folder,
            f"labels and {split_dir / 'tiles.json'} disagree (tile {odd!r} is in one only); "
            "rerun `aerosynth adapt` to relabel the tiles",
        )
    tiles = []
    for r in records:
        label = folder / "labels" / f"{r.tile_id}.txt"
        png = folder / "images" / f"{r.tile_id}.png"
        if not png.is_file():
            png = split_dir / "images" / f"{r.tile_id}.png"
        dets = Detections.from_yolo(label.read_text(), r.width, r.height, where=str(label)).with_class(0)
        transform = Affine(*r.transform) if r.transform is not None else None
        tiles.append(RealTile(r.tile_id, png, dets, r.has_vehicle, transform, r.crs, r.width, r.height))
    return RealDataset(method, folder, split_dir, summary, info, tiles)


def pick_real_tiles(
    tiles: list[RealTile], count: int, seed: int, with_vehicles: bool | None
) -> tuple[list[RealTile], int]:
    """``count`` tiles drawn without replacement with ``numpy.random.default_rng(seed)``, in their original order.

    Args:
        tiles: the candidates, in ``tiles.json`` order.
        count: how many; all candidates when it is not smaller than their number.
        seed: the draw's seed (the same seed gives the same tiles).
        with_vehicles: ``True``: only tiles with at least one box; ``False``: only tiles without; ``None``: all.

    Returns:
        The tiles chosen and the number of candidates.
    """
    pool = [t for t in tiles if with_vehicles is None or bool(len(t.detections)) == with_vehicles]
    if count >= len(pool):
        return pool, len(pool)
    chosen = np.sort(np.random.default_rng(seed).choice(len(pool), size=count, replace=False))
    return [pool[int(i)] for i in chosen], len(pool)


def common_crs(tiles: list[RealTile], where: str | Path) -> str | None:
    """The one CRS of georeferenced tiles, or ``None`` when no tile has a georeference.

    Raises:
        InputError: some tiles have a georeference and some not, or they are in several CRSs.
    """
    crss = {t.crs if t.transform is not None else None for t in tiles}
    if crss == {None} or not crss:
        return None
    if None in crss or len(crss) > 1:
        raise InputError(
            where,
            f"the chosen tiles are in {len(crss)} coordinate systems ({', '.join(sorted(map(str, crss)))[:200]}); "
            "an export has one (prepare the domain's rasters in one CRS)",
        )
    return crss.pop()


@dataclass
class RealChoice:
    """The real tiles a request exports.

    Attributes:
        dataset: the labelled folder they come from.
        tiles: the tiles drawn, in ``tiles.json`` order.
        crs: their one CRS, or ``None`` when the split has no georeference.
        candidates: how many tiles they were drawn from.
    """

    dataset: RealDataset
    tiles: list[RealTile]
    crs: str | None
    candidates: int

    def record(self) -> dict:
        """What ``request.json`` says of them: method, folder, its ``summary.json`` and sha256s, the draw."""
        ds = self.dataset
        return {
            "method": ds.method,
            "threshold": ds.summary.get("threshold"),
            "dataset": str(ds.folder.resolve()),
            "summary": ds.summary,
            "summary_sha256": file_sha256(ds.folder / SUMMARY_FILE),
            "split": str(ds.split_dir.resolve()),
            "tiles_json_sha256": file_sha256(ds.split_dir / TILES_FILE),
            "candidates": self.candidates,
            "drawn": "numpy default_rng(seed).choice without replacement, kept in tiles.json order",
        }


def choose_real_tiles(
    run_dir: str | Path, method: str, domain: str, count: int, seed: int, with_vehicles: bool | None
) -> RealChoice:
    """Check a request for real tiles and draw them (nothing is written).

    Args:
        run_dir: the adapted run folder.
        method: ``self-training`` or ``heatmap``.
        domain: ``target`` or the name of the split's domain.
        count: how many tiles (all when there are fewer).
        seed: seed of the draw.
        with_vehicles: only tiles with boxes, only tiles without, or (``None``) either.

    Raises:
        InputError: no such labelled folder (:func:`real_dataset_dir`), another domain, no tile to
            draw, or tiles in several CRSs.
    """
    dataset = open_real_dataset(run_dir, method)
    if domain not in ("target", dataset.split.domain):
        raise InputError(
            "domain", f"real tiles are the run's {dataset.split.name} tiles ({dataset.split.domain}); got {domain!r}"
        )
    tiles, candidates = pick_real_tiles(dataset.tiles, count, seed, with_vehicles)
    if not tiles:
        kind = "with" if with_vehicles else "without"
        raise InputError("with_vehicles", f"no tile of {dataset.split_dir} labelled by {method} is {kind} boxes")
    return RealChoice(dataset, tiles, common_crs(tiles, dataset.split_dir / TILES_FILE), candidates)
