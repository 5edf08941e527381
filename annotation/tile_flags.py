"""Tile flags without an analyst (``data.flags: none``, the source-free setting): F_S says which tiles hold a vehicle.

A tile's score is the highest confidence of the source-only detector's boxes on it (0 without a box). The
threshold is chosen on the labelled source-val tiles, whose flags are known from their boxes: the lowest score
at which the tiles flagged "vehicle" are at least ``precision`` right (the most tiles flagged for that
precision). Target tiles at or above it are flagged "vehicle", the others "empty". No target label is read.

:func:`derive_target_flags` writes a tile folder like the one ``data prepare`` writes, whose ``target-train``
carries those flags and whose other splits are the original ones (links), so every later stage reads it as it
reads given flags. With a flag budget (``data.flag_budget``: an analyst flagged a share of the tiles,
:func:`aerosynth.data.flags.sample_tiles`) the given flags of those tiles stay and the others are derived, or left out.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.flags import UNFLAGGED_FILE
from aerosynth.data.manifest import read_manifest, write_manifest
from aerosynth.data.tileset import TILES_FILE, open_split, read_tiles_file, tiles_document

#: The derived flags' record beside the tile folder's manifest.
DERIVED_FLAGS_FILE = "derived_flags.json"


@dataclass(frozen=True)
class FlagThreshold:
    """The score threshold of derived flags and what it gives on the source-val tiles it was chosen on.

    Attributes:
        threshold: a tile is flagged "vehicle" when its best box's confidence reaches it.
        precision: tile-level precision on source-val at the threshold.
        recall: tile-level recall on source-val at the threshold.
        target_precision: the precision asked for; ``reached`` says whether some threshold gave it (else the
            threshold of the best precision is taken).
        reached: whether ``precision >= target_precision``.
        tiles: source-val tiles; ``with_vehicle``: those holding one.
    """

    threshold: float
    precision: float
    recall: float
    target_precision: float
    reached: bool
    tiles: int
    with_vehicle: int

    def to_dict(self) -> dict:
        return asdict(self)


def tile_scores(detections: Sequence[Detections]) -> np.ndarray:
    """The best confidence of each tile's boxes (0 for a tile without a box)."""
    return np.array([float(d.confidence.max()) if len(d) else 0.0 for d in detections], dtype=float)


def choose_flag_threshold(scores: np.ndarray, flags: Sequence[bool], precision: float = 0.9) -> FlagThreshold:
    """The lowest tile score whose "vehicle" flags reach ``precision`` on tiles with known flags.

    Args:
        scores: each tile's score (:func:`tile_scores`).
        flags: each tile's true flag (from its boxes).
        precision: the tile-level precision asked for, in (0, 1].

    Raises:
        InputError: no tile holds a vehicle, or no tile scores above 0 (nothing to choose on).
    """
    scores, truth = np.asarray(scores, dtype=float), np.asarray(flags, dtype=bool)
    if not truth.any():
        raise InputError("source-val", "no tile holds a vehicle: no threshold for derived flags can be chosen")
    candidates = np.unique(scores[scores > 0])[::-1]  # from the highest score down
    if not len(candidates):
        raise InputError("source-val", "the source-only detector finds nothing: no threshold for derived flags")
    flagged = scores[None, :] >= candidates[:, None]
    hits = (flagged & truth[None, :]).sum(axis=1)
    prec = hits / flagged.sum(axis=1)
    rec = hits / truth.sum()
    ok = np.flatnonzero(prec >= precision)
    i = int(ok[-1]) if len(ok) else int(np.argmax(prec))  # the lowest threshold that keeps the precision
    return FlagThreshold(
        threshold=float(candidates[i]),
        precision=round(float(prec[i]), 4),
        recall=round(float(rec[i]), 4),
        target_precision=precision,
        reached=bool(len(ok)),
        tiles=int(len(truth)),
        with_vehicle=int(truth.sum()),
    )


def _predict_split(detector: Path, split, imgsz: int, device: str) -> list[Detections]:
    from aerosynth.detection.prediction import predict

    return predict(detector, [split.image_path(t.tile_id) for t in split], conf=0.001, imgsz=imgsz, device=device)


