"""The adapt report's label-free checks of the synthetic sets: two-sample accuracy and heat-map agreement with F_S."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aerosynth.annotation.fake_data import write_fake_root, write_fake_synthetic_set
from aerosynth.data.detections import Detections
from aerosynth.data.imageio import read_rgb
from aerosynth.detection.evaluation import EvaluationResult, PRCurve
from aerosynth.detection.report import write_report
from aerosynth.flows.adapt import synthetic_diagnostics
from aerosynth.flows.config import build_config
from aerosynth.flows.stage_cache import run_stage
from tests.conftest import TINY_ADAPT


def _fake_predict(model_path, images, **kwargs) -> list[Detections]:
    """Stands in for F_S: the boxes of the image's label file when there is one (source tiles, translation)."""
    out = []
    for path in images:
        path = Path(path)
        label = path.parent.parent / "labels" / f"{path.stem}.txt"
        h, w = read_rgb(path).shape[:2]
        boxes = Detections.from_yolo(label.read_text(), w, h) if label.is_file() else Detections.empty()
        out.append(Detections(boxes.xyxy, np.full(len(boxes), 0.9)))
    return out


def _result(ap50: float) -> EvaluationResult:
    curve = PRCurve(np.array([0.5, ap50]), np.array([1.0, 0.8]), np.array([0.9, 0.3]))
    return EvaluationResult(ap50, ap50 / 2, 0.8, ap50, 0.7, 0.3, 4, 10, 0, 12, curve)


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr("aerosynth.detection.prediction.predict", _fake_predict)
    work = tmp_path / "run"
    tiles = write_fake_root(work / "tiles", count=12, size=64)
    kinds = {
        "source_cars": "madison_drone",
        "target_cars": "kit_munich_aerial",
        "target_empty": "kit_munich_aerial",
        "translation": "kit_munich_aerial",
    }
    for k, (name, domain) in enumerate(kinds.items()):
        run_stage(
            f"synthetic/{name}",
            work / "synthetic" / name,
            {"set": name},
            {},
            lambda o, n=name, d=domain, k=k: write_fake_synthetic_set(o, n, d, 8, seed=k),
        )
    fs, _ = run_stage(
        "detectors/source-only/seed0",
        work / "detectors" / "source-only" / "seed0",
        {"fake": True},
        {},
        lambda o: (o / "train").mkdir(parents=True) or (o / "train" / "detector.pt").write_bytes(b"fake"),
    )
    cfg = copy.deepcopy(TINY_ADAPT)
    cfg["work_dir"] = str(work)
    return build_config(cfg), work, tiles, fs


def test_diagnostics_of_every_synthetic_set(fake_run):
    config, work, tiles, fs = fake_run
    doc = synthetic_diagnostics(config, work, tiles, fs)
    assert doc["truth_threshold"] == pytest.approx(0.9)
    sets = doc["sets"]
    assert list(sets) == ["source_cars", "target_cars", "target_empty", "translation"]
    for name in ("source_cars", "target_cars", "translation"):
        assert 0.0 <= sets[name]["two_sample"]["accuracy"] <= 1.0 and sets[name]["two_sample"]["held_out"] >= 2
    assert sets["target_empty"]["agreement"] is None  # no vehicles: nothing to agree on
    assert sets["translation"]["agreement"]["ap50"] > 0.8  # "F_S" reports the boxes the maps were drawn on
    assert sets["target_cars"]["agreement"]["ap50"] is None  # "F_S" finds nothing there
    # a rerun is skipped and gives the same document
    before = (work / "diagnostics" / "diagnostics.json").read_bytes()
    assert synthetic_diagnostics(config, work, tiles, fs) == doc
    assert (work / "diagnostics" / "diagnostics.json").read_bytes() == before


def test_report_has_the_table_and_the_numbers(fake_run, tmp_path):
    config, work, tiles, fs = fake_run
    doc = synthetic_diagnostics(config, work, tiles, fs)
    variants = {"source-only": [_result(0.1)], "oracle": [_result(0.5)]}
    md = write_report(tmp_path / "report", variants, diagnostics=doc)
    text = md.read_text()
    assert "two-sample accuracy" in text and "heat-map agreement with F_S (AP50)" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| translation |"))
    assert f"{doc['sets']['translation']['two_sample']['accuracy']:.3f}" in row
    assert f"{doc['sets']['translation']['agreement']['ap50']:.3f}" in row
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["synthetic_diagnostics"] == doc
    plain = write_report(tmp_path / "plain", variants)
    assert "two-sample" not in plain.read_text()
