"""Reading a synthetic set written by the generation stage.

Layout (see the project brief)::

    SET_DIR/
      synthetic.json        {"set", "domain", "with_vehicles", "prompt", "count", "base_seed",
                             "image_size", "gsd", "heatmap_channels": ["cars", "V1", "255-background"]}
      images/000000.png     RGB uint8
      heatmaps/000000.png   RGB uint8: R = "cars", G = [V1], B = 255 - background (each 0..255)
      maps/000000.npy       optional float32 (3, H, W) raw maps, same channel order
      labels/000000.txt     only for "translation" sets
      shards/*.json         shard manifests (index range, files, sha256), written last

Annotation only reads a set; it never writes into it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb

SYNTHETIC_FILE = "synthetic.json"
DEFAULT_CHANNELS = ["cars", "V1", "255-background"]
SET_KINDS = ("target_cars", "target_empty", "source_cars", "translation")

#: Heat-map views :meth:`SyntheticSet.heatmap` can return.
HEATMAP_VIEWS = ("cars", "V1", "foreground", "cars*foreground")


@dataclass
class SyntheticSetInfo:
    """Header of ``synthetic.json``."""

    set: str
    domain: str
    with_vehicles: bool
    prompt: str
    count: int
    base_seed: int
    image_size: int
    gsd: float
    heatmap_channels: list[str] = field(default_factory=lambda: list(DEFAULT_CHANNELS))


class SyntheticSet:
    """A generated image set with its attention heat maps.

    Args:
        set_dir: the set folder.

    Raises:
        InputError: no or malformed ``synthetic.json``, or an image/heat map listed by
            ``count`` is missing.
    """

    def __init__(self, set_dir: str | Path) -> None:
        self.root = Path(set_dir)
        path = self.root / SYNTHETIC_FILE
        if not path.is_file():
            raise InputError(self.root, f"not a synthetic set (no {SYNTHETIC_FILE})")
        try:
            doc = json.loads(path.read_text())
            known = {k: doc[k] for k in SyntheticSetInfo.__dataclass_fields__ if k in doc}
            self.info = SyntheticSetInfo(**known)
        except (ValueError, TypeError) as exc:
            raise InputError(path, f"malformed synthetic set header ({exc})") from None
        if self.info.set not in SET_KINDS:
            raise InputError(path, f"unknown set kind {self.info.set!r} (expected one of {', '.join(SET_KINDS)})")
        if not (isinstance(self.info.count, int) and self.info.count >= 0):
            raise InputError(path, f"count must be a non-negative integer, got {self.info.count!r}")
        if not (isinstance(self.info.gsd, (int, float)) and self.info.gsd > 0):
            raise InputError(path, f"gsd must be a positive number, got {self.info.gsd!r}")
        if "cars" not in self.info.heatmap_channels:
            raise InputError(path, "heatmap_channels has no 'cars' channel")
        self.names = [f"{i:06d}" for i in range(self.info.count)]
        for name in self.names:
            for sub in ("images", "heatmaps"):
                if not (self.root / sub / f"{name}.png").is_file():
                    raise InputError(self.root / sub / f"{name}.png", "missing (set incomplete or count wrong)")

    # ------------------------------------------------------------------ basics
    @property
    def name(self) -> str:
        """The set's kind (``target_cars`` ...) as written by generation."""
        return self.info.set

    @property
    def with_vehicles(self) -> bool:
        return bool(self.info.with_vehicles)

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, name: str) -> Path:
        return self.root / "images" / f"{name}.png"

    def heatmap_path(self, name: str) -> Path:
        return self.root / "heatmaps" / f"{name}.png"

    def raw_map_path(self, name: str) -> Path:
        return self.root / "maps" / f"{name}.npy"

    def label_path(self, name: str) -> Path:
        return self.root / "labels" / f"{name}.txt"

    def image(self, name: str) -> np.ndarray:
        """The generated image, ``(H, W, 3)`` uint8."""
        return read_rgb(self.image_path(name))

    def heatmap_rgb(self, name: str) -> np.ndarray:
        """The heat-map stack as stored, ``(H, W, 3)`` uint8."""
        return read_rgb(self.heatmap_path(name))

    def heatmap(self, name: str, view: str = "cars", raw: bool = False) -> np.ndarray:
        """One heat map of an image as ``(H, W)`` float64.

        Args:
            name: image stem.
            view: ``cars``, ``V1``, ``foreground`` (1 - background) or ``cars*foreground``.
            raw: read ``maps/<name>.npy`` (raw attention values, min-max normalised here)
                instead of the 8-bit PNG (values / 255).

        Raises:
            InputError: unknown view, or a missing/malformed raw map.
        """
        if view not in HEATMAP_VIEWS:
            raise InputError("heatmap view", f"unknown view {view!r} (expected one of {', '.join(HEATMAP_VIEWS)})")
        if raw:
            path = self.raw_map_path(name)
            if not path.is_file():
                raise InputError(path, "raw map missing (set written without maps/)")
            try:
                maps = np.load(path, allow_pickle=False).astype(np.float64)
            except (ValueError, OSError) as exc:
                raise InputError(path, f"unreadable raw map ({type(exc).__name__})") from None
            if maps.ndim != 3 or maps.shape[0] != 3:
                raise InputError(path, f"expected a (3, H, W) array, got shape {maps.shape}")
            stack = np.stack([_minmax(m) for m in maps], axis=-1)
            # the stored B channel is 255 - background; the raw one is the background itself
            stack[..., 2] = 1.0 - stack[..., 2]
        else:
            stack = self.heatmap_rgb(name).astype(np.float64) / 255.0
        cars, v1, fg = stack[..., 0], stack[..., 1], stack[..., 2]
        if view == "cars":
            return cars
        if view == "V1":
            return v1
        if view == "foreground":
            return fg
        return cars * fg

    def yolo_labels(self, name: str):
        """Boxes carried over from the real source tile (``translation`` sets only)."""
        from aerosynth.data.detections import Detections

        path = self.label_path(name)
        if not path.is_file():
            raise InputError(path, "no label file (only translation sets have labels)")
        size = self.info.image_size
        return Detections.from_yolo(path.read_text(), size, size, where=str(path))

    def fingerprint(self) -> dict:
        """What identifies this set's content for a manifest: header and shard manifests' hashes."""
        h = hashlib.sha256()
        h.update((self.root / SYNTHETIC_FILE).read_bytes())
        shards = sorted((self.root / "shards").glob("*.json")) if (self.root / "shards").is_dir() else []
        for shard in shards:
            h.update(shard.name.encode())
            h.update(shard.read_bytes())
        return {
            "path": str(self.root.resolve()),
            "set": self.info.set,
            "count": self.info.count,
            "shards": len(shards),
            "sha256": h.hexdigest(),
        }


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def open_synthetic_set(set_dir: str | Path) -> SyntheticSet:
    """Open a synthetic set (see the module docstring for the layout)."""
    return SyntheticSet(set_dir)
