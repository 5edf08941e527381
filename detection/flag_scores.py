"""Flag-level scores: how well a detector tells tiles with a vehicle from empty ones, with flags only.

Without target boxes there is no AP50. What a region without boxes does have is one flag per tile
("vehicle" or "empty"). A detector's "any vehicle on this tile" score is its most confident box on the
tile (0 for a tile without a box); against the flags of tiles no detector trained on, it gives

- ``tile_ap``: the average precision of that score at telling flagged tiles from empty ones (the area under
  the step precision-recall curve, as ``sklearn.metrics.average_precision_score`` computes it);
- ``auroc``: the probability that a flagged tile scores above an empty one (ties count one half).

Both need at least one tile of each kind. :func:`spearman` compares two rankings of the same detectors
(for instance by tile-level AP and by AP50 where boxes exist).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError


@dataclass(frozen=True)
class FlagScores:
    """A detector's flag-level figures on a set of flagged tiles.

    Attributes:
        tile_ap: average precision of the tile score at finding the tiles flagged "vehicle".
        auroc: area under the ROC curve of the tile score.
        tiles: tiles scored.
        flagged: tiles flagged "vehicle" among them.
        vehicles_per_tile: mean number of boxes at or above ``conf`` per tile.
        conf: the confidence of the count above.
    """

    tile_ap: float
    auroc: float
    tiles: int
    flagged: int
    vehicles_per_tile: float
    conf: float

    def to_dict(self) -> dict:
        return asdict(self)


def tile_score(dets: Detections) -> float:
    """The "any vehicle on this tile" score: the most confident box, 0 for a tile without a box."""
    if len(dets) == 0:
        return 0.0
    if dets.confidence is None:
        raise InputError("detections", "a tile score needs confidences")
    return float(np.max(dets.confidence))


def tile_average_precision(scores: Sequence[float], flags: Sequence[bool]) -> float:
    """Average precision of ``scores`` at ranking the ``True`` flags first (ties broken against them)."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(flags, dtype=bool)
    if y.sum() == 0:
        raise InputError("flags", "no tile flagged 'vehicle': the tile-level AP is undefined")
    order = np.lexsort((y, -s))  # descending score; among equal scores the empty tiles first (pessimistic)
    y = y[order]
    s = s[order]
    # one precision-recall point per distinct score (a threshold takes every tile of that score)
    last_of_score = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_score]
    precision = tp / (last_of_score + 1)
    recall = tp / y.sum()
    recall_step = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_step * precision))


def tile_auroc(scores: Sequence[float], flags: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance that a flagged tile outscores an empty one (ties count 1/2)."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(flags, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError("flags", "the AUROC needs tiles of both kinds (flagged and empty)")
    ranks = stats.rankdata(s)  # average ranks: ties count one half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def flag_scores(predictions: Mapping[str, Detections], flags: Mapping[str, bool], conf: float = 0.25) -> FlagScores:
    """A detector's predictions on flagged tiles, scored against the flags.

    Args:
        predictions: tile id -> the detector's boxes with confidences (down to a low confidence).
        flags: tile id -> flagged "vehicle"; every flagged tile must have a prediction entry.
        conf: the confidence at which boxes are counted for ``vehicles_per_tile``.

    Raises:
        InputError: a flagged tile without predictions, or flags of one kind only.
    """
    missing = sorted(set(flags) - set(predictions))
    if missing:
        raise InputError("predictions", f"no prediction for {len(missing)} flagged tile(s), e.g. {missing[0]}")
    ids = sorted(flags)
    scores = [tile_score(predictions[t]) for t in ids]
    y = [bool(flags[t]) for t in ids]
    counts = [int(np.sum(predictions[t].confidence >= conf)) if len(predictions[t]) else 0 for t in ids]
    return FlagScores(
        tile_ap=round(tile_average_precision(scores, y), 4),
        auroc=round(tile_auroc(scores, y), 4),
        tiles=len(ids),
        flagged=int(sum(y)),
        vehicles_per_tile=round(float(np.mean(counts)), 3) if counts else 0.0,
        conf=conf,
    )


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman's rank correlation of two figures over the keys they share (at least three)."""
    keys = [k for k in a if k in b]
    if len(keys) < 3:
        raise InputError("rankings", f"a rank correlation needs at least 3 shared entries, got {len(keys)}")
    rho = stats.spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic
    return float(rho)
