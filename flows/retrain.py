"""The ``retrain`` flow: new target imagery -> weak flags -> re-adapt -> compare -> promote if not worse.

One run:

1. **Watch**: the GeoTIFFs of the watched folder whose sha256 is not yet in the registry's
   ``seen.json`` are the new imagery. None: the run stops there and says so.
2. **Weak flags** per 128 px tile (tile grid and ids exactly as ``aerosynth.data.prepare`` cuts target splits):
   given — a ``flags.json`` entry for the tile id, else the raster's ``<stem>.geojson`` labels
   (a tile with a kept box has a vehicle), else a ``flags.json`` entry for the raster (file name
   or stem) — or computed by the production detector (a detection with confidence >= the
   threshold on the tile). ``flags="auto"`` uses given flags where there are any and the
   detector elsewhere; ``"given"`` requires given flags; ``"detector"`` ignores them.
3. **Tiles** of the run: ``source-train``/``source-val`` of the registry's tiles, the new weak
   ``target-train``, and the registry's evaluation split as ``target-test`` (boxes under
   ``evaluation/``, never trained on).
4. **Re-adapt** with the adapt flow's stage functions (LDM stages, synthesis, annotation, one
   detector variant, first seed), cached per stage: a rerun after a crash resumes.
5. **Compare** the candidate and the production detector on the same evaluation split; the
   candidate is registered with both numbers and promoted only if its AP50 is not lower.

Run folder: ``REGISTRY/runs/<run id>/`` (the run id hashes the new imagery), holding
``config.yaml``, ``tiles/``, ``ldm/``, ``synthetic/``, ``annotation/``, ``detectors/``,
``flags.json`` (where each tile's flag came from) and ``report/``.

``flags.json`` in the watched folder maps tile ids (``<raster stem>_<x0>_<y0>``, offsets in tiles
at the registry's GSD) or raster names to ``true``/``false``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.flows.config import AdaptConfig, build_config, dump_config
from aerosynth.flows.registry import Registry, Version
from aerosynth.flows.stage_cache import run_stage, stage_record
from affine import Affine
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

FLAGS_FILE = "flags.json"
RASTER_SUFFIXES = (".tif", ".tiff")
#: Variants tried in this order when none is named (the first the config produces is the candidate).
CANDIDATE_ORDER = ("relay+source", "relay", "threshold", "translation")
FlagMode = Literal["auto", "given", "detector"]
#: Images (RGB arrays) in, one :class:`Detections` with confidences per image out.
Predictor = Callable[[list[np.ndarray]], list[Detections]]


def _logger() -> logging.Logger:
    try:
        return get_run_logger()  # type: ignore[return-value]
    except Exception:
        return logging.getLogger("aerosynth.flows.retrain")


# ------------------------------------------------------------------------ watched folder
@dataclass(frozen=True)
class NewRaster:
    """A GeoTIFF of the watched folder not used before.

    Attributes:
        path: the raster.
        sha256: its content hash (the key in ``seen.json``).
        labels: ``<stem>.geojson`` beside it, or ``None``.
    """

    path: Path
    sha256: str
    labels: Path | None = None


def find_new_imagery(watch_dir: str | Path, registry: Registry) -> list[NewRaster]:
    """GeoTIFFs in ``watch_dir`` whose sha256 is not in ``registry.seen()`` (a copy counts once).

    Raises:
        InputError: the folder does not exist.
    """
    from aerosynth.data.manifest import file_sha256

    watch_dir = Path(watch_dir)
    if not watch_dir.is_dir():
        raise InputError(watch_dir, "watched folder not found")
    seen = registry.seen()
    out: dict[str, NewRaster] = {}
    for p in sorted(watch_dir.iterdir()):
        if p.suffix.lower() not in RASTER_SUFFIXES or p.name.startswith(".") or not p.is_file():
            continue
        sha = file_sha256(p)
        if sha in seen or sha in out:
            continue
        lab = p.with_suffix(".geojson")
        out[sha] = NewRaster(p, sha, lab if lab.is_file() else None)
    stems = [r.path.stem for r in out.values()]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(watch_dir, f"two new rasters share the file stem {dup[0]!r} (tile ids would collide)")
    return list(out.values())


def read_flags_file(path: str | Path) -> dict[str, bool]:
    """``flags.json``: tile id or raster name -> has_vehicle (``{}`` when the file is absent).

    Raises:
        InputError: not JSON, not a mapping, or a value that is not true/false.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(path, "must map tile ids or raster names to true/false")
    for k, v in doc.items():
        if not isinstance(v, bool):
            raise InputError(f"{path}: {k}", f"flag must be true or false, got {v!r}")
    return doc


