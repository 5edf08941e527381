"""Run a trained YOLO detector on images and return :class:`~aerosynth.data.detections.Detections`.

Images are RGB (``(H, W, 3)`` uint8 arrays or files); ultralytics wants BGR arrays, the
conversion happens here. A model is loaded once per path (and file modification time).
"""

from __future__ import annotations

import functools
import pickletools
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb
from aerosynth.data.offline import apply_offline_settings

#: Largest pickle part of a checkpoint that is read (an ultralytics detector's is about 100 kB).
_MAX_PICKLE_BYTES = 64 * 1024 * 1024
_NOT_A_DETECTOR = "not a detector (expected an ultralytics .pt checkpoint, e.g. a run's train/detector.pt)"


def _pickle_names(data: bytes) -> set[str]:
    """Module and class names a pickle refers to, and its other strings, read without running it."""
    names: set[str] = set()
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str):
            names.update(arg.split(" ") if op.name in ("GLOBAL", "INST") else [arg])
    return names


@functools.lru_cache(maxsize=16)
def _check_detector(path: str, mtime: float) -> None:  # mtime in the key: a rewritten file is checked again
    where = Path(path)
    if not zipfile.is_zipfile(path):
        raise InputError(where, _NOT_A_DETECTOR)
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [i for i in zf.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            usable = len(pickles) == 1 and pickles[0].file_size <= _MAX_PICKLE_BYTES
            names = _pickle_names(zf.read(pickles[0])) if usable else set()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputError(where, f"{_NOT_A_DETECTOR}: unreadable ({type(exc).__name__})") from None
    if not usable:
        raise InputError(where, _NOT_A_DETECTOR)
    if not any(n.startswith("ultralytics") for n in names):
        raise InputError(where, f"{_NOT_A_DETECTOR}: a torch file without an ultralytics model")
    if not any(n.endswith("DetectionModel") for n in names):
        kinds = sorted(n for n in names if n.endswith("Model") and n[:1].isupper())
        found = f" ({', '.join(kinds)})" if kinds else ""
        raise InputError(where, f"{_NOT_A_DETECTOR}: an ultralytics model of another task{found}")


def check_detector_file(model_path: str | Path) -> Path:
    """Check, without loading it, that a file is an ultralytics detector checkpoint.

    Reads the zip structure of a torch ``.pt`` and the names its pickle refers to (nothing in it
    is executed): it must hold an ultralytics ``DetectionModel``. Cheap (a few ms), cached per
    path and modification time; every command taking a detector calls it before any work.

    Args:
        model_path: the file given as a detector.

    Returns:
        The path, unchanged.

    Raises:
        InputError: the file does not exist or is not a detector (one line naming it).
    """
    path = Path(model_path)
    if not path.is_file():
        raise InputError(path, "model weights not found" if not path.is_dir() else f"a folder, {_NOT_A_DETECTOR}")
    _check_detector(str(path.resolve()), path.stat().st_mtime)
    return path


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float):  # mtime in the key: a rewritten file is reloaded
    apply_offline_settings()
    from ultralytics import YOLO

    return YOLO(path, task="detect")


def load_model(model_path: str | Path):
    """The ultralytics model of a local ``.pt`` (cached).

    Raises:
        InputError: the file does not exist or is not a detector (:func:`check_detector_file`).
    """
    path = check_detector_file(model_path)
    return _load(str(path.resolve()), path.stat().st_mtime)


def _as_bgr(image: str | Path | np.ndarray) -> np.ndarray:
    rgb = read_rgb(image) if isinstance(image, (str, Path)) else np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError("images", f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    return np.ascontiguousarray(rgb[:, :, ::-1])


def predict(
    model_path: str | Path,
    images: Sequence[str | Path | np.ndarray],
    conf: float = 0.001,
    imgsz: int = 128,
    max_det: int = 100,
    iou: float = 0.7,
    device: str = "cpu",
    batch: int = 32,
) -> list[Detections]:
    """Detections for each image, in pixels of that image, with confidences.

    Args:
        model_path: a ``.pt`` written by :func:`aerosynth.detection.training.train_detector` (or any local
            YOLO checkpoint).
        images: RGB arrays or image files.
        conf: lowest confidence kept (0.001 for AP evaluation).
        imgsz: inference size.
        max_det: most detections per image.
        iou: NMS IoU threshold.
        device: ``"cpu"`` or a CUDA device.
        batch: images per forward pass.
    """
    model = load_model(model_path)
    out: list[Detections] = []
    images = list(images)
    for start in range(0, len(images), batch):
        chunk = [_as_bgr(im) for im in images[start : start + batch]]
        results = model.predict(
            chunk, conf=conf, imgsz=imgsz, max_det=max_det, iou=iou, device=device, verbose=False, save=False
        )
        for r in results:
            b = r.boxes
            out.append(
                Detections(
                    b.xyxy.cpu().numpy().astype(np.float64),
                    b.conf.cpu().numpy().astype(np.float64),
                    b.cls.cpu().numpy().astype(np.int64),
                )
            )
    return out


def predict_split(
    model_path: str | Path,
    split,
    conf: float = 0.001,
    imgsz: int | None = None,
    max_det: int = 100,
    device: str = "cpu",
) -> list[Detections]:
    """Detections for every tile of a split, in ``split.tiles`` order (what :mod:`aerosynth.detection.evaluation`
    takes).

    Args:
        model_path: detector weights.
        split: an opened split (``aerosynth.data.tileset.open_split`` / ``open_evaluation_split``) or its folder.
        conf: lowest confidence kept.
        imgsz: inference size; the split's tile size when ``None``.
        max_det: most detections per tile.
        device: inference device.
    """
    if isinstance(split, (str, Path)):
        from aerosynth.data.tileset import open_split

        split = open_split(split)
    size = imgsz or split.info.tile_size
    paths = [split.image_path(t.tile_id) for t in split.tiles]
    return predict(model_path, paths, conf=conf, imgsz=size, max_det=max_det, device=device)
