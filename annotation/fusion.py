"""Fuse the boxes several proposers put on one tile (weighted boxes fusion).

The two label-free proposers of a real target tile fail differently: F_S misses vehicles that look
unlike its source and the "cars" heat map finds blobs that are not cars or merges neighbours. Where
they agree, a box is likelier right. Weighted boxes fusion (Solovyev et al., 2021) clusters the boxes
of all proposers by IoU, averages each cluster's coordinates weighted by confidence, and gives the
cluster the mean confidence of its members scaled by the share of proposers that put a box there, so
a box one proposer alone found keeps half its confidence out of two proposers.

The fused confidences are thresholded like any proposer's (:func:`aerosynth.annotation.real_target.source_threshold`
on labelled source-val), so how much one proposer alone counts is decided on source tiles, never on
target boxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aerosynth.data.detections import Detections, box_iou
from aerosynth.data.errors import InputError


def fuse_boxes(
    proposals: Sequence[Detections], iou_threshold: float = 0.55, weights: Sequence[float] | None = None
) -> Detections:
    """Weighted boxes fusion of one tile's proposals from several proposers.

    Args:
        proposals: one :class:`Detections` per proposer (boxes without a confidence count as 1.0).
        iou_threshold: a box joins the cluster whose fused box it overlaps at least this much.
        weights: one weight per proposer (default equal): a proposer's confidences are scaled by
            ``weight / mean(weights)``.

    Returns:
        The fused boxes, class 0, confidences in ``[0, max confidence]``, highest first.

    Raises:
        InputError: no proposer, a weight count that does not match, or an IoU threshold outside (0, 1].
    """
    if not proposals:
        raise InputError("proposals", "nothing to fuse")
    if not 0 < iou_threshold <= 1:
        raise InputError("iou_threshold", f"{iou_threshold} is not in (0, 1]")
    n = len(proposals)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != n or np.any(w < 0) or w.sum() <= 0:
        raise InputError("weights", f"need {n} non-negative weights with a positive sum, got {list(w)}")
    w = w / w.mean()
    boxes, scores, owner = [], [], []
    for m, dets in enumerate(proposals):
        if len(dets) == 0:
            continue
        conf = dets.confidence if dets.confidence is not None else np.ones(len(dets))
        boxes.append(np.asarray(dets.xyxy, dtype=np.float64))
        scores.append(np.asarray(conf, dtype=np.float64) * w[m])
        owner.append(np.full(len(dets), m))
    if not boxes:
        return Detections.empty(with_confidence=True)
    xyxy, score, who = np.concatenate(boxes), np.concatenate(scores), np.concatenate(owner)
    order = np.argsort(-score, kind="stable")
    fused: list[np.ndarray] = []  # fused box of each cluster
    members: list[list[int]] = []
    for i in order:
        if fused:
            iou = box_iou(xyxy[i : i + 1], np.stack(fused))[0]
            j = int(np.argmax(iou))
            if iou[j] >= iou_threshold:
                members[j].append(int(i))
                s = score[members[j]]
                fused[j] = (xyxy[members[j]] * s[:, None]).sum(0) / max(s.sum(), 1e-12)
                continue
        fused.append(xyxy[i].copy())
        members.append([int(i)])
    conf = np.array([score[idx].mean() * min(len(set(who[idx].tolist())), n) / n for idx in members], dtype=np.float64)
    rank = np.argsort(-conf, kind="stable")
    return Detections(np.stack(fused)[rank], conf[rank].astype(np.float32), np.zeros(len(rank), np.int64))


def fuse_proposers(
    per_proposer: Sequence[Sequence[Detections]], iou_threshold: float = 0.55, weights: Sequence[float] | None = None
) -> list[Detections]:
    """:func:`fuse_boxes` tile by tile: ``per_proposer[m][i]`` is proposer ``m``'s boxes on tile ``i``."""
    if not per_proposer:
        raise InputError("proposals", "nothing to fuse")
    counts = {len(p) for p in per_proposer}
    if len(counts) != 1:
        raise InputError("proposals", f"proposers cover different tile counts: {sorted(counts)}")
    return [fuse_boxes(tile, iou_threshold, weights) for tile in zip(*per_proposer, strict=True)]