# ----------------------------------------------------------------------------- weak flags
def detector_predictor(weights: str | Path, conf: float, imgsz: int = 128, device: str = "cpu") -> Predictor:
    """A :data:`Predictor` running a trained detector (detections down to ``conf``)."""
    from aerosynth.detection.prediction import predict

    def run(images: list[np.ndarray]) -> list[Detections]:
        return predict(weights, images, conf=conf, imgsz=imgsz, device=device) if images else []

    return run


@dataclass
class WeakSplitSummary:
    """What :func:`build_weak_split` wrote and where each flag came from."""

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
    from aerosynth.data.domains import Domain, DomainImage
    from aerosynth.data.geo import crs_to_string
    from aerosynth.data.imageio import write_png
    from aerosynth.data.tileset import TILES_FILE, SplitInfo, TileRecord, tiles_document
    from aerosynth.data.tiling import cut_tiles, resample, resample_labels, resample_transform

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


# ---------------------------------------------------------------------------- run tiles
def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder with hard links where the file system allows (real files: hashing sees them)."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


@dataclass
class RunSettings:
    """How one retrain run gets its flags and which detector it proposes.

    Attributes:
        flags: ``"auto"``, ``"given"`` or ``"detector"``.
        flag_threshold: detector confidence that flags a tile as having a vehicle.
        variant: the adapted detector variant proposed (default: first of :data:`CANDIDATE_ORDER`).
        bands: band selection of rasters with other than three bands.
    """

    flags: FlagMode = "auto"
    flag_threshold: float = 0.25
    variant: str | None = None
    bands: list[int] | None = None

    def __post_init__(self) -> None:
        if self.flags not in ("auto", "given", "detector"):
            raise InputError("flags", f"unknown flag source {self.flags!r} (auto, given or detector)")
        if not 0.0 <= self.flag_threshold <= 1.0:
            raise InputError("flag_threshold", f"must be in [0, 1], got {self.flag_threshold}")


def build_run_tiles(
    registry: Registry,
    rasters: Sequence[NewRaster],
    work: Path,
    settings: RunSettings,
    given: dict[str, bool],
    production: Version | None,
    imgsz: int = 128,
    device: str = "cpu",
    predictor: Predictor | None = None,
) -> Path:
    """The run's tiles folder (stage ``tiles``): registry source splits, new weak target-train,
    evaluation split as target-test. Writes ``work/flags.json`` (each tile's flag and its source).
    """
    from aerosynth.data.manifest import tree_sha256, write_manifest
    from aerosynth.data.tileset import EVALUATION_DIR, open_evaluation_split

    base, split = registry.evaluation.tiles, registry.evaluation.split
    base_manifest = json.loads((base / "manifest.json").read_text()) if (base / "manifest.json").is_file() else {}
    evaluation = open_evaluation_split(base, split)
    domain, gsd, tile_size = evaluation.info.domain, evaluation.info.gsd, evaluation.info.tile_size
    if predictor is None and production is not None and settings.flags != "given":
        predictor = detector_predictor(production.detector, settings.flag_threshold, imgsz, device)
    key = {
        "new_imagery": sorted(r.sha256 for r in rasters),
        "flags": settings.flags,
        "threshold": settings.flag_threshold,
        "bands": settings.bands,
        "given": given,
        "base_manifest": base_manifest.get("content_sha256"),
        "evaluation": split,
        "flag_detector": production.record.get("files", {}).get("detector.pt") if production else None,
    }

    def build(out: Path) -> None:
        for child in out.iterdir():  # leftovers of an interrupted build
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        splits: dict[str, dict] = {}
        for name in ("source-train", "source-val"):
            if (base / name / "tiles.json").is_file():
                _link_tree(base / name, out / name)
                splits[name] = dict(base_manifest.get("splits", {}).get(name, {}))
        weak = build_weak_split(
            rasters,
            out / "target-train",
            domain,
            gsd,
            tile_size,
            settings.flags,
            given,
            predictor,
            settings.flag_threshold,
            settings.bands,
        )
        _link_tree(evaluation.root, out / "target-test")
        if evaluation.labels_root != evaluation.root:
            _link_tree(evaluation.labels_root, out / EVALUATION_DIR / "target-test")
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
        atomic_write_json(work / FLAGS_FILE, weak.to_dict())  # before the stage record: a finished stage has it

    tiles, _ = run_stage("tiles", work / "tiles", key, {}, build, _logger())
    return tiles


