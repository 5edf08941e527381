"""Training data mixing and a short offline YOLO training run that writes a usable model."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import write_png
from aerosynth.detection.augment import AugmentConfig
from aerosynth.detection.datasets import DatasetSpec, build_yolo_view, list_samples, mix_counts, resample
from aerosynth.detection.toydata import toy_scene, write_toy_split
from aerosynth.detection.training import DetectorTrainConfig, resolve_model, train_detector

torch.set_num_threads(2)


def _synthetic_set(root: Path, n: int, with_vehicles: bool = True, size: int = 64) -> Path:
    """A synthetic set as generation writes it (images, heat maps, labels from annotation)."""
    for i in range(n):
        img, dets = toy_scene(size, size, 2 if with_vehicles else 0, seed=1000 + i)
        heat = np.zeros_like(img)
        for x1, y1, x2, y2 in dets.xyxy.astype(int):
            heat[y1:y2, x1:x2] = (255, 200, 180)
        write_png(root / "images" / f"{i:06d}.png", img)
        write_png(root / "heatmaps" / f"{i:06d}.png", heat)
        if with_vehicles:
            atomic_write_text(root / "labels" / f"{i:06d}.txt", dets.to_yolo(size, size))
    atomic_write_json(
        root / "synthetic.json",
        {
            "set": "target_cars" if with_vehicles else "target_empty",
            "domain": "toy",
            "with_vehicles": with_vehicles,
            "prompt": "",
            "count": n,
            "base_seed": 1000,
            "image_size": size,
            "gsd": 0.125,
            "heatmap_channels": ["cars", "V1", "255-background"],
        },
    )
    return root


def test_mix_counts_and_resampling():
    assert mix_counts([10, 4], [None, None]) == [10, 4]
    assert mix_counts([10, 4], [0.5, 0.5]) == [7, 7]
    assert mix_counts([10, 4], [0.75, 0.25], total=20) == [15, 5]
    with pytest.raises(InputError, match="every training dataset"):
        mix_counts([10, 4], [0.5, None])
    with pytest.raises(InputError, match="sum to"):
        mix_counts([10, 4], [0.5, 0.4])
    items = list(range(4))
    a = resample(items, 10, np.random.default_rng(1))
    assert sorted(a) == sorted(items * 2 + a[8:]) and len(a) == 10 and a[:8] == items * 2
    assert a == resample(items, 10, np.random.default_rng(1))
    assert len(resample(items, 3, np.random.default_rng(0))) == 3


def test_yolo_view_mixes_real_and_synthetic_deterministically(tmp_path):
    real = write_toy_split(tmp_path / "source-train", 10, tile_size=64)
    syn = _synthetic_set(tmp_path / "syn", 6)
    val = write_toy_split(tmp_path / "source-val", 3, seed=9, tile_size=64, name="source-val")
    train = [DatasetSpec(real, fraction=0.75), DatasetSpec(syn, fraction=0.25)]
    view = build_yolo_view(tmp_path / "v1", train, DatasetSpec(val), seed=3, total=16)
    assert view.counts == {"source-train": 12, "syn": 4} and view.val_count == 3
    imgs = sorted((tmp_path / "v1" / "train" / "images").iterdir())
    assert len(imgs) == 16 and all(p.is_symlink() for p in imgs)
    assert len(list((tmp_path / "v1" / "train" / "labels").iterdir())) == 16
    again = build_yolo_view(tmp_path / "v2", train, DatasetSpec(val), seed=3, total=16)
    assert [os.readlink(p) for p in imgs] == [
        os.readlink(p) for p in sorted((tmp_path / "v2" / "train" / "images").iterdir())
    ]
    assert again.counts == view.counts
    # labels of a symlinked image are those of its source
    first = next(p for p in imgs if p.name.startswith("syn_"))
    src = Path(os.readlink(first))
    assert (tmp_path / "v1/train/labels" / f"{first.stem}.txt").read_text() == (
        syn / "labels" / f"{src.stem}.txt"
    ).read_text()
    doc = json.loads((tmp_path / "v1" / "view.json").read_text())
    assert doc["counts"] == view.counts and doc["seed"] == 3


def test_dataset_inputs_are_checked(tmp_path):
    weak = write_toy_split(
        tmp_path / "target-train", 3, weak=True, name="target-train", labels_dir=tmp_path / "evaluation/target-train"
    )
    with pytest.raises(InputError, match="weak split"):
        list_samples(DatasetSpec(weak))
    oracle = list_samples(DatasetSpec(weak, labels_dir=tmp_path / "evaluation/target-train/labels"))
    assert len(oracle) == 3 and len(oracle[0].detections) == 1
    empty = _synthetic_set(tmp_path / "empty", 2, with_vehicles=False)
    assert [len(s.detections) for s in list_samples(DatasetSpec(empty))] == [0, 0]
    syn = _synthetic_set(tmp_path / "syn", 2)
    (syn / "labels" / "000001.txt").unlink()
    with pytest.raises(InputError, match="label file missing"):
        list_samples(DatasetSpec(syn))
    assert len(list_samples(DatasetSpec(syn, missing_labels_are_empty=True))[1].detections) == 0
    with pytest.raises(InputError, match="not found"):
        list_samples(DatasetSpec(tmp_path / "nope"))
    with pytest.raises(InputError, match="fraction"):
        DatasetSpec(syn, fraction=1.5)


def test_model_names_never_download(tmp_path):
    assert resolve_model("yolov8n.yaml") == "yolov8n.yaml"
    with pytest.raises(InputError, match="not found"):
        resolve_model("yolov8n.pt")
    with pytest.raises(InputError, match="neither"):
        resolve_model("no_such_model.yaml")
    with pytest.raises(InputError, match="expected"):
        resolve_model("model.onnx")


def test_heatmaps_need_heatmap_mode_and_val_is_never_target_labels(tmp_path):
    syn = _synthetic_set(tmp_path / "syn", 2)
    heat = DatasetSpec(syn, image_dir="heatmaps")
    with pytest.raises(InputError, match="heatmap=True"):
        train_detector(DetectorTrainConfig(epochs=1), [heat], heat, tmp_path / "out")
    write_toy_split(tmp_path / "target-test", 2, weak=True, name="target-test", labels_dir=tmp_path / "evaluation/tt")
    val = DatasetSpec(tmp_path / "target-test", labels_dir=tmp_path / "evaluation/tt/labels")
    with pytest.raises(InputError, match="target evaluation labels"):
        train_detector(DetectorTrainConfig(epochs=1), [DatasetSpec(syn)], val, tmp_path / "out")


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection or DNS lookup fails the test."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_short_training_run_is_offline_and_writes_a_usable_model(tmp_path, monkeypatch, no_network):
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.detection.evaluation import evaluate_split
    from aerosynth.detection.prediction import predict, predict_split

    data = tmp_path / "data"
    real = write_toy_split(data / "source-train", 12, tile_size=64)
    syn = _synthetic_set(data / "syn", 6)
    val = write_toy_split(data / "source-val", 4, seed=7, tile_size=64, name="source-val")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert os.environ.get("YOLO_OFFLINE") == "1"
    config = DetectorTrainConfig(epochs=2, imgsz=64, batch=6, seed=1, patience=5)
    weights = train_detector(
        config, [DatasetSpec(real, fraction=0.5), DatasetSpec(syn, fraction=0.5)], DatasetSpec(val), tmp_path / "out"
    )
    assert weights == tmp_path / "out" / "detector.pt" and weights.is_file()
    assert no_network == []
    assert list(work.iterdir()) == []  # nothing downloaded or written into the working directory
    manifest = json.loads((tmp_path / "out" / "detector.json").read_text())
    assert manifest["mix_counts"] == {"source-train": 9, "syn": 9}
    assert manifest["epochs_run"] == 2 and manifest["config"]["seed"] == 1 and manifest["gsd"] == 0.125
    assert manifest["optimizer"] == {"name": "AdamW", "lr0": 0.002}  # what ultralytics built, not the config
    images = sorted((val / "images").iterdir())
    dets = predict(weights, images, conf=0.0001, imgsz=64)
    assert len(dets) == len(images)
    assert all(d.confidence is not None and d.xyxy.shape[1] == 4 for d in dets)
    assert all(len(d) <= 100 for d in dets)
    # the same through the split helper, evaluated with COCO metrics
    split = open_evaluation_split(data, "source-val")
    result = evaluate_split(split, predict_split(weights, split, conf=0.0001))
    assert 0.0 <= result.ap50 <= 1.0 and result.n_ground_truth > 0
    # fine-tuning from the local .pt the run wrote
    tuned = train_detector(
        DetectorTrainConfig(model=str(weights), epochs=1, imgsz=64, batch=6, extra={"lr0": 0.0123}),
        [DatasetSpec(real)],
        DatasetSpec(val),
        tmp_path / "tuned",
    )
    assert len(predict(tuned, images[:1], imgsz=64)) == 1
    # the fine-tuning's lr0 reaches the optimizer ultralytics built (optimizer=auto would ignore it)
    assert json.loads((tmp_path / "tuned" / "detector.json").read_text())["optimizer"] == {
        "name": "AdamW",
        "lr0": 0.0123,
    }
    assert no_network == [] and list(work.iterdir()) == []


def test_heatmap_detector_trains_on_heatmap_images(tmp_path, no_network):
    syn = _synthetic_set(tmp_path / "syn", 6)
    spec = DatasetSpec(syn, image_dir="heatmaps")
    config = DetectorTrainConfig(epochs=1, imgsz=64, batch=6, augment=AugmentConfig.for_heatmaps())
    weights = train_detector(config, [spec], spec, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "detector.json").read_text())
    assert weights.is_file() and manifest["config"]["augment"]["heatmap"] is True
    linked = sorted((tmp_path / "out" / "view" / "train" / "images").iterdir())
    assert all(Path(os.readlink(p)).parent.name == "heatmaps" for p in linked)
    assert no_network == []


def test_a_portable_detector_is_the_same_file_whichever_run_trained_it(tiny_detector, tmp_path):
    """``write_portable_detector`` drops the hour, timings and local paths; the copy loads, predicts and fine-tunes."""
    from aerosynth.detection.prediction import predict
    from aerosynth.detection.training import write_portable_detector

    # the same weights as another run on another machine would have written them: its hour, its folders
    theirs = torch.load(tiny_detector, map_location="cpu", weights_only=False)
    theirs["date"], theirs["train_results"] = "2031-01-01T00:00:00+00:00", {"time": [1.0]}
    elsewhere = "/home/analyst/runs/city/detectors/real-heatmap+source/seed0/train"
    paths = {"project": elsewhere, "save_dir": elsewhere + "/ultralytics", "data": elsewhere + "/data.yaml"}
    for args in (theirs["train_args"], theirs["model"].args):
        args.update({k: v for k, v in paths.items() if k in args})
    theirs["model"].pt_path = elsewhere + "/detector.pt"  # set when ultralytics loaded the weights it fine-tuned
    other = tmp_path / "other" / "detector.pt"
    other.parent.mkdir()
    torch.save(theirs, other)
    assert other.read_bytes() != tiny_detector.read_bytes()

    mine = write_portable_detector(tiny_detector, tmp_path / "mine.pt")
    yours = write_portable_detector(other, tmp_path / "yours.pt")
    assert mine.read_bytes() == yours.read_bytes()
    for folder in (str(tiny_detector.parent), str(tmp_path), elsewhere):
        assert folder.encode() not in mine.read_bytes()
    before = torch.load(tiny_detector, map_location="cpu", weights_only=False)["model"].state_dict()
    after = torch.load(mine, map_location="cpu", weights_only=False)["model"].state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    images = [write_png(tmp_path / "scene.png", toy_scene(64, 64, 3, seed=5)[0])]
    original, portable = (
        predict(tiny_detector, images, conf=0.001, imgsz=64),
        predict(mine, images, conf=0.001, imgsz=64),
    )
    assert len(original[0]) > 0 and np.array_equal(original[0].xyxy, portable[0].xyxy)
    split = write_toy_split(tmp_path / "train", 4, tile_size=64)
    tuned = train_detector(
        DetectorTrainConfig(model=str(mine), epochs=1, imgsz=64, batch=4),
        [DatasetSpec(split)],
        DatasetSpec(split),
        tmp_path / "tuned",
    )
    assert len(predict(tuned, images, imgsz=64)) == 1
