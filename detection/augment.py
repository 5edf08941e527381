"""Box-aware augmentation of overhead imagery with albumentations, for the detectors and a small classifier.

Overhead tiles have no "up": 90-degree rotations and both flips are label-preserving, the
ground sampling distance varies a little between flights (scale jitter of about +-15 %), and
illumination and sensor quality vary (brightness, contrast, hue, blur, noise). All of it is
configured per dataset with :class:`AugmentConfig`. In heat-map mode (the AGenDA relay
detector F_A, trained on 3-channel attention heat maps) only the geometric transforms run: a
colour change would corrupt the map values.

Hook into ultralytics 8.4.190: the ``augmentations=`` train argument takes a list of
albumentations transforms; the trainer serialises them with ``A.to_dict`` and
``ultralytics.data.augment.Albumentations`` composes them with its own ``BboxParams`` (YOLO
format) after Mosaic/RandomPerspective and before RandomHSV and RandomFlip. Because the
list replaces ultralytics' default albumentations (blur, median blur, grey, CLAHE), and
:func:`ultralytics_overrides` switches off the built-ins that would duplicate ours, every
augmentation runs once:

==================  =========  ==============================================================
ultralytics arg     set to     why
==================  =========  ==============================================================
hsv_h, hsv_s, hsv_v 0          colour is done here (and must not touch heat maps)
fliplr, flipud      0          flips are done here, with the 90-degree rotations
degrees, shear,     0          only axis-aligned rotations keep axis-aligned boxes tight
perspective
scale, translate    0          scale jitter is done here (+-15 %, not ultralytics' +-50 %)
mosaic, mixup,      0          a tile keeps its one GSD and context; no cross-image pasting
cutmix, copy_paste
close_mosaic        0          nothing to close
multi_scale         0          the GSD is fixed by the data layer
==================  =========  ==============================================================

The same transforms serve a classifier or any other caller through :class:`Augmenter`
(image + boxes [+ heat map] in, augmented ones out, seeded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from aerosynth.data.detections import Detections
from aerosynth.data.imageio import read_rgb, write_png
from aerosynth.data.offline import apply_offline_settings

apply_offline_settings()  # NO_ALBUMENTATIONS_UPDATE before albumentations is imported

import albumentations as A  # noqa: E402


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentations of one dataset.

    Attributes:
        rotate90_p: probability of a random multiple of 90 degrees.
        hflip_p: probability of a horizontal flip.
        vflip_p: probability of a vertical flip.
        scale_jitter: relative scale range (0.15 gives 0.85-1.15; 0 disables).
        scale_p: probability of the scale jitter.
        brightness: brightness change limit (fraction of the maximum).
        contrast: contrast change limit.
        hue_shift: hue shift limit in OpenCV hue units (0-180 per turn).
        saturation_shift: saturation shift limit (0-255 units).
        color_p: probability of each colour transform.
        blur_p: probability of a small Gaussian blur.
        noise_p: probability of Gaussian noise.
        noise_std: noise standard deviation range, a fraction of 255.
        heatmap: heat-map images: geometric transforms only.
    """

    rotate90_p: float = 0.75
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    scale_jitter: float = 0.15
    scale_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    hue_shift: float = 5.0
    saturation_shift: float = 15.0
    color_p: float = 0.5
    blur_p: float = 0.1
    noise_p: float = 0.1
    noise_std: tuple[float, float] = field(default=(0.01, 0.04))
    heatmap: bool = False

    @classmethod
    def none(cls, heatmap: bool = False) -> AugmentConfig:
        """No augmentation at all."""
        return cls(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, heatmap=heatmap)

    @classmethod
    def for_heatmaps(cls) -> AugmentConfig:
        """Defaults for heat-map images (geometric only)."""
        return cls(heatmap=True)

    def to_dict(self) -> dict:
        return asdict(self)

    # --------------------------------------------------------------- transforms
    def geometric(self) -> list[A.BasicTransform]:
        """Transforms that move pixels (applied to image, heat map and boxes alike)."""
        t: list[A.BasicTransform] = []
        if self.rotate90_p > 0:
            t.append(A.RandomRotate90(p=self.rotate90_p))
        if self.hflip_p > 0:
            t.append(A.HorizontalFlip(p=self.hflip_p))
        if self.vflip_p > 0:
            t.append(A.VerticalFlip(p=self.vflip_p))
        if self.scale_jitter > 0 and self.scale_p > 0:
            s = self.scale_jitter
            t.append(A.Affine(scale=(1 - s, 1 + s), keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, p=self.scale_p))
        return t

    def photometric(self) -> list[A.BasicTransform]:
        """Colour and quality transforms (image only; none in heat-map mode)."""
        if self.heatmap:
            return []
        t: list[A.BasicTransform] = []
        if self.color_p > 0 and (self.brightness > 0 or self.contrast > 0):
            t.append(A.RandomBrightnessContrast(self.brightness, self.contrast, p=self.color_p))
        if self.color_p > 0 and (self.hue_shift > 0 or self.saturation_shift > 0):
            t.append(A.HueSaturationValue(self.hue_shift, self.saturation_shift, 0, p=self.color_p))
        if self.blur_p > 0:
            t.append(A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 1.0), p=self.blur_p))
        if self.noise_p > 0:
            t.append(A.GaussNoise(std_range=tuple(self.noise_std), p=self.noise_p))
        return t

    def transforms(self) -> list[A.BasicTransform]:
        """All transforms, geometric first: the list for ultralytics' ``augmentations=`` argument."""
        return self.geometric() + self.photometric()