# ------------------------------------------------------------------------------ readapt
def run_config(config: dict | AdaptConfig | None, registry: Registry, work: Path) -> AdaptConfig:
    """The adapt config of a run: GSD and tile size of the registry's tiles, no oracle, ``work`` as run folder."""
    from aerosynth.data.tileset import open_evaluation_split

    if isinstance(config, AdaptConfig):
        cfg = config.model_copy(deep=True)
    else:
        cfg = build_config(config or {"preset": "demo"})
    info = open_evaluation_split(registry.evaluation.tiles, registry.evaluation.split).info
    cfg.data.gsd, cfg.data.tile_size = info.gsd, info.tile_size
    cfg.detection.oracle = False  # the run has no target-train boxes
    cfg.work_dir = work
    return cfg


def readapt(
    cfg: AdaptConfig, work: Path, tiles: Path, variant: str | None = None, use_tasks: bool = False
) -> tuple[str, Path]:
    """LDM stages, synthesis, annotation and one detector, with the adapt flow's functions.

    Args:
        cfg: the run's config (:func:`run_config`).
        work: the run folder.
        tiles: the run's tiles (:func:`build_run_tiles`).
        variant: the detector variant proposed (default: first of :data:`CANDIDATE_ORDER` the config makes).
        use_tasks: call the adapt flow's Prefect tasks (inside a flow run; synthesis shards are
            then mapped over the flow's task runner, as in the adapt flow).

    Returns:
        ``(variant name, detector stage folder)``; the weights are ``folder/train/detector.pt``.

    Raises:
        InputError: the named variant is not produced by this config.
    """
    from aerosynth.flows import adapt

    train_ldm = adapt.train_ldm_task if use_tasks else adapt.train_ldm
    annotate = adapt.annotate_task if use_tasks else adapt.annotate
    train_and_evaluate = adapt.train_and_evaluate_task if use_tasks else adapt.train_and_evaluate
    seed = cfg.detection.seeds[0]
    model = train_ldm(cfg, work, tiles)
    sets = adapt.synthesise(cfg, work, tiles, model)
    relay = cfg.annotation.relay
    if relay.enabled and getattr(relay, "reuse_source_only", False):
        # as in the adapt flow: the relay's source detector F_S is the source-only detector
        source_only = train_and_evaluate(cfg, work, tiles, adapt.variants(cfg, tiles, {}, {})[0], seed)
        labelled = annotate(cfg, work, tiles, sets, source_only)
    else:
        labelled = annotate(cfg, work, tiles, sets)
    available = {v.name: v for v in adapt.variants(cfg, tiles, labelled, sets) if v.name != adapt.ORACLE}
    name = variant or next((n for n in CANDIDATE_ORDER if n in available), None)
    if name not in available:
        raise InputError("variant", f"{name!r} is not produced by this config (one of {', '.join(sorted(available))})")
    return name, train_and_evaluate(cfg, work, tiles, available[name], seed)


