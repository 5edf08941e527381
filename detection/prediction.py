"""Run a trained YOLO detector on images and return :class:`~aerosynth.data.detections.Detections`.

Images are RGB (``(H, W, 3)`` uint8 arrays or files). A batch of images is one forward pass of the
ultralytics ``DetectionModel``, prepared as ultralytics' predictor prepares it (fused, eval mode, its
memory format, inference mode) and fed as that predictor feeds it: letterboxed to the inference size
(images already that size are left as they are), RGB, CHW floats in ``[0, 1]``, then ultralytics'
``non_max_suppression`` and boxes scaled back to each image's pixels. The boxes are the predictor's,
without its per-call setup, per-image letterbox and result objects. A model is loaded once per
process, path, file modification time and device.
"""

from __future__ import annotations

import copy
import functools
import pickletools
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@functools.lru_cache(maxsize=4)
def _inference_model(path: str, mtime: float, device: str):  # mtime in the key: a rewritten file is reloaded
    """The detector as ultralytics' predictor runs it: a copy of the loaded model, fused, on ``device``, eval mode.

    ultralytics' ``select_device`` sets torch to one thread fewer than the machine's cores on a CPU (its
    setting for training beside data loaders); inference here keeps the process' own thread count, so a
    process on its own uses every core and a worker keeps the one thread it was given.
    """
    import torch
    import torchvision  # noqa: F401  (ultralytics' NMS uses torchvision's kernel once it is imported)
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.utils.torch_utils import select_device

    model = copy.deepcopy(_load(path, mtime).model)
    threads = torch.get_num_threads()
    try:
        chosen = select_device(device, verbose=False)
    finally:
        torch.set_num_threads(threads)
    return AutoBackend(model, device=chosen, fuse=True, verbose=False).eval()


def inference_model(model_path: str | Path, device: str = "cpu"):
    """The detector of a local ``.pt`` ready for batched inference on ``device`` (cached per process).

    Raises:
        InputError: the file does not exist or is not a detector (:func:`check_detector_file`).
    """
    path = check_detector_file(model_path)
    return _inference_model(str(path.resolve()), path.stat().st_mtime, device)


@functools.lru_cache(maxsize=16)
def _input_size(imgsz: int, stride: int) -> tuple[int, int]:
    from ultralytics.utils.checks import check_imgsz

    h, w = check_imgsz(imgsz, stride=stride, min_dim=2)  # rounded up to the stride, as the predictor does
    return int(h), int(w)


def _non_max_suppression():
    try:
        from ultralytics.utils.nms import non_max_suppression
    except ImportError:  # ultralytics before the nms module
        from ultralytics.utils.ops import non_max_suppression
    return non_max_suppression


def _as_rgb(image: str | Path | np.ndarray) -> np.ndarray:
    rgb = read_rgb(image) if isinstance(image, (str, Path)) else np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError("images", f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    return rgb


def _input_batch(images: list[np.ndarray], shape: tuple[int, int], stride: int) -> np.ndarray:
    """``(N, H, W, 3)`` uint8: the images letterboxed to ``shape`` as the predictor letterboxes them."""
    same = len({im.shape for im in images}) == 1
    if same and images[0].shape[:2] == shape:
        return np.stack(images)  # the letterbox would leave them as they are
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox(shape, auto=same, stride=stride)  # auto: the predictor's rect for same-shaped images
    return np.stack([letterbox(image=im) for im in images])


def predict_batch(
    model: Any, images: Sequence[np.ndarray], conf: float, imgsz: int, max_det: int, iou: float
) -> list[Detections]:
    """Detections for a batch of RGB images in one forward pass, in pixels of each image.

    Args:
        model: from :func:`inference_model`.
        images: ``(H, W, 3)`` uint8 RGB arrays.
        conf: lowest confidence kept.
        imgsz: inference size (rounded up to the model's stride).
        max_det: most detections per image.
        iou: NMS IoU threshold.
    """
    import torch
    from ultralytics.utils.ops import scale_boxes

    images = [_as_rgb(im) for im in images]
    if not images:
        return []
    stride = int(model.stride)
    batch = _input_batch(images, _input_size(imgsz, stride), stride)
    with torch.inference_mode():
        x = torch.from_numpy(batch).to(model.device).permute(0, 3, 1, 2).contiguous()
        x = (x.half() if model.fp16 else x.float()).div_(255)
        preds = _non_max_suppression()(
            model(x),
            conf,
            iou,
            None,
            False,
            max_det=max_det,
            nc=0,
            end2end=getattr(model, "end2end", False),
            rotated=False,
        )
        out = []
        for pred, im in zip(preds, images, strict=True):
            boxes = scale_boxes(x.shape[2:], pred[:, :4], im.shape)
            out.append(
                Detections(
                    boxes.cpu().numpy().astype(np.float64),
                    pred[:, 4].cpu().numpy().astype(np.float64),
                    pred[:, 5].cpu().numpy().astype(np.int64),
                )
            )
    return out


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
    model = inference_model(model_path, device)
    images = list(images)
    out: list[Detections] = []
    for start in range(0, len(images), batch):
        out.extend(predict_batch(model, images[start : start + batch], conf, imgsz, max_det, iou))
    return out


@dataclass(frozen=True)
class WindowPredictor:
    """A detector as a window predictor (RGB windows in, one :class:`Detections` per window out).

    Picklable (it holds the settings, not the model): each process that calls it loads the model once
    (:func:`inference_model`) and keeps it for every later call, so a Dask worker loads it once, not
    once per block.

    Attributes:
        model_path: the detector ``.pt``.
        conf: lowest confidence kept.
        imgsz: inference size (the window size).
        max_det: most detections per window.
        iou: NMS IoU threshold.
        device: inference device.
    """

    model_path: str
    conf: float = 0.25
    imgsz: int = 128
    max_det: int = 300
    iou: float = 0.7
    device: str = "cpu"

    def load(self) -> None:
        """Load the model in this process now (a no-op when it is loaded)."""
        inference_model(self.model_path, self.device)

    def __call__(self, windows: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of each window, in window pixels (one forward pass per call)."""
        return predict(
            self.model_path,
            windows,
            conf=self.conf,
            imgsz=self.imgsz,
            max_det=self.max_det,
            iou=self.iou,
            device=self.device,
            batch=max(len(windows), 1),
        )


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
