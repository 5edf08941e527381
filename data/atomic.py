"""Atomic file and folder writes: a reader never sees half a file, a crash leaves no debris."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically (same object, same bytes)."""
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


@contextlib.contextmanager
def atomic_output_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success.

    For writers that want a file name (``cv2.imwrite``, ``rasterio.open``). ``suffix``
    keeps the extension such writers look at.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(src: str | Path, dst: str | Path) -> Path:
    """``dst`` becomes a hard link to ``src`` (a copy where links are not possible), placed atomically.

    A hard link is a real file to hashing and to readers, and costs no space.
    """
    with atomic_output_path(dst, Path(dst).suffix) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
    return Path(dst)


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place when the block ends.

    On any exception the temporary folder is removed and ``path`` is untouched.

    Args:
        path: the final folder.
        overwrite: replace an existing folder (it is removed only after the new one is
            complete); otherwise an existing folder is an error.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_partial_files(root: str | Path) -> int:
    """Delete what a killed writer left below ``root``: ``.<name>.*.tmp*`` files and
    ``.<name>.*.partial`` / ``.*.old`` folders of the writers above. Returns how many.

    Only call it when no writer is active below ``root`` (e.g. before a stage resumes).
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    removed = 0
    for p in sorted(root.rglob(".*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir() and (p.name.endswith(".partial") or p.name.endswith(".old")):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
        elif p.is_file() and ".tmp" in p.name:
            p.unlink(missing_ok=True)
            removed += 1
    return removed