# ------------------------------------------------------------------- evaluate and decide
def evaluate_detector(weights: str | Path, registry: Registry, imgsz: int = 128, device: str = "cpu"):
    """COCO metrics of a detector on the registry's evaluation split (``aerosynth.detection.evaluation``)."""
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.detection.evaluation import evaluate_split
    from aerosynth.detection.prediction import predict

    split = open_evaluation_split(registry.evaluation.tiles, registry.evaluation.split)
    preds = predict(
        weights, [split.image_path(t.tile_id) for t in split], conf=0.001, imgsz=imgsz, max_det=100, device=device
    )
    return evaluate_split(split, preds)


@dataclass(frozen=True)
class Decision:
    """Whether a candidate replaces production.

    Attributes:
        promote: True when the candidate becomes production.
        candidate_ap50: candidate AP50 on the evaluation split.
        production_ap50: production AP50 on the same split (``None``: no production yet).
        production_version: the production version compared against.
        reason: one line for logs and reports.
    """

    promote: bool
    candidate_ap50: float
    production_ap50: float | None
    production_version: str | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def decide(candidate_ap50: float, production_ap50: float | None, production_version: str | None = None) -> Decision:
    """Promote only if the candidate's AP50 is not worse (``>=``) than production's, or there is none."""
    if production_ap50 is None:
        return Decision(True, candidate_ap50, None, None, "no production detector yet")
    if candidate_ap50 >= production_ap50:
        reason = f"AP50 {candidate_ap50:.4f} >= {production_ap50:.4f} of {production_version}: not worse"
        return Decision(True, candidate_ap50, production_ap50, production_version, reason)
    reason = f"AP50 {candidate_ap50:.4f} < {production_ap50:.4f} of {production_version}: kept {production_version}"
    return Decision(False, candidate_ap50, production_ap50, production_version, reason)


def write_retrain_report(
    out_dir: Path,
    decision: Decision,
    candidate,
    production,
    variant: str,
    flags: dict,
    new_imagery: Sequence[NewRaster],
) -> dict[str, Path]:
    """``report.md``, ``report.json`` and ``pr_curves.png`` of a retrain run; returns them by name."""
    from aerosynth.detection.report import plot_pr_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [("candidate", variant, candidate)]
    if production is not None:
        rows.insert(0, ("production", decision.production_version or "", production))
    lines = [
        f"# aerosynth retrain: {'promoted' if decision.promote else 'not promoted'}",
        "",
        decision.reason,
        "",
        "| detector | what | AP50 | AP50:95 | P | R | F1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r} | {w} | {m.ap50:.4f} | {m.ap50_95:.4f} | {m.precision:.3f} | {m.recall:.3f} | {m.f1:.3f} |"
        for r, w, m in rows
    ]
    by_source = flags.get("by_source", {})
    lines += [
        "",
        f"New imagery: {len(new_imagery)} raster(s), {flags.get('tiles', 0)} tiles, "
        f"{flags.get('with_vehicle', 0)} flagged with vehicles "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(by_source.items()))}).",
        "",
    ]
    lines += [f"- `{r.path.name}` sha256 `{r.sha256[:16]}`" for r in new_imagery]
    md = atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    js = atomic_write_json(
        out_dir / "report.json",
        {
            "decision": decision.to_dict(),
            "variant": variant,
            "candidate": candidate.to_dict(with_curve=False),
            "production": None if production is None else production.to_dict(with_curve=False),
            "flags": {k: v for k, v in flags.items() if k != "per_tile"},
            "new_imagery": [{"name": r.path.name, "sha256": r.sha256} for r in new_imagery],
        },
    )
    png = plot_pr_curves({name: [m] for name, _, m in rows}, out_dir / "pr_curves.png")
    return {"report.md": md, "report.json": js, "pr_curves.png": png}


