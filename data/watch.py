"""A watched folder of new imagery: GeoTIFFs not used before, and the ``flags.json`` given with them.

``flags.json`` in the watched folder maps tile ids (``<raster stem>_<x0>_<y0>``, offsets in pixels at
the tiles' GSD) or raster names to ``true``/``false`` (has a vehicle); it is read by
:func:`aerosynth.data.flags.read_flags_file`, the reader of a target folder's flags.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from aerosynth.data.domains import RASTER_SUFFIXES
from aerosynth.data.errors import InputError
from aerosynth.data.flags import FLAGS_FILE, read_flags_file
from aerosynth.data.manifest import file_sha256

__all__ = ["FLAGS_FILE", "NewRaster", "find_new_rasters", "read_flags_file"]


@dataclass(frozen=True)
class NewRaster:
    """A GeoTIFF of the watched folder not used before.

    Attributes:
        path: the raster.
        sha256: its content hash (the key in a registry's ``seen.json``).
        labels: ``<stem>.geojson`` beside it, or ``None``.
    """

    path: Path
    sha256: str
    labels: Path | None = None


def find_new_rasters(watch_dir: str | Path, seen: Container[str]) -> list[NewRaster]:
    """GeoTIFFs in ``watch_dir`` whose sha256 is not in ``seen`` (a copy counts once).

    Args:
        watch_dir: the watched folder.
        seen: sha256 of the rasters already used.

    Raises:
        InputError: the folder does not exist, or two new rasters share a file stem.
    """
    watch_dir = Path(watch_dir)
    if not watch_dir.is_dir():
        raise InputError(watch_dir, "watched folder not found")
    out: dict[str, NewRaster] = {}
    for p in sorted(watch_dir.iterdir()):
        if p.suffix.lower() not in RASTER_SUFFIXES or p.name.startswith(".") or not p.is_file():
            continue
        sha = file_sha256(p)
        if sha in seen or sha in out:
            continue
        lab = p.with_suffix(".geojson")
        out[sha] = NewRaster(p, sha, lab if lab.is_file() else None)
    stems = [r.path.stem for r in out.values()]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(watch_dir, f"two new rasters share the file stem {dup[0]!r} (tile ids would collide)")
    return list(out.values())
