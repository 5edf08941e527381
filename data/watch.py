"""A watched folder of new imagery: GeoTIFFs not used before, and the flags given with them.

``flags.json`` (or ``flags.csv``, or both) in the watched folder maps tile ids (``<raster stem>_<x0>_<y0>``,
offsets in pixels at the tiles' GSD) or raster names to vehicle / empty; they are read by
:func:`aerosynth.data.flags.read_target_flags`, the reader of a target folder's flags. A ``flags.geojson``
is refused here rather than ignored: retrain takes its flags by tile or raster.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from aerosynth.data.domains import RASTER_SUFFIXES
from aerosynth.data.errors import InputError
from aerosynth.data.flags import FLAGS_FILE, FLAGS_GEOJSON, read_flags_file, read_target_flags
from aerosynth.data.manifest import file_sha256

__all__ = ["FLAGS_FILE", "NewRaster", "find_new_rasters", "read_flags_file", "read_watched_flags"]


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


def read_watched_flags(watch_dir: str | Path) -> dict[str, bool]:
    """The flags given in a watched folder: ``flags.json`` and ``flags.csv`` (``{}`` without either).

    Raises:
        InputError: a malformed file, an id the two files flag differently, or a ``flags.geojson`` (retrain
            does not read it: nothing is silently left out).
    """
    given = read_target_flags(watch_dir)
    if given is None:
        return {}
    if given.geojson is not None:
        raise InputError(
            Path(watch_dir) / FLAGS_GEOJSON, "retrain reads flags.json and flags.csv only: give these flags by tile"
        )
    return dict(given.entries)
