"""COCO-pretrained detectors (issue #34 items 1-2): the TFLite -> ultralytics converter and F_S from its output.

Skipped where ``../shared/weights/yolov8n-coco-int8`` or the TFLite runtime (``pip install -e .[convert]``:
``ai-edge-litert``) is absent.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_ADAPT

REPO = Path(__file__).resolve().parents[1]
TFLITE = REPO.parent / "shared" / "weights" / "yolov8n-coco-int8" / "yolov8n_int8.tflite"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TFLITE.is_file(), reason=f"no COCO YOLOv8n TFLite export at {TFLITE}"),
    pytest.mark.skipif(
        importlib.util.find_spec("ai_edge_litert") is None,
        reason="no TFLite runtime (pip install -e .[convert]: ai-edge-litert)",
    ),
]


def _converter():
    """``tools/tflite_to_ultralytics.py`` (a script, not part of the installed package)."""
    if "tflite_to_ultralytics" not in sys.modules:
        path = REPO / "tools" / "tflite_to_ultralytics.py"
        spec = importlib.util.spec_from_file_location("tflite_to_ultralytics", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["tflite_to_ultralytics"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    """The shared export converted once for this module: ``(yolov8n-coco.pt, report)``."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("pretrained") / "yolov8n-coco.pt"
    report = _converter().convert(TFLITE, out)
    return out, report


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _detections(weights: Path, image: np.ndarray) -> list[tuple[str, float, np.ndarray]]:
    from ultralytics import YOLO

    result = YOLO(str(weights), task="detect").predict(image, imgsz=640, device="cpu", verbose=False)[0]
    boxes = result.boxes
    return [
        (result.names[int(c)], float(s), xy.numpy()) for c, s, xy in zip(boxes.cls, boxes.conf, boxes.xyxy, strict=True)
    ]


def test_the_converted_checkpoint_finds_what_the_tflite_export_finds_on_bus_jpg(converted):
    """Same classes, box IoU >= 0.9 and confidence within 0.05, detection for detection."""
    import cv2
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils import ASSETS

    weights, report = converted
    assert (report["classes"], report["layers"], report["int8_layers"]) == (80, 64, 62)
    assert report["max_layer_error"] < _converter().MAX_LAYER_ERROR
    # the export's input is a fixed 640 x 640 square, a .pt runs on the smallest 32-multiple rectangle:
    # both are given the same letterboxed square so that they see the same pixels
    square = LetterBox(new_shape=(640, 640), auto=False)(image=cv2.imread(str(ASSETS / "bus.jpg")))
    theirs, ours = _detections(TFLITE, square), _detections(weights, square)
    assert {name for name, _, _ in theirs} == {"person", "bus"}  # the export itself sees the bus and its passengers
    assert len(ours) == len(theirs), (theirs, ours)
    unused = list(ours)
    for name, conf, box in theirs:
        same = [d for d in unused if d[0] == name]
        assert same, (name, conf, ours)
        match = max(same, key=lambda d: _iou(box, d[2]))
        assert _iou(box, match[2]) >= 0.9, (name, box, match)
        assert abs(conf - match[1]) <= 0.05, (name, conf, match[1])
        unused.remove(match)


def test_the_checkpoint_is_an_ultralytics_one_with_the_exports_names(converted):
    from ultralytics import YOLO

    weights, report = converted
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    names = _converter().read_metadata(TFLITE)["names"]
    assert ckpt["model"].names == names and len(names) == 80 and names[2] == "car"
    assert ckpt["source"]["sha256"] == report["sha256"] == _converter().EXPECTED_SHA256
    assert ckpt["optimizer"] is None and ckpt["epoch"] == -1 and ckpt["train_args"]["task"] == "detect"
    model = YOLO(str(weights))
    assert model.task == "detect" and model.names == names
    # folded batch norms are identities plus the conv's bias: the eval output is the conv's output plus bias
    bn = model.model.model[0].bn
    assert torch.allclose(bn.running_var + bn.eps, torch.ones_like(bn.running_var), atol=1e-3)


def test_a_file_that_is_not_the_shared_export_is_refused(tmp_path):
    conv = _converter()
    other = tmp_path / "other.tflite"
    shutil.copyfile(TFLITE, other)
    with open(other, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(conv.ConversionError, match="sha256"):
        conv.convert(other, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_source_only_starts_from_the_pretrained_checkpoint_and_variants_from_it(converted, tmp_path):
    """F_S trained from ``detection.model: <converted>.pt``: backbone and box head transferred, class head new."""
    from aerosynth.flows.adapt_detection import detector_config, train_and_evaluate, variants
    from aerosynth.flows.adapt_tiles import prepare_tiles
    from aerosynth.flows.config import build_config

    weights, _ = converted
    doc = copy.deepcopy(TINY_ADAPT)
    doc["work_dir"] = str(tmp_path / "run")
    doc["detection"] = {**doc["detection"], "model": str(weights), "continued": True}
    cfg = build_config(doc)
    tiles = prepare_tiles(cfg, tmp_path / "run")
    plan = {v.name: v for v in variants(cfg, tiles, {}, {})}

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("ultralytics")
    logger.addHandler(handler)
    try:
        fs = train_and_evaluate(cfg, tmp_path / "run", tiles, plan["source-only"], 0)
    finally:
        logger.removeHandler(handler)

    manifest = json.loads((fs / "train" / "detector.json").read_text())
    assert manifest["model"] == str(weights) and manifest["epochs_run"] >= 1
    transferred = [line for line in lines if line.startswith("Transferred")]
    assert transferred, lines
    n, total = (int(v) for v in transferred[0].split()[1].split("/"))
    # everything but the three class-logit convolutions (weight and bias each: 80 COCO classes -> 1 vehicle)
    assert total - n == 6, transferred[0]

    start = torch.load(weights, map_location="cpu", weights_only=False)["model"].float().state_dict()
    trained = torch.load(fs / "train" / "detector.pt", map_location="cpu", weights_only=False)
    trained = (trained.get("ema") or trained["model"]).float().state_dict()
    for key in ("model.2.m.0.cv1.conv.weight", "model.8.cv1.conv.weight", "model.22.cv2.0.0.conv.weight"):
        cos = torch.nn.functional.cosine_similarity(start[key].flatten(), trained[key].flatten(), dim=0)
        assert cos > 0.95, (key, float(cos))  # a random start would be near 0
    assert trained["model.22.cv3.0.2.weight"].shape[0] == 1 and start["model.22.cv3.0.2.weight"].shape[0] == 80
    # every other variant fine-tunes from this F_S, as from a random-start one
    assert Path(detector_config(cfg, plan["continued"], 0, fs).model) == fs / "train" / "detector.pt"