def record_candidate(
    registry: Registry,
    detector: Path,
    candidate,
    production,
    production_version: str | None,
    provenance: dict,
    config_yaml: str | None = None,
    files: dict[str, Path] | None = None,
) -> tuple[Version, Decision]:
    """Decide, register the candidate with both numbers, promote it when not worse, log the decision.

    Args:
        registry: the registry.
        detector: candidate weights.
        candidate: its :class:`~aerosynth.detection.evaluation.EvaluationResult` on the evaluation split.
        production: production's result on the same split, or ``None`` when there is no production.
        production_version: production's version name.
        provenance: run and data provenance (``provenance.json``).
        config_yaml: the run's config.
        files: report files to keep in the version.
    """
    decision = decide(candidate.ap50, None if production is None else production.ap50, production_version)
    metrics = {
        "evaluation": {"tiles": str(registry.evaluation.tiles), "split": registry.evaluation.split},
        "ap50": candidate.ap50,
        "candidate": candidate.to_dict(with_curve=False),
        "production": None
        if production is None
        else {"version": production_version, **production.to_dict(with_curve=False)},
        "decision": decision.to_dict(),
    }
    version = registry.register(detector, metrics, provenance, config_yaml, files)
    if decision.promote:
        registry.promote(version.name, decision.reason)
    registry.log_decision(
        {
            "version": version.name,
            "promoted": decision.promote,
            "candidate_ap50": decision.candidate_ap50,
            "production_ap50": decision.production_ap50,
            "production_version": decision.production_version,
            "reason": decision.reason,
            "run": provenance.get("run_id"),
        }
    )
    _logger().info("%s: %s", version.name, decision.reason)
    return version, decision


def register_baseline(
    registry: Registry,
    detector: str | Path,
    imgsz: int = 128,
    device: str = "cpu",
    provenance: dict | None = None,
    promote: bool = True,
) -> Version:
    """Register an existing detector (e.g. an adapt run's) with its evaluation, as production by default."""
    result = evaluate_detector(detector, registry, imgsz, device)
    metrics = {
        "evaluation": {"tiles": str(registry.evaluation.tiles), "split": registry.evaluation.split},
        "ap50": result.ap50,
        "candidate": result.to_dict(with_curve=False),
        "production": None,
        "decision": {"promote": promote, "reason": "baseline registered by hand"},
    }
    version = registry.register(
        detector, metrics, {"kind": "baseline", "source": str(Path(detector).resolve()), **(provenance or {})}
    )
    if promote:
        registry.promote(version.name, "baseline")
        registry.log_decision(
            {
                "version": version.name,
                "promoted": True,
                "candidate_ap50": result.ap50,
                "production_ap50": None,
                "production_version": None,
                "reason": "baseline",
            }
        )
    return version


def ensure_registry(
    root: str | Path,
    tiles: str | Path | None = None,
    split: str = "target-test",
    baseline: str | Path | None = None,
    imgsz: int = 128,
    device: str = "cpu",
) -> Registry:
    """Open a registry, creating it from ``tiles`` when given, and register ``baseline`` as production when
    the registry has none yet (a baseline given again later is ignored, never registered twice).

    Raises:
        InputError: no registry and no ``tiles``; the evaluation split has no boxes; the registry
            evaluates on other tiles.
    """
    if tiles is not None:
        registry = Registry.create(root, tiles, split, exist_ok=True)
    else:
        registry = Registry(root)
    if baseline is not None and registry.production() is None:
        version = register_baseline(registry, baseline, imgsz, device)
        _logger().info("baseline %s registered as production %s", baseline, version.name)
    return registry


# --------------------------------------------------------------------------------- run
@dataclass
class RetrainOutcome:
    """What a retrain run did.

    Attributes:
        status: ``"nothing-new"`` or ``"registered"``.
        message: one line saying so.
        new_imagery: names of the new rasters.
        version: the registered version, or ``None``.
        promoted: whether it became production.
        decision: the decision as a dict, or ``None``.
        work_dir: the run folder, or ``None``.
    """

    status: str
    message: str
    new_imagery: list[str] = field(default_factory=list)
    version: str | None = None
    promoted: bool = False
    decision: dict | None = None
    work_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_id_for(rasters: Sequence[NewRaster]) -> str:
    """``r-<12 hex>`` from the sha256 of the new imagery: the same imagery resumes the same run folder."""
    return "r-" + hashlib.sha256("\n".join(sorted(r.sha256 for r in rasters)).encode()).hexdigest()[:12]


