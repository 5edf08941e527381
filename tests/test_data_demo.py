"""The embedded demo: seeded rendering of its two domains, its preset, and the one-line reading of its table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aerosynth.data.demo import render_carpark, render_suburb
from aerosynth.flows.cli import _demo_note
from aerosynth.flows.config import build_config


@pytest.mark.parametrize("render", [render_suburb, render_carpark])
def test_demo_scenes_are_seeded_and_boxes_lie_in_the_scene(render):
    a, boxes_a = render(np.random.default_rng([0, 1, 2]), 256, 0.125, 14)
    b, boxes_b = render(np.random.default_rng([0, 1, 2]), 256, 0.125, 14)
    c, _ = render(np.random.default_rng([0, 1, 3]), 256, 0.125, 14)
    assert a.dtype == np.uint8 and a.shape == (256, 256, 3)
    assert np.array_equal(a, b) and np.array_equal(boxes_a.xyxy, boxes_b.xyxy)
    assert not np.array_equal(a, c)
    assert 0 < len(boxes_a) <= 14
    assert boxes_a.xyxy.min() >= 0 and boxes_a.xyxy.max() <= 256


def test_empty_demo_scene_has_no_vehicle():
    _, boxes = render_carpark(np.random.default_rng(5), 256, 0.125, 0)
    assert len(boxes) == 0


def test_demo_domains_look_different():
    """Source lawns are green, target sand is not: the gap a source-only detector has to cross."""
    src = np.mean([render_suburb(np.random.default_rng(i), 256, 0.10, 12)[0].mean((0, 1)) for i in range(4)], 0)
    tgt = np.mean([render_carpark(np.random.default_rng(i), 256, 0.125, 12)[0].mean((0, 1)) for i in range(4)], 0)
    assert src[1] > src[0] and tgt[0] > tgt[1] > tgt[2]  # green-dominant vs red-dominant (RGB)


def test_demo_preset_fine_tunes_at_once_in_two_worker_processes():
    cfg = build_config({"preset": "demo"})
    assert cfg.runner == "processes" and cfg.dask_workers == 2
    assert cfg.detection.design == "paired" and not cfg.detection.continued
    assert cfg.annotation.real_target.methods == ["self-training"]


def _report(tmp_path, ap: dict[str, float]):
    """A report.json as the report writes it: each adapted row carries its closure (detection.closure)."""
    from aerosynth.detection.closure import gap_closure

    def closure(v: str, x: float) -> dict | None:
        if v in ("source-only", "oracle"):
            return None
        return gap_closure({"0": x}, {"0": ap["source-only"]}, {"0": ap["oracle"]}).to_dict()

    rows = [
        {"variant": v, "role": "", "seeds": 1, "ap50": {"mean": x, "std": 0.0}, "gap_closure": closure(v, x)}
        for v, x in ap.items()
    ]
    doc = {"split": {"name": "target-test", "tiles": 104, "domain": "arid_carpark"}, "variants": rows}
    (tmp_path / "report.json").write_text(json.dumps(doc))
    return tmp_path / "report.md"


def test_demo_note_reads_the_table_in_one_line(tmp_path):
    report = _report(tmp_path, {"source-only": 0.3, "real-self-training+source": 0.6, "oracle": 0.8})
    lines = _demo_note(report).splitlines()
    assert len(lines) == 2 and lines[-1].endswith(str(report))
    reading = lines[0]
    assert "104 target-test tiles of arid_carpark" in reading
    assert "AP50 0.300" in reading and "lifts it to 0.600 (+0.300, 60% of the way to the oracle)" in reading
    assert "(0.800)" in reading


def test_demo_note_says_when_adaptation_does_not_help(tmp_path):
    report = _report(tmp_path, {"source-only": 0.3, "real-self-training+source": 0.31, "oracle": 0.8})
    assert "does not clearly help on this run (0.310, +0.010)" in _demo_note(report)
