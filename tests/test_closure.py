"""One gap closure (ratio of means over paired seeds) with a paired bootstrap interval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aerosynth.detection.closure import gap_closure

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_closure_is_the_ratio_of_means_not_the_mean_of_ratios():
    source = {"0": 0.40, "1": 0.70}
    oracle = {"0": 0.80, "1": 0.75}
    adapted = {"0": 0.60, "1": 0.74}
    c = gap_closure(adapted, source, oracle)
    assert c.ratio_of_means == pytest.approx((0.67 - 0.55) / (0.775 - 0.55))
    per_seed_mean = ((0.60 - 0.40) / 0.40 + (0.74 - 0.70) / 0.05) / 2  # what the benchmark used to report
    assert abs(c.ratio_of_means - per_seed_mean) > 0.1
    lo, hi = c.ci95
    assert lo <= c.ratio_of_means <= hi


def test_closure_pairs_seeds_and_needs_a_gap():
    # seeds are matched by name (ints or strings); a seed the oracle lacks is left out
    c = gap_closure({0: 0.6, 1: 0.7, 2: 0.9}, {"0": 0.5, "1": 0.5, "2": 0.5}, {"0": 0.7, "1": 0.7})
    assert c.seeds == ("0", "1") and c.ratio_of_means == pytest.approx(0.75)
    assert gap_closure({"0": 0.6}, {"0": 0.5}, {"0": 0.4}).fmt() == "n/a"  # the oracle below source-only
    one = gap_closure({"0": 0.6}, {"0": 0.5}, {"0": 0.7})
    assert one.ci95 is None and one.fmt() == "0.50"
    assert gap_closure({}, {}, {}).ratio_of_means is None


def test_the_interval_repeats_and_narrows_with_agreeing_seeds():
    source = {str(i): 0.5 for i in range(5)}
    oracle = {str(i): 0.8 for i in range(5)}
    noisy = {str(i): v for i, v in enumerate([0.55, 0.80, 0.62, 0.75, 0.70])}
    steady = {str(i): 0.68 for i in range(5)}
    a, b = gap_closure(noisy, source, oracle), gap_closure(noisy, source, oracle)
    assert a == b  # a seeded bootstrap
    lo, hi = a.ci95
    assert hi - lo > 0.2
    assert gap_closure(steady, source, oracle).ci95 == (0.6, 0.6)


@pytest.mark.parametrize("target", ["minsk", "kit"])
def test_the_committed_adapt_flow_figures_give_one_closure(target):
    doc = json.loads((RESULTS / f"adapt_flow_{target}.json").read_text())["variants"]
    if "closure" not in doc["real-heatmap-r3+source"]:
        pytest.skip("results written before the one closure")
    row = doc["real-heatmap-r3+source"]
    c = gap_closure(row["per_seed"], doc["source-only"]["per_seed"], doc["oracle"]["per_seed"])
    assert row["closure"] == c.to_dict()
