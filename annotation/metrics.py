"""Small box metrics for annotation: matching at IoU 0.5, precision/recall/F1, AP50, thresholds.

Matching follows COCO: predictions are taken by decreasing confidence, each claims the
unmatched ground-truth box of highest IoU at or above ``iou_threshold`` (a true positive);
an unmatched prediction lying mostly (intersection over its own area >= ``iou_threshold``)
inside an ignore region is neither true nor false; anything else is a false positive.
AP50 is COCO's 101-point interpolated average precision over all images pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from aerosynth.data.detections import Detections, box_iou


@dataclass
class MatchResult:
    """Predictions of all images pooled: confidence, outcome, and the number of ground-truth boxes."""

    confidence: np.ndarray  # (P,)
    true_positive: np.ndarray  # (P,) bool
    ignored: np.ndarray  # (P,) bool
    n_ground_truth: int


@dataclass
class Score:
    """Detection quality at one confidence threshold."""

    threshold: float
    precision: float
    recall: float
    f1: float
    ap50: float
    true_positives: int
    false_positives: int
    ground_truth: int

    def to_dict(self) -> dict:
        return asdict(self)


def _intersection_over_first(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    return inter / np.maximum(area[:, None], 1e-12)


def match_image(
    pred: Detections, gt: Detections, ignore: Detections | None = None, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Outcome of every prediction of one image: ``(true_positive, ignored)`` boolean arrays."""
    n = len(pred)
    tp = np.zeros(n, bool)
    ign = np.zeros(n, bool)
    if n == 0:
        return tp, ign
    conf = pred.confidence if pred.confidence is not None else np.ones(n)
    order = np.argsort(-conf, kind="stable")
    iou = box_iou(pred.xyxy, gt.xyxy) if len(gt) else np.zeros((n, 0))
    taken = np.zeros(len(gt), bool)
    for i in order:
        if len(gt):
            cand = np.where(~taken, iou[i], -1.0)
            j = int(np.argmax(cand))
            if cand[j] >= iou_threshold:
                taken[j] = True
                tp[i] = True
                continue
    if ignore is not None and len(ignore):
        inside = _intersection_over_first(pred.xyxy, ignore.xyxy).max(axis=1) >= iou_threshold
        ign = ~tp & inside
    return tp, ign


def match_all(
    preds: Sequence[Detections],
    gts: Sequence[Detections],
    ignores: Sequence[Detections | None] | None = None,
    iou_threshold: float = 0.5,
) -> MatchResult:
    """Match every image's predictions and pool them."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} prediction lists for {len(gts)} ground-truth lists")
    ignores = list(ignores) if ignores is not None else [None] * len(gts)
    confs, tps, igns = [], [], []
    n_gt = 0
    for pred, gt, ign in zip(preds, gts, ignores, strict=True):
        tp, ig = match_image(pred, gt, ign, iou_threshold)
        confs.append(pred.confidence if pred.confidence is not None else np.ones(len(pred)))
        tps.append(tp)
        igns.append(ig)
        n_gt += len(gt)
    cat = np.concatenate
    return MatchResult(
        cat(confs) if confs else np.zeros(0),
        cat(tps) if tps else np.zeros(0, bool),
        cat(igns) if igns else np.zeros(0, bool),
        n_gt,
    )


def _curve(m: MatchResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence-sorted ``(confidence, precision, recall)`` over the counted predictions."""
    keep = ~m.ignored
    conf, tp = m.confidence[keep], m.true_positive[keep]
    order = np.argsort(-conf, kind="stable")
    conf, tp = conf[order], tp[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    precision = ctp / np.maximum(ctp + cfp, 1)
    recall = ctp / m.n_ground_truth if m.n_ground_truth else np.zeros_like(ctp, dtype=float)
    return conf, precision, recall


def average_precision(m: MatchResult) -> float:
    """COCO-style 101-point interpolated AP of pooled matches (0 without ground truth)."""
    if m.n_ground_truth == 0:
        return 0.0
    _, precision, recall = _curve(m)
    if len(precision) == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.linspace(0, 1, 101)
    idx = np.searchsorted(recall, points, side="left")
    values = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)
    return float(values.mean())


