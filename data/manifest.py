"""Manifests: what a stage wrote, with content hashes, so later stages can cache and resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from aerosynth.data.atomic import atomic_write_json

MANIFEST_FILE = "manifest.json"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(root: str | Path, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> str:
    """One hash over every file below ``root`` (relative paths and contents, sorted)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in exclude and not p.name.startswith("."):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(b"\0")
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def write_manifest(folder: str | Path, content: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json``; adds ``content_sha256`` of everything else in the folder."""
    folder = Path(folder)
    doc = dict(content)
    doc["content_sha256"] = tree_sha256(folder)
    return atomic_write_json(folder / MANIFEST_FILE, doc)


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, or ``None`` when it has none (an unfinished stage)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None
