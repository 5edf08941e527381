"""The promotion rule of the detector registry, and registering detectors with their evaluation.

Every detector is evaluated on the registry's evaluation split (:func:`evaluate_detector`); a
candidate is registered as a new version with its numbers and production's, and becomes
production only if its AP50 is not lower (:func:`decide`, :func:`record_candidate`). Each decision
is appended to the registry's ``decisions.jsonl``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from aerosynth.detection.registry import Registry, Version

logger = logging.getLogger(__name__)


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


def record_candidate(
    registry: Registry,
    detector: Path,
    candidate,
    production,
    production_version: str | None,
    provenance: dict,
    config_yaml: str | None = None,
    files: dict[str, Path] | None = None,
    log: logging.Logger | None = None,
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
        log: where the decision is logged (default: this module's logger).

    Returns:
        The new version and the decision taken.
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
    (log or logger).info("%s: %s", version.name, decision.reason)
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
        logger.info("baseline %s registered as production %s", baseline, version.name)
    return registry
