"""COCO evaluation of detections on a labelled tile split, with pycocotools.

Metrics (one class, or class-agnostic when the ground truth has one category):

- ``ap50`` and ``ap50_95``: COCO average precision at IoU 0.5 and averaged over IoU
  0.50:0.05:0.95, area range "all", ``maxDets`` 100, exactly as ``COCOeval.summarize`` reads them;
- ``precision``, ``recall``, ``f1`` and ``threshold`` at the F1-optimal confidence at IoU 0.5,
  from the raw (non-interpolated) cumulative matches of ``COCOeval.evaluateImg``;
- ``pr_curve``: recall, precision and confidence at every detection rank (IoU 0.5), for plots.

Ignore regions are the ground truth's ``iscrowd: 1`` annotations (vehicles cut by the tile
edge): a detection matched to one is neither a true nor a false positive, and the region
counts for no recall. Predictions should go down to confidence 0.001 for AP.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.tileset import LabelledTileSplit

MAX_DETS = 100


@dataclass
class PRCurve:
    """Precision-recall points at IoU 0.5, one per detection rank (decreasing confidence)."""

    recall: np.ndarray
    precision: np.ndarray
    confidence: np.ndarray

    def to_dict(self, max_points: int = 200) -> dict:
        """Lists for JSON, thinned to at most ``max_points`` evenly spaced ranks (the last one kept)."""
        n = len(self.recall)
        idx = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int)) if n else np.zeros(0, int)
        return {
            "recall": self.recall[idx].tolist(),
            "precision": self.precision[idx].tolist(),
            "confidence": self.confidence[idx].tolist(),
        }


@dataclass
class EvaluationResult:
    """COCO metrics of one set of predictions on one split."""

    ap50: float
    ap50_95: float
    precision: float
    recall: float
    f1: float
    threshold: float
    n_images: int
    n_ground_truth: int
    n_ignore: int
    n_predictions: int
    pr_curve: PRCurve = field(repr=False)

    def to_dict(self, with_curve: bool = True) -> dict:
        d = asdict(self)
        d.pop("pr_curve")
        if with_curve:
            d["pr_curve"] = self.pr_curve.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvaluationResult:
        d = dict(d)
        curve = d.pop("pr_curve", None) or {"recall": [], "precision": [], "confidence": []}
        return cls(**d, pr_curve=PRCurve(*(np.asarray(curve[k], float) for k in ("recall", "precision", "confidence"))))


def predictions_to_coco(predictions: Mapping[int, Detections], single_category: int | None = None) -> list[dict]:
    """COCO result dicts (``image_id``, ``category_id``, ``bbox``, ``score``) from detections per image id."""
    results = []
    for image_id, dets in predictions.items():
        if len(dets) and dets.confidence is None:
            raise InputError(f"predictions[{image_id}]", "detections without confidence cannot be evaluated")
        for ann in dets.to_coco(image_id):
            r = {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"]}
            r["score"] = ann["score"]
            if single_category is not None:
                r["category_id"] = single_category
            results.append(r)
    return results


def _coco_from_dict(doc: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(doc)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results_coco(gt, results: list[dict]):
    """What ``COCO.loadRes`` builds for bbox results, also for an empty list (which loadRes refuses)."""
    anns = []
    for i, r in enumerate(results, 1):
        x, y, w, h = r["bbox"]
        anns.append({**r, "id": i, "area": w * h, "iscrowd": 0})
    return _coco_from_dict(
        {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": anns}
    )


def _best_f1(eval_imgs: list, max_det: int) -> tuple[PRCurve, int]:
    """Cumulative matches at IoU 0.5 over all images, as ``COCOeval.accumulate`` does, without interpolation."""
    imgs = [e for e in eval_imgs if e is not None]
    if not imgs:
        return PRCurve(np.zeros(0), np.zeros(0), np.zeros(0)), 0
    scores = np.concatenate([e["dtScores"][:max_det] for e in imgs])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([e["dtMatches"][0, :max_det] for e in imgs])[order]
    ignored = np.concatenate([e["dtIgnore"][0, :max_det] for e in imgs])[order]
    n_pos = int(sum(np.count_nonzero(e["gtIgnore"] == 0) for e in imgs))
    keep = ignored == 0
    tp = np.cumsum((matched != 0) & keep)
    fp = np.cumsum((matched == 0) & keep)
    tp, fp, conf = tp[keep], fp[keep], scores[order][keep]
    precision = tp / np.maximum(tp + fp, 1e-12)
    recall = tp / n_pos if n_pos else np.zeros_like(tp, dtype=float)
    return PRCurve(recall.astype(float), precision.astype(float), conf.astype(float)), n_pos


def evaluate_coco(gt_doc: dict, predictions: Mapping[int, Detections]) -> EvaluationResult:
    """Evaluate detections per COCO image id against a COCO ground-truth document.

    Args:
        gt_doc: COCO dict with ``images``, ``annotations`` (``iscrowd: 1`` = ignore region), ``categories``.
        predictions: detections (with confidences) per image id; images left out have none.

    Raises:
        InputError: an unknown image id or detections without confidence.
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = [int(im["id"]) for im in gt_doc["images"]]
    unknown = set(predictions) - set(image_ids)
    if unknown:
        raise InputError("predictions", f"image ids not in the ground truth: {sorted(unknown)[:5]}")
    cats = [int(c["id"]) for c in gt_doc["categories"]]
    gt = _coco_from_dict(gt_doc)
    results = predictions_to_coco(predictions, cats[0] if len(cats) == 1 else None)
    dt = _results_coco(gt, results)
    ev = COCOeval(gt, dt, "bbox")
    ev.params.imgIds = image_ids
    ev.params.maxDets = [1, 10, MAX_DETS]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"]  # [T, R, K, A, M]
    a_all = ev.params.areaRngLbl.index("all")
    m = ev.params.maxDets.index(MAX_DETS)

    def mean_valid(x: np.ndarray) -> float:
        x = x[x > -1]
        return float(np.mean(x)) if x.size else 0.0

    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    ap50 = mean_valid(p[t50, :, :, a_all, m])
    ap = mean_valid(p[:, :, :, a_all, m])

    n_a, n_i = len(ev.params.areaRng), len(ev.params.imgIds)
    all_rng = [
        e
        for k in range(len(ev.params.catIds))
        for e in ev.evalImgs[k * n_a * n_i + a_all * n_i : k * n_a * n_i + (a_all + 1) * n_i]
    ]
    curve, n_pos = _best_f1(all_rng, MAX_DETS)
    if len(curve.recall):
        f1 = 2 * curve.precision * curve.recall / np.maximum(curve.precision + curve.recall, 1e-12)
        best = int(np.argmax(f1))
        prec, rec, f1b, thr = curve.precision[best], curve.recall[best], f1[best], curve.confidence[best]
    else:
        prec = rec = f1b = thr = 0.0
    n_ignore = sum(1 for a in gt_doc["annotations"] if a.get("iscrowd"))
    return EvaluationResult(
        ap50=ap50,
        ap50_95=ap,
        precision=float(prec),
        recall=float(rec),
        f1=float(f1b),
        threshold=float(thr),
        n_images=len(image_ids),
        n_ground_truth=n_pos,
        n_ignore=n_ignore,
        n_predictions=len(results),
        pr_curve=curve,
    )


