"""The ``retrain`` flow: new target imagery -> weak flags -> re-adapt -> compare -> promote if not worse.

One run, step by step:

1. **Watch**: the GeoTIFFs of the watched folder whose sha256 is not yet in the registry's
   ``seen.json`` are the new imagery (:func:`aerosynth.data.watch.find_new_rasters`). None: the run
   stops there and says so.
2. **Weak flags** per 128 px tile (tile grid and ids exactly as ``aerosynth.data.prepare`` cuts target
   splits; :mod:`aerosynth.data.weak_split`): given ones from ``flags.json`` or the raster's
   ``<stem>.geojson`` labels, or computed by the production detector. ``flags="auto"`` uses given
   flags where there are any and the detector elsewhere; ``"given"`` requires given flags;
   ``"detector"`` ignores them.
3. **Tiles** of the run: ``source-train``/``source-val`` of the registry's tiles, the new weak
   ``target-train``, and the registry's evaluation split as ``target-test`` (boxes under
   ``evaluation/``, never trained on).
4. **Re-adapt** with the adapt flow's stage functions (LDM stages, synthesis, annotation, one
   detector variant, first seed), cached per stage: a rerun after a crash resumes.
5. **Compare** the candidate and the production detector on the same evaluation split; the
   candidate is registered with both numbers and promoted only if its AP50 is not lower
   (:mod:`aerosynth.detection.promotion`; the registry is :mod:`aerosynth.detection.registry`).

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.watch import FLAGS_FILE, NewRaster, find_new_rasters, read_watched_flags
from aerosynth.data.weak_split import FlagMode, Predictor, assemble_run_tiles, read_base_manifest
from aerosynth.detection.promotion import (
    Decision,
    decide,
    evaluate_detector,
    record_candidate,
)
from aerosynth.detection.registry import Registry, Version
from aerosynth.flows.config import AdaptConfig, build_config, dump_config
from aerosynth.flows.stage_cache import run_stage, stage_record

#: Variants tried in this order when none is named (the first the config produces is the candidate).
CANDIDATE_ORDER = (
    "real-self-training+source",
    "relay+source",
    "threshold+source",
    "translation+source",
    "real-heatmap+source",
)


def _logger() -> logging.Logger:
    try:
        return get_run_logger()  # type: ignore[return-value]
    except Exception:
        return logging.getLogger("aerosynth.flows.retrain")


# ------------------------------------------------------------------------ watched folder
def find_new_imagery(watch_dir: str | Path, registry: Registry) -> list[NewRaster]:
    """GeoTIFFs in ``watch_dir`` the registry has not seen (by sha256; a copy counts once).

    Raises:
        InputError: the folder does not exist.
    """
    return find_new_rasters(watch_dir, registry.seen())


# ----------------------------------------------------------------------------- weak flags
def detector_predictor(weights: str | Path, conf: float, imgsz: int = 128, device: str = "cpu") -> Predictor:
    """A :data:`Predictor` running a trained detector (detections down to ``conf``)."""
    from aerosynth.detection.prediction import predict

    def run(images: list[np.ndarray]) -> list[Detections]:
        return predict(weights, images, conf=conf, imgsz=imgsz, device=device) if images else []

    return run


# ---------------------------------------------------------------------------- run tiles
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
    base, split = registry.evaluation.tiles, registry.evaluation.split
    base_manifest = read_base_manifest(base)
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
        weak = assemble_run_tiles(
            out, base, split, rasters, settings.flags, given, predictor, settings.flag_threshold, settings.bands
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
    relay, real = cfg.annotation.relay, cfg.annotation.real_target
    source_only = None
    paired = cfg.detection.design == "paired"
    if paired or (relay.enabled and relay.reuse_source_only) or (real.enabled and "self-training" in real.methods):
        # as in the adapt flow: F_S (relay, self-training, the paired design's start) is the source-only detector
        source_only = train_and_evaluate(cfg, work, tiles, adapt.variants(cfg, tiles, {}, {})[0], seed)
    labelled = annotate(cfg, work, tiles, sets, source_only, model)
    available = {v.name: v for v in adapt.variants(cfg, tiles, labelled, sets) if v.kind != "oracle"}
    name = variant or next((n for n in CANDIDATE_ORDER if n in available), None)
    if name not in available:
        raise InputError("variant", f"{name!r} is not produced by this config (one of {', '.join(sorted(available))})")
    chosen = available[name]
    return name, train_and_evaluate(cfg, work, tiles, chosen, seed, source_only if chosen.finetune else None)


# ------------------------------------------------------------------------------ report
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
        registry_dir: the registry (made with :meth:`aerosynth.detection.registry.Registry.create`).
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
    given = read_watched_flags(watch_dir)
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
        log,
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
    wait: bool = False,
) -> dict:
    """Run :func:`retrain_flow` with the task runner the config names, as ``run_adapt`` does.

    The run holds the registry's lock (:func:`aerosynth.flows.run_lock.work_lock`): a second retrain of
    the same registry is refused (``InputError``), or waits for this one with ``wait``.
    """
    from aerosynth.flows.run_lock import work_lock
    from aerosynth.flows.scale import shared_api, task_runner

    cfg = config if isinstance(config, AdaptConfig) else build_config(config or {"preset": "demo"})
    RunSettings(flags=flags, flag_threshold=flag_threshold)  # type: ignore[arg-type]  # bad input before any work
    runner = task_runner(cfg.runner, cfg.dask_address, cfg.dask_workers)
    with work_lock(registry, wait=wait, create=False), shared_api(cfg.runner, cfg.dask_address):
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