@dataclass
class _Steps:
    """The step functions of a run: plain, or Prefect tasks inside the flow (tests put stubs here)."""

    build_tiles: Callable = build_run_tiles
    readapt: Callable = readapt
    evaluate: Callable = evaluate_detector
    use_tasks: bool = False


def _sha_or_none(path: Path) -> str | None:
    from aerosynth.data.manifest import file_sha256

    return file_sha256(path) if path.is_file() else None


def _flow_run_id() -> str | None:
    try:
        from prefect.context import get_run_context

        return str(get_run_context().flow_run.id)
    except Exception:
        return None


def retrain(
    registry_dir: str | Path,
    watch_dir: str | Path,
    config: dict | AdaptConfig | None = None,
    settings: RunSettings | None = None,
    work_root: str | Path | None = None,
    predictor: Predictor | None = None,
    steps: _Steps | None = None,
) -> RetrainOutcome:
    """One retrain run (see the module docstring); plain function, no Prefect needed.

    Args:
        registry_dir: the registry (made with :meth:`aerosynth.flows.registry.Registry.create`).
        watch_dir: the watched folder of GeoTIFFs (+ ``<stem>.geojson``, ``flags.json``).
        config: an adapt config document (or :class:`AdaptConfig`); default ``{"preset": "demo"}``.
        settings: flag source, threshold, candidate variant.
        work_root: where run folders go (default ``REGISTRY/runs``).
        predictor: replaces the production detector for flags (tests, other models).
        steps: the step functions (the flow passes Prefect tasks).
    """
    log = _logger()
    registry = Registry(registry_dir)
    settings = settings or RunSettings()
    steps = steps or _Steps()
    new = find_new_imagery(watch_dir, registry)
    if not new:
        msg = f"nothing new in {watch_dir}: every GeoTIFF there is already in the registry; nothing to do"
        log.info(msg)
        return RetrainOutcome("nothing-new", msg)
    names = [r.path.name for r in new]
    log.info("new imagery: %d raster(s): %s", len(new), ", ".join(names))
    given = read_flags_file(Path(watch_dir) / FLAGS_FILE)
    production = registry.production()
    run_id = run_id_for(new)
    work = Path(work_root) if work_root is not None else registry.root / "runs"
    work = work / run_id
    cfg = run_config(config, registry, work)
    work.mkdir(parents=True, exist_ok=True)
    config_yaml = dump_config(cfg)
    atomic_write_text(work / "config.yaml", config_yaml)
    tiles = steps.build_tiles(
        registry, new, work, settings, given, production, cfg.detection.imgsz, cfg.device, predictor
    )
    variant, det_dir = steps.readapt(cfg, work, tiles, settings.variant, steps.use_tasks)
    weights = det_dir / "train" / "detector.pt"
    candidate = steps.evaluate(weights, registry, cfg.detection.imgsz, cfg.device)
    prod_result = (
        None if production is None else steps.evaluate(production.detector, registry, cfg.detection.imgsz, cfg.device)
    )
    flags = json.loads((work / FLAGS_FILE).read_text()) if (work / FLAGS_FILE).is_file() else {}
    tiles_manifest = json.loads((tiles / "manifest.json").read_text())
    provenance = {
        "kind": "retrain",
        "run_id": run_id,
        "work_dir": str(work.resolve()),
        "flow_run_id": _flow_run_id(),
        "parent_version": production.name if production else None,
        "variant": variant,
        "seed": cfg.detection.seeds[0],
        "new_imagery": [
            {"name": r.path.name, "sha256": r.sha256, "labels": r.labels.name if r.labels else None} for r in new
        ],
        "flags": {
            "mode": settings.flags,
            "threshold": settings.flag_threshold,
            "detector": production.name if production and flags.get("by_source", {}).get("detector") else None,
            **{k: v for k, v in flags.items() if k != "per_tile"},
        },
        "data": {
            "tiles_content_sha256": tiles_manifest.get("content_sha256"),
            "splits": {k: v.get("content_sha256") for k, v in tiles_manifest["splits"].items()},
            "base_tiles": str(registry.evaluation.tiles),
            "base_manifest_sha256": _sha_or_none(registry.evaluation.tiles / "manifest.json"),
            "evaluation_split": registry.evaluation.split,
        },
        "stages": {
            str(p.parent.relative_to(work)): (stage_record(p.parent) or {}).get("key")
            for p in sorted(work.rglob("stage_done.json"))
        },
    }
    decision = decide(
        candidate.ap50, None if prod_result is None else prod_result.ap50, production.name if production else None
    )
    files = write_retrain_report(work / "report", decision, candidate, prod_result, variant, flags, new)
    version, decision = record_candidate(
        registry,
        weights,
        candidate,
        prod_result,
        production.name if production else None,
        provenance,
        config_yaml,
        files,
    )
    registry.mark_seen({r.sha256: r.path.name for r in new}, version.name)
    msg = f"{version.name} registered ({variant}): {decision.reason}"
    log.info(msg)
    return RetrainOutcome("registered", msg, names, version.name, decision.promote, decision.to_dict(), str(work))