def derive_target_flags(
    detector: str | Path | None,
    tiles: str | Path,
    out: str | Path,
    precision: float = 0.9,
    imgsz: int = 128,
    device: str = "cpu",
    keep: Collection[str] | None = None,
    rest: str = "derived",
) -> Path:
    """A tile folder whose ``target-train`` flags come from ``detector`` (F_S), thresholded on ``source-val``.

    Args:
        detector: the source-only detector's weights (``None`` only with ``rest="skip"``).
        tiles: the prepared tile folder (``data prepare`` output).
        out: the folder written: every entry of ``tiles`` linked, but ``target-train/tiles.json`` rewritten
            with the derived flags, ``manifest.json`` updated and ``derived_flags.json`` (the threshold, its
            source-val figures and each target tile's score).
        precision: the tile-level precision the threshold keeps on source-val.
        imgsz: the detector's input size.
        device: inference device.
        keep: target-train tiles whose given flags stay (a flag budget,
            :func:`aerosynth.data.flags.sample_tiles`); ``None``: no given flag stays (``data.flags: none``).
        rest: what the tiles outside ``keep`` become: ``derived`` (flagged by the detector) or ``skip`` (left
            out of target-train).

    Returns:
        ``out``.
    """
    if rest not in ("derived", "skip"):
        raise InputError("rest", f"derived or skip, got {rest!r}")
    tiles, out = Path(tiles), Path(out)
    train_dir = tiles / "target-train"
    info, records = read_tiles_file(train_dir)
    kept = set(keep) if keep is not None else set()
    chosen, scores = None, None
    if rest == "derived":
        if detector is None:
            raise InputError("detector", "derived flags need the source-only detector")
        val = open_split(tiles / "source-val")
        if val.info.weak:
            raise InputError(tiles / "source-val", "a weak split: derived flags are chosen on labelled source tiles")
        val_flags = [len(val.labels(t.tile_id)) > 0 for t in val]  # type: ignore[attr-defined]
        chosen = choose_flag_threshold(
            tile_scores(_predict_split(Path(detector), val, imgsz, device)), val_flags, precision
        )
        scores = tile_scores(_predict_split(Path(detector), open_split(train_dir), imgsz, device))
        for record, score in zip(records, scores, strict=True):
            if record.tile_id not in kept:
                record.has_vehicle = bool(score >= chosen.threshold)
    else:
        records = [r for r in records if r.tile_id in kept]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for entry in tiles.iterdir():
        if entry.name in ("target-train", "manifest.json") or entry.name.startswith("stage_"):
            continue
        os.symlink(entry.resolve(), out / entry.name, target_is_directory=entry.is_dir())
    (out / "target-train").mkdir()
    for entry in train_dir.iterdir():  # every tile flagged now: no unflagged list
        if entry.name not in (TILES_FILE, UNFLAGGED_FILE):
            os.symlink(entry.resolve(), out / "target-train" / entry.name, target_is_directory=entry.is_dir())
    atomic_write_json(out / "target-train" / TILES_FILE, tiles_document(info, records))
    flagged = sum(r.has_vehicle for r in records)
    record_doc: dict = {
        "from": "given flags on the kept tiles; the others "
        + (
            "flagged by the source-only detector's best box per tile, thresholded on source-val"
            if rest == "derived"
            else "left out"
        )
        + " (no target label read)",
        "given_kept": len(kept & {r.tile_id for r in records}),
        "rest": rest,
        "source_val": None if chosen is None else chosen.to_dict(),
        "target_train": {"tiles": len(records), "flagged_vehicle": flagged},
    }
    if scores is not None:
        ids = [r.tile_id for r in records]
        record_doc["scores"] = {t: float(s) for t, s in zip(ids, scores, strict=True)}
    atomic_write_json(out / DERIVED_FLAGS_FILE, record_doc)
    manifest = read_manifest(tiles) or {}
    manifest = {k: v for k, v in manifest.items() if k != "content_sha256"}
    split = dict(manifest.get("splits", {}).get("target-train", {}))
    split.pop("content_sha256", None)  # the images' are unchanged; the flags are in tiles.json
    split.update(
        {"tiles": len(records), "tiles_with_vehicles": flagged, "flags": "derived" if keep is None else "budget"}
    )
    manifest.setdefault("splits", {})["target-train"] = split
    manifest["derived_flags"] = {k: v for k, v in record_doc.items() if k != "scores"}
    write_manifest(out, manifest)
    return out
