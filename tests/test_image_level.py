"""Flagged tiles without a box: labelled image-level, and trained by an image-level loss, not as background."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aerosynth.annotation.real_target import RealTargetConfig, label_real_tiles
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.exporters import LabelledImage, read_image_level, write_yolo_split
from aerosynth.detection import image_level
from aerosynth.detection.datasets import DatasetSpec, build_yolo_view, list_samples
from aerosynth.detection.toydata import toy_scene, write_toy_split
from aerosynth.detection.training import DetectorTrainConfig, train_detector

torch.set_num_threads(2)


def _weak_split(root: Path, n: int = 6) -> Path:
    """A weak target split: even tiles flagged "vehicle", odd ones flagged empty."""
    split = write_toy_split(
        root, n, tile_size=64, seed=3, weak=True, name="target-train", labels_dir=root.parent / "evaluation" / "tt"
    )
    doc = json.loads((split / "tiles.json").read_text())
    for i, tile in enumerate(doc["tiles"]):
        tile["has_vehicle"] = i % 2 == 0
    (split / "tiles.json").write_text(json.dumps(doc))
    return split


def _proposals(n: int) -> list[Detections]:
    """Tile 0: a confident box; tile 2: a box under the threshold; tile 4: nothing; odd tiles: a confident box."""
    boxes = np.array([[10.0, 10.0, 30.0, 30.0]])
    out = []
    for i in range(n):
        conf = {0: 0.9, 2: 0.2, 4: None}.get(i, 0.9)
        out.append(Detections.empty(with_confidence=True) if conf is None else Detections(boxes, np.array([conf])))
    return out


def test_flagged_tiles_without_a_confident_box_are_written_image_level_not_forced(tmp_path):
    split = _weak_split(tmp_path / "target-train")
    forced = label_real_tiles(split, _proposals(6), 0.5, tmp_path / "forced", "detector")
    assert read_image_level(forced) == frozenset()  # default: the best box below the threshold is kept
    assert len(list_samples(DatasetSpec(forced))[2].detections) == 1

    out = label_real_tiles(
        split, _proposals(6), 0.5, tmp_path / "image", "detector", RealTargetConfig(image_level=True)
    )
    samples = {s.image.stem: s for s in list_samples(DatasetSpec(out))}
    tiles = [t["tile_id"] for t in json.loads((split / "tiles.json").read_text())["tiles"]]
    # tile 2 (box under the threshold) and tile 4 (no proposal) hold a vehicle by their flag: no box, image-level
    assert read_image_level(out) == {tiles[2], tiles[4]}
    assert [samples[tiles[i]].image_level for i in range(6)] == [False, False, True, False, True, False]
    assert len(samples[tiles[2]].detections) == len(samples[tiles[4]].detections) == 0
    assert len(samples[tiles[0]].detections) == 1  # a confident box stays a label
    assert all(len(samples[tiles[i]].detections) == 0 for i in (1, 3, 5))  # flagged empty: never image-level
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_level_tiles"] == 2 and summary["config"]["image_level"] is True


def test_an_image_level_image_with_a_box_is_refused(tmp_path):
    img, dets = toy_scene(32, 32, 1, seed=0)
    with pytest.raises(ValueError, match="no box"):
        write_yolo_split(tmp_path, [LabelledImage("a", img, dets, image_level=True)])


def _model_and_preds():
    from aerosynth.data.offline import apply_offline_settings

    apply_offline_settings()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)
    model.train()
    preds = model(torch.rand(2, 3, 64, 64))
    preds["scores"].retain_grad()
    # image 1 holds one box; image 0 none
    batch = {
        "batch_idx": torch.tensor([1.0]),
        "cls": torch.tensor([[0.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]),
        "im_file": ["view/train/images/t0.png", "view/train/images/t1.png"],
    }
    return model, preds, batch


def _score_grad(loss_fn, model, preds, batch) -> torch.Tensor:
    model.zero_grad()
    preds["scores"].grad = None
    total, _ = loss_fn(preds, batch)
    total.sum().backward(retain_graph=True)
    return preds["scores"].grad.clone()


def test_the_image_level_loss_asks_for_one_vehicle_and_teaches_no_background_on_that_image():
    from ultralytics.utils.loss import v8DetectionLoss

    model, preds, batch = _model_and_preds()
    loss_class = image_level.image_level_loss_class(v8DetectionLoss)
    plain = _score_grad(v8DetectionLoss(model), model, preds, batch)
    # without an image-level image it is ultralytics' loss exactly
    torch.testing.assert_close(_score_grad(loss_class(model, set()), model, preds, batch), plain)

    grad = _score_grad(loss_class(model, {"t0"}), model, preds, batch)
    scores0 = preds["scores"][0].detach().flatten()
    best = int(scores0.argmax())
    g0 = grad[0].flatten()
    assert g0[best] < 0  # the most confident anchor is pushed up: "there is a vehicle here"
    assert torch.count_nonzero(g0) == 1  # and no anchor of the image is taught "background"
    assert (plain[0].flatten() > 0).all()  # (ultralytics' loss pushes every anchor of a box-less image down)
    torch.testing.assert_close(grad[1], plain[1])  # the image with a box is trained as before
    # the term is -log(max p) = softplus(-max logit) times the cls gain: its slope there is -gain * sigmoid(-max)
    torch.testing.assert_close(-g0[best], model.args.cls * torch.sigmoid(-scores0.max()))


def test_training_on_image_level_tiles_uses_the_image_level_term_and_saves_plain_weights(tmp_path, monkeypatch):
    split = _weak_split(tmp_path / "target-train", 8)
    labels = label_real_tiles(
        split, _proposals(8), 0.5, tmp_path / "labels", "detector", RealTargetConfig(image_level=True)
    )
    val = write_toy_split(tmp_path / "source-val", 4, seed=7, tile_size=64, name="source-val")
    view = build_yolo_view(tmp_path / "view", [DatasetSpec(labels)], DatasetSpec(val), seed=0)
    assert len(view.image_level) == 2 and all(s.startswith("labels_") for s in view.image_level)

    calls: list[int] = []
    term = image_level.image_level_term

    def counting(scores, mask):
        calls.append(int(mask.sum()))
        return term(scores, mask)

    monkeypatch.setattr(image_level, "image_level_term", counting)
    config = DetectorTrainConfig(epochs=1, imgsz=64, batch=4, seed=0)
    weights = train_detector(config, [DatasetSpec(labels)], DatasetSpec(val), tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "detector.json").read_text())
    assert manifest["image_level_images"] == 2
    assert sum(calls) == 2  # each image-level tile met the term once in its epoch
    # the saved weights are ultralytics' own: they load and predict with no aerosynth class inside
    from ultralytics import YOLO

    loaded = YOLO(str(weights))
    assert type(loaded.model).__module__.startswith("ultralytics")
    assert getattr(loaded.model, "criterion", None) is None or type(loaded.model.criterion).__module__.startswith(
        "ultralytics"
    )


def test_a_malformed_image_level_list_is_named(tmp_path):
    img, _ = toy_scene(32, 32, 0, seed=0)
    write_yolo_split(tmp_path, [LabelledImage("a", img, Detections.empty(), image_level=True)])
    assert read_image_level(tmp_path) == {"a"}
    (tmp_path / "image_level.json").write_text('["a"]')
    with pytest.raises(InputError, match="image_level.json"):
        list_samples(DatasetSpec(tmp_path))


def test_image_level_tiles_are_never_trained_through_mosaic(tmp_path):
    """The reference recipe asks for mosaic (kept open here); the image-level trainer builds no mosaic."""
    from ultralytics.data.augment import Mosaic

    from aerosynth.detection.training import train_args

    split = _weak_split(tmp_path / "target-train", 8)
    labels = label_real_tiles(
        split, _proposals(8), 0.5, tmp_path / "labels", "detector", RealTargetConfig(image_level=True)
    )
    val = write_toy_split(tmp_path / "source-val", 4, seed=7, tile_size=64, name="source-val")
    view = build_yolo_view(tmp_path / "view", [DatasetSpec(labels)], DatasetSpec(val), seed=0)
    config = DetectorTrainConfig(epochs=3, imgsz=64, batch=4, recipe="reference", extra={"close_mosaic": 0})
    args = train_args(config, view.data_yaml, tmp_path / "out")
    assert args["mosaic"] == 1.0 and args["close_mosaic"] == 0

    def mosaic_p(trainer_class: type) -> float:
        trainer = trainer_class(overrides={**args, "model": "yolov8n.yaml"})
        trainer.model = trainer.get_model(cfg="yolov8n.yaml", verbose=False)
        dataset = trainer.build_dataset(trainer.data["train"], mode="train", batch=4)
        found, todo = [], [dataset.transforms]
        while todo:  # Mosaic sits inside the pre-transform Compose
            t = todo.pop()
            found += [t.p] if isinstance(t, Mosaic) else []
            todo += list(getattr(t, "transforms", []))
        return max(found, default=0.0)

    from ultralytics.models.yolo.detect import DetectionTrainer

    assert mosaic_p(DetectionTrainer) == 1.0  # the recipe as ultralytics runs it
    assert mosaic_p(image_level.image_level_trainer(view.image_level)) == 0.0
