"""Reading and writing plain images with clear errors and a decompression-bomb guard."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from aerosynth.data.atomic import atomic_output_path
from aerosynth.data.errors import InputError

#: Largest image aerosynth will decode (pixels); a header claiming more is refused unread.
MAX_IMAGE_PIXELS = 20_000 * 20_000

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Image.DecompressionBombError:
        raise InputError(path, "image header claims too many pixels (decompression bomb guard)") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise InputError(path, f"unreadable or corrupt image ({type(exc).__name__})") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(path, f"image header claims {w}x{h} pixels, over the {MAX_IMAGE_PIXELS} limit")
    return w, h


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB.

    Raises:
        InputError: missing, corrupt, truncated or oversized image.
    """
    path = Path(path)
    w, h = image_size(path)
    arr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if arr is None or arr.shape[:2] != (h, w):
        raise InputError(path, "unreadable, corrupt or truncated image")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        # OpenCV decodes a truncated JPEG silently; PIL's full load notices.
        try:
            with Image.open(path) as im:
                im.load()
        except Exception:
            raise InputError(path, "truncated or corrupt JPEG") from None
    return np.ascontiguousarray(arr[:, :, ::-1])


def write_png(path: str | Path, rgb: np.ndarray, palette: bool = False) -> Path:
    """Write an ``(H, W, 3)`` uint8 RGB array (or ``(H, W)`` grey) as PNG, atomically.

    Args:
        path: the file.
        rgb: the pixels.
        palette: store 256 colours (median cut) instead of full RGB: figures of photographs and noise
            take about a third of the bytes, at a visible but small colour loss. Not for data.
    """
    path = Path(path)
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 pixels, got {arr.dtype}")
    if palette and arr.ndim == 3:
        image = Image.fromarray(np.ascontiguousarray(arr)).quantize(256, method=Image.Quantize.MEDIANCUT)
        with atomic_output_path(path, ".png") as tmp:
            image.save(tmp, format="PNG", optimize=True)
        return path
    if arr.ndim == 3:
        arr = arr[:, :, ::-1]
    with atomic_output_path(path, ".png") as tmp:
        if not cv2.imwrite(str(tmp), arr):
            raise InputError(path, "could not write image")
    return path
