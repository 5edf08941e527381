"""The AGenDA relay end to end on a tiny fake dataset, and proof that it reads no target label.

One relay run (tiny detectors, a few epochs) is shared by the tests of this file; the
poisoning test then writes garbage over every target label and runs the relay again into the
same folder: the labelled dataset and relay.json must come out byte for byte the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aerosynth.annotation.fake_data import write_fake_root, write_fake_synthetic_set
from aerosynth.annotation.metrics import f1_optimal_threshold, match_all
from aerosynth.annotation.refinement import RefinementConfig
from aerosynth.annotation.relay import RelayConfig, run_relay
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError

torch.set_num_threads(2)

# lambda_high = 1 and lambda_low = 0: each image's top-1 box is the only positive, boxes on images
# generated empty are the negatives, everything else goes to the CNN, whatever the detectors learnt.
CONFIG = RelayConfig(
    source_epochs=3,
    heatmap_epochs=3,
    imgsz=64,
    batch=8,
    augment=False,
    lambda_high=1.0,
    lambda_low=0.0,
    max_boxes_per_image=100,  # every F_A candidate reaches the refinement CNN
    refinement=RefinementConfig(epochs=4, crop_size=16),
)


def _digest(out: Path) -> dict[str, str]:
    """sha256 of every output file except the tool run folder ``work/``."""
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and "work" not in p.relative_to(out).parts]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def relay_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("relay")
    root = write_fake_root(base / "root", count=12, size=64)
    sets = {
        "source": write_fake_synthetic_set(base / "syn_src", "source_cars", "madison_drone", 12, seed=10),
        "cars": write_fake_synthetic_set(base / "syn_tc", "target_cars", "kit_munich_aerial", 8, seed=11),
        "empty": write_fake_synthetic_set(base / "syn_te", "target_empty", "kit_munich_aerial", 4, seed=12),
    }
    out = base / "out"
    dataset = run_relay(
        root / "source-train", root / "source-val", sets["source"], [sets["cars"], sets["empty"]], out, CONFIG
    )
    return {"root": root, "sets": sets, "out": out, "dataset": dataset, "digest": _digest(out)}


def test_relay_labels_the_synthetic_target_sets(relay_run) -> None:
    out, dataset = relay_run["out"], relay_run["dataset"]
    assert dataset == out / "dataset"
    summary = json.loads((dataset / "summary.json").read_text())
    relay = json.loads((out / "relay.json").read_text())
    assert summary["method"] == "relay" and summary["images"] == 12
    assert summary["sets"]["target_empty"]["boxes"] == 0
    # every image generated with vehicles keeps at least its top-1 box
    for i in range(8):
        text = (dataset / "labels" / f"target_cars_{i:06d}.txt").read_text()
        assert len(Detections.from_yolo(text, 64, 64)) >= 1
    for i in range(4):
        assert (dataset / "labels" / f"target_empty_{i:06d}.txt").read_text() == ""
    assert summary["kept"] == 8
    assert summary["kept"] + summary["refined"] == summary["boxes"]
    ref = relay["refinement"]
    assert ref["decision"] == "cnn" and ref["positives"] == 8 and ref["negatives"] > 0
    assert summary["dropped"] == ref["negatives"] + ref["uncertain"] - summary["refined"]
    assert (out / "work" / "refinement_cnn.pt").is_file()
    assert (out / "work" / "fs" / "detector.pt").is_file() and (out / "work" / "fa" / "detector.pt").is_file()
    assert relay["max_boxes_per_image"] == 100


def test_default_cap_follows_the_source_pseudo_labels(relay_run, tmp_path) -> None:
    """By default no image gets more candidates than the busiest synthetic source image had pseudo-labels."""
    from dataclasses import replace

    root, sets = relay_run["root"], relay_run["sets"]
    fs = relay_run["out"] / "work" / "fs" / "detector.pt"
    cfg = replace(CONFIG, max_boxes_per_image=None)
    out = tmp_path / "relay"
    dataset = run_relay(
        root / "source-train",
        root / "source-val",
        sets["source"],
        [sets["cars"], sets["empty"]],
        out,
        cfg,
        source_detector=fs,
    )
    relay = json.loads((out / "relay.json").read_text())
    pseudo_counts = [len(f.read_text().splitlines()) for f in (out / "work" / "pseudo_labels").glob("*.txt")]
    assert relay["max_boxes_per_image"] == max(1, max(pseudo_counts)) < 100
    for i in range(8):
        text = (dataset / "labels" / f"target_cars_{i:06d}.txt").read_text()
        assert 1 <= len(Detections.from_yolo(text, 64, 64)) <= relay["max_boxes_per_image"]
    assert relay["work"]["source_detector"] == str(fs) and not (out / "work" / "fs").exists()


def test_source_threshold_is_f1_optimal_on_real_source_val(relay_run) -> None:
    from aerosynth.data.tileset import open_split
    from aerosynth.detection.prediction import predict

    out, root = relay_run["out"], relay_run["root"]
    relay = json.loads((out / "relay.json").read_text())
    val = open_split(root / "source-val")
    ids = [t.tile_id for t in val.tiles]
    preds = predict(out / "work" / "fs" / "detector.pt", [val.image_path(t) for t in ids], conf=0.001, imgsz=64)
    preds = [Detections(np.round(d.xyxy, 4), np.round(d.confidence, 6)) for d in preds]
    best = f1_optimal_threshold(match_all(preds, [val.labels(t) for t in ids], [val.ignore_regions(t) for t in ids]))
    assert relay["tau_source"] == pytest.approx(best.threshold)
    # the pseudo-labels are F_S's boxes at or above that threshold
    for f in sorted((out / "work" / "pseudo_labels").glob("*.txt")):
        rows = [line.split() for line in f.read_text().splitlines()]
        assert all(float(r[5]) >= relay["tau_source"] for r in rows)


def test_relay_export_loads_back(relay_run) -> None:
    from pycocotools.coco import COCO

    dataset = relay_run["dataset"]
    coco = COCO(str(dataset / "annotations.json"))
    assert len(coco.dataset["images"]) == 12
    for img in coco.dataset["images"]:
        stem = Path(img["file_name"]).stem
        yolo = Detections.from_yolo((dataset / "labels" / f"{stem}.txt").read_text(), img["width"], img["height"])
        from_coco = Detections.from_coco(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])))
        np.testing.assert_allclose(yolo.xyxy, from_coco.xyxy, atol=1e-3)
    geo = json.loads((dataset / "boxes.geojson").read_text())
    assert len(geo["features"]) == len(coco.dataset["annotations"])
    manifest = json.loads((dataset / "manifest.json").read_text())
    roles = [i["role"] for i in manifest["inputs"]]
    assert roles == ["source_train", "source_val", "synthetic_source", "synthetic_target", "synthetic_target"]
    assert all("evaluation" not in i["path"] for i in manifest["inputs"])
    assert all("target-" not in i["path"] for i in manifest["inputs"])


def test_relay_refuses_target_and_evaluation_splits(relay_run, tmp_path) -> None:
    root, sets = relay_run["root"], relay_run["sets"]
    with pytest.raises(InputError, match="weak"):
        run_relay(root / "target-train", root / "source-val", sets["source"], [sets["cars"]], tmp_path, CONFIG)
    with pytest.raises(InputError, match="evaluation"):
        run_relay(
            root / "source-train", root / "evaluation" / "target-test", sets["source"], [sets["cars"]], tmp_path, CONFIG
        )
    with pytest.raises(InputError, match="generated with vehicles"):
        run_relay(root / "source-train", root / "source-val", sets["empty"], [sets["cars"]], tmp_path, CONFIG)


def test_poisoned_target_labels_change_nothing(relay_run) -> None:
    root, sets, out = relay_run["root"], relay_run["sets"], relay_run["out"]
    before = relay_run["digest"]
    assert "dataset/labels/target_cars_000000.txt" in before and "relay.json" in before
    poisoned = 0
    for split in ("target-train", "target-test"):
        ev = root / "evaluation" / split
        for f in sorted((ev / "labels").glob("*.txt")):
            f.write_text("0 0.5 0.5 0.9 0.9\n7 nan garbage\n")
            poisoned += 1
        (ev / "annotations.json").write_text("{ this is not json")
        # and labels that a weak split should never have
        (root / split / "labels").mkdir(exist_ok=True)
        (root / split / "labels" / "t00000.txt").write_text("0 0.1 0.1 0.2 0.2\n")
    assert poisoned > 0
    run_relay(root / "source-train", root / "source-val", sets["source"], [sets["cars"], sets["empty"]], out, CONFIG)
    assert _digest(out) == before