# ------------------------------------------------------------------------------ prefect
_task = task(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
build_run_tiles_task = _task(build_run_tiles)
evaluate_detector_task = _task(evaluate_detector)


@flow(name="retrain", log_prints=True)
def retrain_flow(
    registry: str,
    watch: str,
    config: dict | None = None,
    flags: str = "auto",
    flag_threshold: float = 0.25,
    variant: str | None = None,
    work_root: str | None = None,
) -> dict:
    """Retrain on new imagery of ``watch`` and promote if not worse; returns :class:`RetrainOutcome` as a dict."""
    settings = RunSettings(flags=flags, flag_threshold=flag_threshold, variant=variant)  # type: ignore[arg-type]
    steps = _Steps(build_run_tiles_task, readapt, evaluate_detector_task, use_tasks=True)
    outcome = retrain(registry, watch, config, settings, work_root, steps=steps)
    _publish(outcome)
    return outcome.to_dict()


def run_retrain(
    registry: str | Path,
    watch: str | Path,
    config: dict | AdaptConfig | None = None,
    flags: str = "auto",
    flag_threshold: float = 0.25,
    variant: str | None = None,
    work_root: str | Path | None = None,
) -> dict:
    """Run :func:`retrain_flow` with the task runner the config names (sequential or Dask), as ``run_adapt`` does."""
    from aerosynth.flows.scale import task_runner

    cfg = config if isinstance(config, AdaptConfig) else build_config(config or {"preset": "demo"})
    RunSettings(flags=flags, flag_threshold=flag_threshold)  # type: ignore[arg-type]  # bad input before any work
    runner = task_runner(cfg.runner, cfg.dask_address, cfg.dask_workers)
    return retrain_flow.with_options(task_runner=runner)(
        str(registry),
        str(watch),
        cfg.model_dump(mode="json"),
        flags,
        flag_threshold,
        variant,
        None if work_root is None else str(work_root),
    )


def _publish(outcome: RetrainOutcome) -> None:
    """The run's report as a Prefect artifact (no-op outside a flow run)."""
    try:
        from prefect.artifacts import create_markdown_artifact

        report = Path(outcome.work_dir or ".") / "report" / "report.md"
        text = report.read_text() if outcome.work_dir and report.is_file() else outcome.message
        create_markdown_artifact(text, key="retrain-report", description="aerosynth retrain decision")
    except Exception as exc:  # artifacts are a convenience, never a failure
        _logger().warning("could not publish artifacts: %s", exc)
