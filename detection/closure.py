"""Gap closure: how much of the way from the source-only detector to the oracle a variant goes.

One definition, used by the run's report and by the benchmarks:

    closure = (mean adapted - mean source-only) / (mean oracle - mean source-only)

over the seeds that all three share (the paired design: each seed's variant fine-tunes that seed's
source-only detector, and the oracle is that seed's fine-tune on true target boxes). Its 95 % interval is a
paired bootstrap: seeds are drawn with replacement, each draw keeping a seed's three figures together, and
the ratio of means is recomputed on every draw (draws whose oracle gap is not positive are left out).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: Bootstrap draws of the interval, and the seed of their generator (the interval repeats run to run).
BOOTSTRAP_DRAWS = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class GapClosure:
    """A variant's gap closure over paired seeds.

    Attributes:
        ratio_of_means: ``(mean adapted - mean source-only) / (mean oracle - mean source-only)``; ``None``
            when the oracle does not beat source-only on average (no gap to close) or no seed is shared.
        ci95: the paired bootstrap 95 % interval, ``None`` with fewer than two seeds.
        seeds: the seeds shared by the three, in the order given.
    """

    ratio_of_means: float | None
    ci95: tuple[float, float] | None
    seeds: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "ratio_of_means": self.ratio_of_means,
            "ci95": None if self.ci95 is None else list(self.ci95),
            "seeds": list(self.seeds),
        }

    def fmt(self, digits: int = 2) -> str:
        """``1.06 (1.00..1.16)``, ``1.06`` with one seed, ``n/a`` without a gap."""
        if self.ratio_of_means is None:
            return "n/a"
        text = f"{self.ratio_of_means:.{digits}f}"
        if self.ci95 is not None:
            text += f" ({self.ci95[0]:.{digits}f}..{self.ci95[1]:.{digits}f})"
        return text


def _ratio(adapted: np.ndarray, source: np.ndarray, oracle: np.ndarray) -> float | None:
    gap = float(oracle.mean() - source.mean())
    if gap <= 1e-12:
        return None
    return float((adapted.mean() - source.mean()) / gap)


def gap_closure(
    adapted: Mapping[str, float],
    source_only: Mapping[str, float],
    oracle: Mapping[str, float],
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = BOOTSTRAP_SEED,
) -> GapClosure:
    """The ratio of means over the seeds the three share, with its paired bootstrap 95 % interval.

    Args:
        adapted: AP50 per seed of the adapted variant (seed name -> AP50).
        source_only: AP50 per seed of the source-only detector.
        oracle: AP50 per seed of the oracle.
        draws: bootstrap draws.
        seed: seed of the bootstrap's generator.
    """
    adapted, source_only, oracle = ({str(k): v for k, v in m.items()} for m in (adapted, source_only, oracle))
    seeds = tuple(s for s in adapted if s in source_only and s in oracle)
    if not seeds:
        return GapClosure(None, None, ())
    a = np.array([adapted[s] for s in seeds], dtype=float)
    s_ = np.array([source_only[s] for s in seeds], dtype=float)
    o = np.array([oracle[s] for s in seeds], dtype=float)
    point = _ratio(a, s_, o)
    if point is None or len(seeds) < 2:
        return GapClosure(point, None, seeds)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(seeds), size=(draws, len(seeds)))
    gaps = o[picks].mean(axis=1) - s_[picks].mean(axis=1)
    keep = gaps > 1e-12
    ratios = (a[picks].mean(axis=1)[keep] - s_[picks].mean(axis=1)[keep]) / gaps[keep]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return GapClosure(point, (round(float(lo), 4), round(float(hi), 4)), seeds)
