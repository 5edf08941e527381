"""One small detections type that every stage passes around, with adapters at the edges.

Coordinates are pixels of the image they belong to, ``xyxy`` with x to the right and y
down, the image's top-left pixel corner at (0, 0) (so a pixel's centre is at +0.5).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aerosynth.data.errors import InputError


def _as_xyxy(xyxy: Any) -> np.ndarray:
    arr = np.asarray(xyxy, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    return arr.reshape(-1, 4)


@dataclass
class Detections:
    """Boxes with optional confidences and class ids.

    Attributes:
        xyxy: ``(N, 4)`` float64 boxes ``x1, y1, x2, y2`` in pixels.
        confidence: ``(N,)`` float64 scores, or ``None`` for ground truth.
        class_id: ``(N,)`` int64 class indices.
    """

    xyxy: np.ndarray
    confidence: np.ndarray | None = None
    class_id: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.xyxy = _as_xyxy(self.xyxy)
        n = len(self.xyxy)
        if self.class_id is None:
            self.class_id = np.zeros(n, dtype=np.int64)
        self.class_id = np.asarray(self.class_id, dtype=np.int64).reshape(-1)
        if self.confidence is not None:
            self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(-1)
            if len(self.confidence) != n:
                raise ValueError(f"confidence has {len(self.confidence)} entries for {n} boxes")
        if len(self.class_id) != n:
            raise ValueError(f"class_id has {len(self.class_id)} entries for {n} boxes")

    # ------------------------------------------------------------------ basics
    @classmethod
    def empty(cls, with_confidence: bool = False) -> Detections:
        """No boxes."""
        return cls(np.zeros((0, 4)), np.zeros(0) if with_confidence else None, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Any) -> Detections:
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        conf = None if self.confidence is None else self.confidence[index]
        return Detections(self.xyxy[index], conf, self.class_id[index])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Detections):
            return NotImplemented
        if (self.confidence is None) != (other.confidence is None):
            return False
        same_conf = self.confidence is None or np.array_equal(self.confidence, other.confidence)
        return bool(
            np.array_equal(self.xyxy, other.xyxy) and np.array_equal(self.class_id, other.class_id) and same_conf
        )

    @classmethod
    def merge(cls, parts: Sequence[Detections]) -> Detections:
        """Concatenate several detections (all with or all without confidence)."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        has_conf = [p.confidence is not None for p in parts]
        if any(has_conf) and not all(has_conf):
            raise ValueError("cannot merge detections with and without confidence")
        conf = np.concatenate([p.confidence for p in parts]) if all(has_conf) else None
        return cls(
            np.concatenate([p.xyxy for p in parts]),
            conf,
            np.concatenate([p.class_id for p in parts]),
        )

    @property
    def area(self) -> np.ndarray:
        """Box areas in square pixels."""
        wh = np.clip(self.xyxy[:, 2:] - self.xyxy[:, :2], 0, None)
        return wh[:, 0] * wh[:, 1]

    @property
    def centers(self) -> np.ndarray:
        """``(N, 2)`` box centres."""
        return (self.xyxy[:, :2] + self.xyxy[:, 2:]) / 2

    def translate(self, dx: float, dy: float) -> Detections:
        """Shift every box by ``(dx, dy)`` pixels."""
        return Detections(self.xyxy + np.array([dx, dy, dx, dy]), self.confidence, self.class_id)

    def scale(self, sx: float, sy: float | None = None) -> Detections:
        """Scale coordinates (as when the image is resampled by ``sx``, ``sy``)."""
        sy = sx if sy is None else sy
        return Detections(self.xyxy * np.array([sx, sy, sx, sy]), self.confidence, self.class_id)

    def clip(self, width: float, height: float) -> Detections:
        """Clip boxes to the image ``[0, width] x [0, height]``."""
        xyxy = self.xyxy.copy()
        xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, width)
        xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, height)
        return Detections(xyxy, self.confidence, self.class_id)

    def pixel_mask(self, width: int, height: int, margin: float = 0.0) -> np.ndarray:
        """``(height, width)`` bool: the pixels the boxes (each grown by ``margin``) touch, corners rounded
        outward (floor / ceil) and clipped to the image."""
        mask = np.zeros((height, width), bool)
        for x1, y1, x2, y2 in self.xyxy:
            xa, ya = max(0, int(np.floor(x1 - margin))), max(0, int(np.floor(y1 - margin)))
            xb, yb = min(width, int(np.ceil(x2 + margin))), min(height, int(np.ceil(y2 + margin)))
            mask[ya:yb, xa:xb] = True
        return mask

    def with_class(self, class_id: int) -> Detections:
        """All boxes set to one class (aerial-v1 folds car and large vehicle into ``vehicle``)."""
        return Detections(self.xyxy, self.confidence, np.full(len(self), class_id, np.int64))

    def filter_confidence(self, threshold: float) -> Detections:
        """Keep boxes whose confidence is at least ``threshold``."""
        if self.confidence is None:
            return self
        return self[self.confidence >= threshold]

    # ------------------------------------------------------------- validation
    def validate(self, where: str, width: float | None = None, height: float | None = None) -> Detections:
        """Raise :class:`InputError` for NaN, inverted or zero-size boxes, or boxes off the image."""
        if not np.all(np.isfinite(self.xyxy)):
            raise InputError(where, "box coordinate is not a finite number")
        if np.any(self.xyxy[:, 2] <= self.xyxy[:, 0]) or np.any(self.xyxy[:, 3] <= self.xyxy[:, 1]):
            raise InputError(where, "box with zero or negative width/height (inverted corners?)")
        if np.any(self.class_id < 0):
            raise InputError(where, "negative class id")
        if width is not None and height is not None and len(self):
            tol = 1.0
            bad = (
                (self.xyxy[:, 0] < -tol)
                | (self.xyxy[:, 1] < -tol)
                | (self.xyxy[:, 2] > width + tol)
                | (self.xyxy[:, 3] > height + tol)
            )
            if np.any(bad):
                raise InputError(where, f"box outside the {width:g}x{height:g} image")
        return self

    # ----------------------------------------------------------------- YOLO
    @classmethod
    def from_yolo(cls, text: str, width: int, height: int, where: str = "<yolo>") -> Detections:
        """Parse YOLO txt rows ``class cx cy w h`` (normalised; an optional 6th column is confidence).

        A leading UTF-8 byte-order mark, CRLF line ends and blank lines are fine (files from Windows tools).

        Raises:
            InputError: a malformed row, a non-finite or out-of-range value.
        """
        rows: list[list[float]] = []
        has_conf: set[bool] = set()
        for lineno, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (5, 6):
                raise InputError(f"{where}:{lineno}", f"expected 5 values 'class cx cy w h', got {len(parts)}")
            try:
                values = [float(p) for p in parts]
            except ValueError:
                raise InputError(f"{where}:{lineno}", "a value is not a number") from None
            if not all(np.isfinite(values)):
                raise InputError(f"{where}:{lineno}", "a value is not finite")
            cls_id, cx, cy, w, h = values[:5]
            if cls_id < 0 or cls_id != int(cls_id):
                raise InputError(f"{where}:{lineno}", f"class id {parts[0]} is not a non-negative integer")
            if w <= 0 or h <= 0:
                raise InputError(f"{where}:{lineno}", "box width and height must be positive")
            if not (-1e-6 <= cx - w / 2 and cx + w / 2 <= 1 + 1e-3 and -1e-6 <= cy - h / 2 and cy + h / 2 <= 1 + 1e-3):
                # tolerate rounding of a box touching the border; reject real out-of-range rows
                if cx < 0 or cx > 1 or cy < 0 or cy > 1 or w > 1.001 or h > 1.001:
                    raise InputError(f"{where}:{lineno}", "normalised coordinates outside [0, 1]")
            has_conf.add(len(values) == 6)
            rows.append(values)
        if not rows:
            return cls.empty()
        if len(has_conf) > 1:
            raise InputError(where, "some rows have a confidence column and some do not")
        arr = np.array([r[:5] for r in rows])
        cx, cy, w, h = arr[:, 1] * width, arr[:, 2] * height, arr[:, 3] * width, arr[:, 4] * height
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        conf = np.array([r[5] for r in rows]) if has_conf == {True} else None
        return cls(xyxy, conf, arr[:, 0].astype(np.int64)).clip(width, height)

    def to_yolo(self, width: int, height: int, with_confidence: bool = False) -> str:
        """YOLO txt rows, one per box, normalised to the image size."""
        lines = []
        for i in range(len(self)):
            x1, y1, x2, y2 = self.xyxy[i]
            row = [
                f"{int(self.class_id[i])}",
                f"{(x1 + x2) / 2 / width:.6f}",
                f"{(y1 + y2) / 2 / height:.6f}",
                f"{(x2 - x1) / width:.6f}",
                f"{(y2 - y1) / height:.6f}",
            ]
            if with_confidence and self.confidence is not None:
                row.append(f"{self.confidence[i]:.6f}")
            lines.append(" ".join(row))
        return "\n".join(lines) + ("\n" if lines else "")

    # ----------------------------------------------------------------- COCO
    @classmethod
    def from_coco(cls, annotations: Iterable[dict], category_to_class: dict[int, int] | None = None) -> Detections:
        """From COCO annotation dicts (``bbox`` is ``x, y, w, h``; ``score`` optional)."""
        anns = list(annotations)
        if not anns:
            return cls.empty()
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        cats = [int(a.get("category_id", 1)) for a in anns]
        class_id = [category_to_class[c] if category_to_class else c - 1 for c in cats]
        scores = [a.get("score") for a in anns]
        conf = None if any(s is None for s in scores) else np.array(scores, dtype=np.float64)
        return cls(xyxy, conf, class_id)

    def to_coco(self, image_id: int, start_id: int = 1, iscrowd: int = 0) -> list[dict]:
        """COCO annotation dicts; category id is ``class_id + 1``."""
        out = []
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.xyxy[i])
            ann = {
                "id": start_id + i,
                "image_id": int(image_id),
                "category_id": int(self.class_id[i]) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(iscrowd),
            }
            if self.confidence is not None:
                ann["score"] = float(self.confidence[i])
            out.append(ann)
        return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes."""
    a = _as_xyxy(a)
    b = _as_xyxy(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(detections: Detections, iou_threshold: float = 0.5, class_agnostic: bool = True) -> Detections:
    """Greedy non-maximum suppression; boxes without confidence are ranked by area."""
    if len(detections) == 0:
        return detections
    score = detections.confidence if detections.confidence is not None else detections.area
    order = np.argsort(-score, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(detections), bool)
    iou = box_iou(detections.xyxy, detections.xyxy)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        same = np.ones(len(detections), bool) if class_agnostic else detections.class_id == detections.class_id[i]
        suppressed |= (iou[i] > iou_threshold) & same
    return detections[np.array(sorted(keep), dtype=np.int64)]


def save_detection_lists(path: str | Path, lists: dict[str, Sequence[Detections]], meta: dict) -> Path:
    """Write named per-image detection lists (e.g. a proposer's boxes on every tile of two splits) to ``.npz``.

    ``meta`` (JSON-serialisable) says what made them; :func:`load_detection_lists` returns it beside the lists.
    Boxes, confidences and class ids round-trip exactly.
    """
    from aerosynth.data.atomic import atomic_write_bytes

    arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)}
    for name, dets in lists.items():
        dets = list(dets)
        if any(d.confidence is None for d in dets):
            raise ValueError(f"{name}: every detection list needs confidences")
        arrays[f"{name}.counts"] = np.array([len(d) for d in dets], np.int64)
        arrays[f"{name}.xyxy"] = np.concatenate([d.xyxy for d in dets]) if dets else np.zeros((0, 4))
        arrays[f"{name}.confidence"] = np.concatenate([d.confidence for d in dets]) if dets else np.zeros(0)
        arrays[f"{name}.class_id"] = np.concatenate([d.class_id for d in dets]) if dets else np.zeros(0, np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def load_detection_lists(path: str | Path) -> tuple[dict[str, list[Detections]], dict]:
    """The lists and ``meta`` written by :func:`save_detection_lists`."""
    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        out: dict[str, list[Detections]] = {}
        for key in data.files:
            if not key.endswith(".counts"):
                continue
            name = key.removesuffix(".counts")
            ends = np.cumsum(data[key])
            starts = ends - data[key]
            xyxy, conf, cls = data[f"{name}.xyxy"], data[f"{name}.confidence"], data[f"{name}.class_id"]
            out[name] = [Detections(xyxy[a:b], conf[a:b], cls[a:b]) for a, b in zip(starts, ends, strict=True)]
    return out, meta
