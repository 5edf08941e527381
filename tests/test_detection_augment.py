"""Augmentation: boxes follow the objects, heat maps move with the image, ultralytics applies ours once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aerosynth.data.atomic import atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.imageio import read_rgb, write_png
from aerosynth.detection.augment import (
    AugmentConfig,
    Augmenter,
    augment_sample,
    ultralytics_augmentations,
    ultralytics_overrides,
    write_augmentation_preview,
)
from aerosynth.detection.datasets import DatasetSpec, build_yolo_view
from aerosynth.detection.toydata import write_toy_split

GEOMETRIC_ONLY = AugmentConfig(rotate90_p=1.0, hflip_p=0.5, vflip_p=0.5, scale_jitter=0.0, heatmap=True)


def _planted(size: int = 64) -> tuple[np.ndarray, Detections]:
    img = np.zeros((size, size, 3), np.uint8)
    img[5:15, 40:60] = 200  # a 20x10 "vehicle" near the top-right corner
    return img, Detections([[40, 5, 60, 15]], [0.8], [0])


def _object_box(img: np.ndarray, level: int = 100) -> list[int]:
    ys, xs = np.nonzero(img[:, :, 0] > level)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_box_follows_the_object_under_rotations_and_flips():
    img, dets = _planted()
    aug = Augmenter(GEOMETRIC_ONLY, seed=0)
    seen = set()
    for _ in range(24):
        out = aug(img, dets)
        assert len(out.detections) == 1
        assert out.detections.xyxy[0].tolist() == pytest.approx(_object_box(out.image))
        assert out.detections.confidence.tolist() == [0.8]
        assert set(np.unique(out.image)) <= {0, 200}  # geometric only: no value changes
        seen.add(tuple(out.detections.xyxy[0].round().astype(int)))
    assert len(seen) >= 4  # several of the 8 dihedral placements occurred


def test_heatmap_moves_with_the_image_and_keeps_its_values():
    img, dets = _planted()
    heat = np.zeros_like(img)
    heat[5:15, 40:60] = (200, 128, 7)  # channel 0 equals the image: the same warp gives the same pixels
    aug = Augmenter(AugmentConfig(heatmap=True), seed=3)  # defaults include the scale jitter
    for _ in range(10):
        out = aug(img, dets, heatmap=heat)
        assert out.heatmap.shape == heat.shape
        assert np.array_equal(out.heatmap[:, :, 0], out.image[:, :, 0])
        (x1, y1, x2, y2) = out.detections.xyxy[0]
        hx1, hy1, hx2, hy2 = _object_box(out.image, 100)
        assert abs(x1 - hx1) <= 1.5 and abs(y1 - hy1) <= 1.5 and abs(x2 - hx2) <= 1.5 and abs(y2 - hy2) <= 1.5
        long_side = max(x2 - x1, y2 - y1)
        assert long_side / 20 == pytest.approx(1.0, abs=0.16)  # scale jitter within +-15 %


def test_photometric_changes_only_the_image_and_is_seeded():
    img, dets = _planted()
    img = img + 40
    cfg = AugmentConfig(0, 0, 0, 0, 0, brightness=0.3, contrast=0.3, color_p=1.0, blur_p=0, noise_p=1.0)
    out = augment_sample(img, dets, cfg, seed=1, heatmap=img.copy())
    assert not np.array_equal(out.image, img)
    assert np.array_equal(out.heatmap, img)  # the heat map gets geometric transforms only
    assert out.detections == dets
    again = augment_sample(img, dets, cfg, seed=1)
    assert np.array_equal(again.image, out.image)
    assert AugmentConfig.none().transforms() == []
    assert AugmentConfig.for_heatmaps().photometric() == []


def test_boxes_pushed_out_are_dropped_and_empty_input_works():
    img = np.zeros((64, 64, 3), np.uint8)
    out = Augmenter(AugmentConfig(), seed=0)(img, Detections.empty())
    assert len(out.detections) == 0 and out.image.shape == img.shape
    # a box partly outside is clipped, not kept outside the image
    out = Augmenter(AugmentConfig.none(), seed=0)(img, Detections([[-5, -5, 10, 10]]))
    assert out.detections.xyxy.tolist() == [[0, 0, 10, 10]]


def test_ultralytics_settings_and_serialisation():
    import albumentations as A

    over = ultralytics_overrides()
    for key in ("hsv_h", "hsv_s", "hsv_v", "fliplr", "flipud", "mosaic", "scale", "translate", "degrees", "mixup"):
        assert over[key] == 0
    ts = ultralytics_augmentations(AugmentConfig())
    restored = [A.from_dict(A.to_dict(t)) for t in ts]  # what the trainer stores in checkpoints
    assert [type(t).__name__ for t in restored] == [type(t).__name__ for t in ts]
    assert {type(t).__name__ for t in ultralytics_augmentations(AugmentConfig.for_heatmaps())} <= {
        "RandomRotate90",
        "HorizontalFlip",
        "VerticalFlip",
        "Affine",
    }
    assert [type(t).__name__ for t in ultralytics_augmentations(AugmentConfig.none())] == ["NoOp"]


def test_ultralytics_dataset_applies_our_transforms_once(tmp_path):
    """Through ultralytics' own training dataset: boxes follow the object, no HSV/colour on heat maps."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.augment import Albumentations
    from ultralytics.data.utils import check_det_dataset

    from aerosynth.detection.training import DetectorTrainConfig, train_args

    img, dets = _planted()
    write_png(tmp_path / "yolo" / "images" / "a.png", img)
    atomic_write_text(tmp_path / "yolo" / "labels" / "a.txt", dets.to_yolo(64, 64))
    view = build_yolo_view(tmp_path / "view", [DatasetSpec(tmp_path / "yolo")], DatasetSpec(tmp_path / "yolo"))
    args = train_args(DetectorTrainConfig(imgsz=64, augment=GEOMETRIC_ONLY), view.data_yaml, tmp_path)
    data = check_det_dataset(str(view.data_yaml))
    dataset = build_yolo_dataset(get_cfg(overrides=args), data["train"], 1, data, mode="train")
    albu = [t for t in dataset.transforms.transforms if isinstance(t, Albumentations)]
    assert len(albu) == 1 and albu[0].transform is not None and albu[0].contains_spatial
    names = [type(t).__name__ for t in albu[0].transform.transforms]
    assert names == ["RandomRotate90", "HorizontalFlip", "VerticalFlip"]
    placements = set()
    for _ in range(12):
        sample = dataset[0]
        out = sample["img"].numpy().transpose(1, 2, 0)
        assert set(np.unique(out)) <= {0, 200}  # no HSV, no interpolation, no letterbox grey
        cx, cy, w, h = (sample["bboxes"][0].numpy() * 64).tolist()
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        assert box == pytest.approx(_object_box(out), abs=0.01)
        placements.add(tuple(np.round(box).astype(int)))
    assert len(placements) >= 3


def test_preview_png(tmp_path):
    split = write_toy_split(tmp_path / "source-train", 3, seed=0)
    out = write_augmentation_preview(split, tmp_path / "preview.png", samples=2, variants=3, scale=1)
    grid = read_rgb(out)
    assert grid.shape == (2 * (128 + 4), 4 * (128 + 4), 3)
    assert (grid[..., 1] == 255).sum() > 0  # green boxes drawn
    img, d = _planted()
    out2 = write_augmentation_preview([(img, d)], tmp_path / "p2.png", variants=1)
    assert Path(out2).is_file()
    weak = write_toy_split(tmp_path / "target-train", 2, weak=True, name="target-train", labels_dir=tmp_path / "ev")
    assert write_augmentation_preview(weak, tmp_path / "p3.png", variants=1).is_file()
