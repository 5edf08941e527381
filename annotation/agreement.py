"""Agreement on synthetic images, without any target label: heat-map boxes against F_S's detections.

For a synthetic set generated with vehicles, the direct method's boxes (:func:`boxes_from_heatmap` on each
image's heat map) are scored taking the source-only detector F_S's detections on the same RGB images as
the truth (AP50, precision, recall at IoU 0.5). High agreement says the heat maps point where a detector
trained on real labels sees vehicles; low agreement says one of the two is off (F_S on an unseen domain
is not the truth either: read it as a consistency check, not an accuracy).

The detector's predictions are an argument (the flow runs :mod:`aerosynth.detection.prediction`), so this
module needs no detector and reads no label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig, boxes_from_heatmap
from aerosynth.annotation.map_quality import score_boxes
from aerosynth.annotation.metrics import f1_optimal_threshold, match_all
from aerosynth.annotation.synthetic_set import open_synthetic_set
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError


def truth_threshold(
    predictions: Sequence[Detections], ground_truth: Sequence[Detections], ignores: Sequence[Detections] | None = None
) -> float:
    """The detector's F1-optimal confidence on a labelled split (real source-val: F_S's ``tau_S``)."""
    return float(f1_optimal_threshold(match_all(predictions, ground_truth, ignores)).threshold)


def heatmap_agreement(
    set_dir: str | Path,
    detections_per_image: Mapping[str, Detections] | Sequence[Detections],
    config: HeatmapBoxConfig | None = None,
    truth_threshold: float = 0.25,
) -> dict:
    """AP50 of a synthetic set's heat-map boxes, taking a detector's detections as the truth.

    Args:
        set_dir: a synthetic set generated with vehicles (``source_cars``, ``target_cars``, ``translation``).
        detections_per_image: the detector's boxes on the set's RGB images, by image name (``000000``...)
            or as a list in the set's order, in image pixels.
        config: the heat-map -> boxes options (the threshold variant's).
        truth_threshold: detections with at least this confidence are the truth.

    Returns:
        ``set``, ``domain``, ``images``, ``truth_boxes``, ``images_with_truth``, ``heatmap_boxes``,
        ``truth_threshold``, ``ap50``, ``precision``, ``recall``, ``f1`` (``None`` when the detector
        found nothing to agree with, with a ``note``) and the ``config``.

    Raises:
        InputError: a set without vehicles, or detections that do not cover the set's images.
    """
    config = (config or HeatmapBoxConfig()).validate()
    sset = open_synthetic_set(set_dir)
    if not sset.with_vehicles:
        raise InputError(set_dir, f"the {sset.name!r} set has no vehicles: nothing to agree on")
    if isinstance(detections_per_image, Mapping):
        missing = [n for n in sset.names if n not in detections_per_image]
        if missing:
            raise InputError("detections_per_image", f"no detections for image {missing[0]} of {sset.root}")
        given = [detections_per_image[n] for n in sset.names]
    else:
        given = list(detections_per_image)
        if len(given) != len(sset):
            raise InputError("detections_per_image", f"{len(given)} entries for {len(sset)} images of {sset.root}")
    truths = [d.filter_confidence(truth_threshold) for d in given]
    size = (sset.info.image_size, sset.info.image_size)
    preds = [
        boxes_from_heatmap(
            sset.heatmap(n, config.view, raw=config.raw_maps), config, gsd=sset.info.gsd, image_size=size
        )
        for n in sset.names
    ]
    n_truth = int(sum(len(t) for t in truths))
    report = {
        "set": sset.name,
        "domain": sset.info.domain,
        "images": len(sset),
        "truth_boxes": n_truth,
        "images_with_truth": int(sum(len(t) > 0 for t in truths)),
        "heatmap_boxes": int(sum(len(p) for p in preds)),
        "truth_threshold": float(truth_threshold),
    }
    if n_truth == 0:
        scores = {"ap50": None, "precision": None, "recall": None, "f1": None}
        report["note"] = "the detector found no vehicle at this threshold: no agreement to measure"
    else:
        s = score_boxes(preds, truths, [Detections.empty() for _ in truths])
        scores = {k: float(s[k]) for k in ("ap50", "precision", "recall", "f1")}
    return {**report, **scores, "config": config.to_dict()}