def _image_ids(split: LabelledTileSplit) -> dict[str, int]:
    """COCO image id of each tile (``file_name`` is ``images/<tile>.png``)."""
    by_name = {im["file_name"]: int(im["id"]) for im in split.coco["images"]}
    try:
        return {t.tile_id: by_name[f"images/{t.tile_id}.png"] for t in split.tiles}
    except KeyError as exc:
        raise InputError(split.coco_path, f"tile {exc.args[0]} missing from the COCO images") from None


def evaluate_split(
    split: LabelledTileSplit, predictions: Sequence[Detections] | Mapping[str, Detections]
) -> EvaluationResult:
    """Evaluate detections on a labelled split (e.g. ``open_evaluation_split(root, "target-test")``).

    Args:
        split: the split with its ``annotations.json``.
        predictions: one :class:`Detections` per tile in ``split.tiles`` order, or a mapping
            tile id -> detections (tiles left out have none).

    Raises:
        InputError: a wrong number of predictions or an unknown tile id.
    """
    if isinstance(predictions, Mapping):
        unknown = set(predictions) - {t.tile_id for t in split.tiles}
        if unknown:
            raise InputError("predictions", f"tiles not in split {split.name}: {sorted(unknown)[:5]}")
        by_tile = dict(predictions)
    else:
        predictions = list(predictions)
        if len(predictions) != len(split.tiles):
            raise InputError("predictions", f"{len(predictions)} entries for {len(split.tiles)} tiles of {split.name}")
        by_tile = {t.tile_id: d for t, d in zip(split.tiles, predictions, strict=True)}
    image_id = _image_ids(split)
    by_id = {image_id[tid]: d for tid, d in by_tile.items()}
    doc = split.coco
    ids = {image_id[t.tile_id] for t in split.tiles}
    if len(ids) != len(doc["images"]):  # evaluate only the split's tiles
        doc = {**doc, "images": [im for im in doc["images"] if im["id"] in ids]}
        doc["annotations"] = [a for a in split.coco["annotations"] if a["image_id"] in ids]
    return evaluate_coco(doc, by_id)