def score_at(m: MatchResult, threshold: float = 0.0) -> Score:
    """Precision, recall, F1 of the predictions with confidence >= ``threshold``; AP50 of all."""
    sel = (m.confidence >= threshold) & ~m.ignored
    tp = int(m.true_positive[sel].sum())
    fp = int(sel.sum() - tp)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / m.n_ground_truth if m.n_ground_truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Score(float(threshold), precision, recall, f1, average_precision(m), tp, fp, m.n_ground_truth)


def f1_optimal_threshold(m: MatchResult) -> Score:
    """The confidence threshold that maximises F1 (ties: the higher threshold)."""
    conf, precision, recall = _curve(m)
    if len(conf) == 0 or m.n_ground_truth == 0:
        return score_at(m, float(conf.max()) if len(conf) else 1.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    # a threshold equal to a confidence admits every prediction with that confidence: use run ends
    last_of_run = np.r_[conf[1:] != conf[:-1], True]
    f1 = np.where(last_of_run, f1, -1.0)
    best = float(f1.max())
    k = int(np.flatnonzero(f1 == best)[0])  # earliest = highest threshold
    return score_at(m, float(conf[k]))


def threshold_for_precision(m: MatchResult, target: float) -> float | None:
    """Lowest confidence threshold whose precision is still >= ``target`` (``None``: never reached)."""
    conf, precision, _ = _curve(m)
    last_of_run = np.r_[conf[1:] != conf[:-1], True] if len(conf) else np.zeros(0, bool)
    ok = np.flatnonzero((precision >= target) & last_of_run)
    return float(conf[ok[-1]]) if len(ok) else None


def threshold_for_recall(m: MatchResult, target: float) -> float | None:
    """Highest confidence threshold whose recall reaches ``target`` (``None``: never reached)."""
    conf, _, recall = _curve(m)
    last_of_run = np.r_[conf[1:] != conf[:-1], True] if len(conf) else np.zeros(0, bool)
    ok = np.flatnonzero((recall >= target) & last_of_run)
    return float(conf[ok[0]]) if len(ok) else None


def label_quality(labels_dir, tiles) -> dict:
    """Precision, recall and F1 of a labels folder (YOLO, one file per target-train tile) against the true
    target-train boxes of a tiles folder, read through the evaluation API.

    A diagnostic for benchmarks, read after a run: nothing in the pipeline may choose on it.
    """
    from pathlib import Path

    from aerosynth.data.tileset import open_evaluation_split

    labels_dir = Path(labels_dir)
    truth = open_evaluation_split(Path(tiles), "target-train")
    preds = []
    for t in truth.tiles:
        path = labels_dir / f"{t.tile_id}.txt"
        d = Detections.from_yolo(path.read_text() if path.is_file() else "", t.width, t.height)
        preds.append(Detections(d.xyxy, np.ones(len(d)), d.class_id))
    gts = [truth.labels(t.tile_id) for t in truth.tiles]
    ignores = [truth.ignore_regions(t.tile_id) for t in truth.tiles]
    score = score_at(match_all(preds, gts, ignores), 0.0).to_dict()
    return {k: score[k] for k in ("precision", "recall", "f1", "true_positives", "false_positives", "ground_truth")}


def label_agreement(labels_a, labels_b, iou_threshold: float = 0.5) -> dict:
    """How far two label folders (YOLO, one file per tile) agree: box F1 of ``labels_a`` against ``labels_b``.

    Label-free (neither folder is the truth): the adapt flow's self-training rounds stop when a round's
    labels agree with the previous round's. Tiles missing from a folder count as having no box.
    """
    from pathlib import Path

    labels_a, labels_b = Path(labels_a), Path(labels_b)
    names = sorted({p.name for p in labels_a.glob("*.txt")} | {p.name for p in labels_b.glob("*.txt")})

    def read(folder: Path, name: str) -> Detections:
        path = folder / name
        return Detections.from_yolo(path.read_text() if path.is_file() else "", 1000, 1000)

    preds, gts = [], []
    for name in names:
        a = read(labels_a, name)
        preds.append(Detections(a.xyxy, np.ones(len(a)), a.class_id))
        gts.append(read(labels_b, name))
    score = score_at(match_all(preds, gts, iou_threshold=iou_threshold), 0.0).to_dict()
    return {"tiles": len(names), "precision": score["precision"], "recall": score["recall"], "f1": score["f1"]}