def ultralytics_overrides() -> dict:
    """Train arguments that switch off ultralytics' built-in augmentations (see the module docstring)."""
    return {
        "hsv_h": 0.0,
        "hsv_s": 0.0,
        "hsv_v": 0.0,
        "fliplr": 0.0,
        "flipud": 0.0,
        "degrees": 0.0,
        "shear": 0.0,
        "perspective": 0.0,
        "scale": 0.0,
        "translate": 0.0,
        "mosaic": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "copy_paste": 0.0,
        "close_mosaic": 0,
        "multi_scale": 0.0,
    }


def ultralytics_augmentations(config: AugmentConfig) -> list[A.BasicTransform]:
    """The ``augmentations=`` list for ultralytics training.

    An empty configuration gives a single no-op transform: an empty list would make
    ultralytics fall back to its default albumentations.
    """
    t = config.transforms()
    return t if t else [A.NoOp(p=1.0)]


@dataclass
class AugmentedSample:
    """An augmented image, its boxes and (optionally) its heat map."""

    image: np.ndarray
    detections: Detections
    heatmap: np.ndarray | None = None


class Augmenter:
    """Seeded box-aware augmentation of ``(image, boxes[, heat map])``.

    The geometric transforms are applied identically to the image, the heat map and the
    boxes; the photometric ones to the image alone. Boxes pushed out of the image are dropped,
    boxes partly outside are clipped; confidences and class ids follow their box.

    Args:
        config: what to apply.
        seed: seed of the random draws (same seed, same sequence of results).
    """

    def __init__(self, config: AugmentConfig | None = None, seed: int | None = None) -> None:
        self.config = config or AugmentConfig()
        geometric = self.config.geometric()
        self._geometric = (
            None
            if not geometric
            else A.Compose(
                geometric,
                bbox_params=A.BboxParams(format="pascal_voc", label_fields=["idx"], clip=True),
                additional_targets={"heatmap": "image"},
                seed=seed,
            )
        )
        self._photometric = A.Compose(self.config.photometric(), seed=None if seed is None else seed + 1)

    def __call__(self, image: np.ndarray, detections: Detections, heatmap: np.ndarray | None = None) -> AugmentedSample:
        """Augment one sample.

        Args:
            image: ``(H, W, 3)`` uint8.
            detections: boxes in pixels of ``image``.
            heatmap: optional ``(H, W, C)`` array of the same height and width.
        """
        h, w = image.shape[:2]
        boxes = detections.clip(w, h)
        valid = (boxes.xyxy[:, 2] > boxes.xyxy[:, 0]) & (boxes.xyxy[:, 3] > boxes.xyxy[:, 1])
        boxes = boxes[np.flatnonzero(valid)]
        kwargs = {"image": image, "bboxes": boxes.xyxy.astype(np.float32).reshape(-1, 4), "idx": np.arange(len(boxes))}
        if heatmap is not None:
            if heatmap.shape[:2] != image.shape[:2]:
                raise ValueError(f"heat map {heatmap.shape[:2]} and image {image.shape[:2]} differ in size")
            kwargs["heatmap"] = heatmap
        out = kwargs if self._geometric is None else self._geometric(**kwargs)
        idx = np.asarray(out["idx"], dtype=np.int64)
        moved = boxes[idx] if len(idx) else Detections.empty(boxes.confidence is not None)
        moved = Detections(np.asarray(out["bboxes"], np.float64).reshape(-1, 4), moved.confidence, moved.class_id)
        img = self._photometric(image=out["image"])["image"]
        return AugmentedSample(img, moved, out.get("heatmap"))


