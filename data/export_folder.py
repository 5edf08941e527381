"""Export folders: a new dated folder of georeferenced tiles, their labels and dataset files.

An export (what the ``request`` flow hands to GIS analysts) is one folder, never overwritten::

    OUT_ROOT/<YYYY-MM-DD>_<name>/
      tiles/<id>.tif            RGB uint8 GeoTIFF
      labels/<id>.geojson       box polygons of that tile in its CRS
      labels.geojson            all boxes of all tiles (property ``tile`` names the tile)
      coco.json                 COCO; ``file_name`` is ``tiles/<id>.tif``
      yolo/images/<id>.png      the same pixels as PNG
      yolo/labels/<id>.txt      YOLO rows (empty file: no vehicle)
      yolo/data.yaml            ultralytics dataset (no ``path`` key: ultralytics then reads the
                                splits next to the yaml, so the folder can be moved or zipped)
      catalog.json              STAC catalog (:mod:`aerosynth.data.stac`)
      stac/...

Here: the folder's name (:func:`check_name`, :func:`export_folder`), its publication
(:func:`publish_export`: built under a temporary name and renamed into place under an exclusive lock
file ``OUT_ROOT/.<folder>.lock``) and the sha256 inventory of its files (:func:`file_inventory`). The
tiles and dataset files are written by :class:`aerosynth.data.tile_export.TileExport`.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aerosynth.data.atomic import atomic_directory
from aerosynth.data.errors import InputError
from aerosynth.data.manifest import file_sha256

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


# ------------------------------------------------------------------------ the folder
def check_name(name: Any) -> str:
    """Return ``name`` if it is a safe request name, else raise :class:`InputError` naming ``name``."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InputError(
            "name",
            f"{name!r} is not a request name: 1 to 64 letters, digits, '_' or '-', starting with a letter or digit "
            "(no path separators)",
        )
    return name


def export_folder(out_root: str | Path, name: str, day: dt.date | None = None) -> Path:
    """``OUT_ROOT/<YYYY-MM-DD>_<name>`` (``name`` checked first)."""
    check_name(name)
    day = day or dt.date.today()
    return Path(out_root) / f"{day.isoformat()}_{name}"


def check_new_export(folder: Path) -> None:
    """Raise :class:`InputError` when an export (or a link) of that name and date already exists."""
    if folder.exists() or folder.is_symlink():
        raise InputError(
            folder,
            "an export of this name and date already exists (exports are never overwritten; choose another name)",
        )


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold ``.<folder>.lock`` beside ``folder`` (O_EXCL) while an export is built."""
    lock = folder.parent / f".{folder.name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise InputError(
            folder,
            f"another request is writing this export now (or a crashed one left {lock.name}: "
            "remove it if no request is running)",
        ) from None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextmanager
def publish_export(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; it becomes ``folder`` when the block ends without error.

    Under the lock file no second writer of the same export can publish; on an error neither the
    folder nor any debris is left.

    Raises:
        InputError: another writer holds the lock, or the export appeared meanwhile.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder):
        if folder.exists():
            raise InputError(folder, "an export of this name and date already exists")
        with atomic_directory(folder) as tmp:
            yield tmp


def file_inventory(root: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file below ``root``, sorted by path."""
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