def augment_sample(
    image: np.ndarray,
    detections: Detections,
    config: AugmentConfig | None = None,
    seed: int | None = None,
    heatmap: np.ndarray | None = None,
) -> AugmentedSample:
    """One-off convenience wrapper around :class:`Augmenter` (build one to augment many samples)."""
    return Augmenter(config, seed)(image, detections, heatmap)


# ------------------------------------------------------------------ preview
def _draw_boxes(image: np.ndarray, dets: Detections, colour: tuple[int, int, int], scale: int) -> np.ndarray:
    img = cv2.resize(image, (image.shape[1] * scale, image.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    img = np.ascontiguousarray(img)
    for x1, y1, x2, y2 in dets.xyxy:
        cv2.rectangle(img, (int(x1 * scale), int(y1 * scale)), (int(x2 * scale) - 1, int(y2 * scale) - 1), colour, 1)
    return img


def _preview_inputs(source) -> list[tuple[np.ndarray, Detections]]:
    from aerosynth.detection.datasets import DatasetSpec, list_samples

    if isinstance(source, (str, Path)):
        from aerosynth.data.tileset import TILES_FILE, open_split

        path = Path(source)
        source = open_split(path) if (path / TILES_FILE).is_file() else DatasetSpec(path)
    if isinstance(source, DatasetSpec):
        return [(read_rgb(s.image), s.detections) for s in list_samples(source)]
    if hasattr(source, "tiles"):  # a tile split; a weak one has no boxes to draw
        boxes = getattr(source, "labels", lambda _tile_id: Detections.empty())
        return [(source.image(t.tile_id), boxes(t.tile_id)) for t in source.tiles]
    out = []
    for item in source:
        img, dets = item
        out.append((read_rgb(img) if isinstance(img, (str, Path)) else np.asarray(img), dets))
    return out


def write_augmentation_preview(
    split_or_images,
    out_png: str | Path,
    config: AugmentConfig | None = None,
    samples: int = 4,
    variants: int = 4,
    seed: int = 0,
    scale: int = 2,
) -> Path:
    """Write a PNG grid: per row one sample, its original then ``variants`` augmented copies, boxes drawn.

    Args:
        split_or_images: a split or dataset folder, a :class:`~aerosynth.detection.datasets.DatasetSpec`, a
            ``LabelledTileSplit``, or a sequence of ``(image or path, Detections)``.
        out_png: the PNG to write.
        config: augmentations to show (defaults of :class:`AugmentConfig` if ``None``).
        samples: rows (the first images of the source).
        variants: augmented copies per row.
        seed: seed of the augmentation.
        scale: pixel zoom of the preview.
    """
    items = _preview_inputs(split_or_images)[:samples]
    if not items:
        raise ValueError("nothing to preview")
    aug = Augmenter(config, seed)
    rows = []
    size = max(max(img.shape[0], img.shape[1]) for img, _ in items) * scale
    pad = 4
    for img, dets in items:
        cells = [_draw_boxes(img, dets, (255, 0, 0), scale)]
        for _ in range(variants):
            a = aug(img, dets)
            cells.append(_draw_boxes(a.image, a.detections, (0, 255, 0), scale))
        row = np.full((size, (size + pad) * len(cells), 3), 255, np.uint8)
        for j, c in enumerate(cells):
            row[: c.shape[0], j * (size + pad) : j * (size + pad) + c.shape[1]] = c
        rows.append(row)
    grid = np.full((len(rows) * (size + pad), rows[0].shape[1], 3), 255, np.uint8)
    for i, r in enumerate(rows):
        grid[i * (size + pad) : i * (size + pad) + size] = r
    return write_png(out_png, grid)
