"""Weak flags given with a target: one "vehicle" / "empty" flag per tile, without any box.

AGenDA's only target supervision is whether a tile holds a vehicle. A target folder (the folder with
``images/``, the GeoTIFFs, or the COCO json) gives these flags in any of three files:

* ``flags.json``: tile id, image file name or image stem -> ``true`` (vehicle) / ``false`` (empty);
* ``flags.csv``: the same as two columns ``id,flag``, the flag written ``1``/``0``, ``true``/``false``
  or ``vehicle``/``empty`` (a header row is optional);
* ``flags.geojson``: points or polygons, in any CRS, marking vehicles or areas with vehicles. A tile of a
  georeferenced raster that holds one has a vehicle; every other tile of the rasters is empty.

Tile ids are ``<image stem>_<x0>_<y0>``, as :mod:`aerosynth.data.prepare` names tiles: ``x0`` and ``y0`` are
the offsets of the tile's top-left corner in pixels of the image resampled to the tiles' GSD. An image
entry flags every tile of that image. ``aerosynth flag`` (:mod:`aerosynth.flows.flag_page`) writes
``flags.json`` tile by tile.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from affine import Affine

from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.errors import InputError
from aerosynth.data.geo import geojson_crs, geometry_shapes, map_to_pixel, read_geojson, transformer

FLAGS_FILE = "flags.json"
FLAGS_CSV = "flags.csv"
FLAGS_GEOJSON = "flags.geojson"
#: The flag files a target folder may hold, in the order they are read.
FLAG_FILES = (FLAGS_FILE, FLAGS_CSV, FLAGS_GEOJSON)
#: What a tile no flag covers becomes in a target without boxes: refused, empty, left out, or flagged later by
#: the source-only detector (``derived``: ``aerosynth adapt`` only, which trains that detector first).
UnflaggedRule = Literal["error", "empty", "skip", "derived"]
UNFLAGGED_RULES: tuple[str, ...] = ("error", "empty", "skip", "derived")
#: A weak split's tiles no flag covered under the ``derived`` rule (their flag in ``tiles.json`` is a placeholder).
UNFLAGGED_FILE = "unflagged.json"

_CSV_VALUES = {"1": True, "true": True, "vehicle": True, "0": False, "false": False, "empty": False}
_TILE_ID = re.compile(r"^(.+)_(\d+)_(\d+)$")


def tile_id(image_id: str, x0: int, y0: int) -> str:
    """The id of the tile at ``(x0, y0)`` (resampled pixels) of image ``image_id``."""
    return f"{image_id}_{x0}_{y0}"


def parse_tile_id(key: str) -> tuple[str, int, int] | None:
    """``(image stem, x0, y0)`` of a tile id, or ``None`` when ``key`` is not shaped like one."""
    m = _TILE_ID.match(key)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def check_unflagged_rule(rule: str, where: str = "--unflagged") -> str:
    """``rule`` when it is one of :data:`UNFLAGGED_RULES`.

    Raises:
        InputError: another value.
    """
    if rule not in UNFLAGGED_RULES:
        raise InputError(where, f"unknown rule {rule!r} for unflagged tiles ({', '.join(UNFLAGGED_RULES)})")
    return rule


def read_unflagged(split_dir: str | Path) -> set[str]:
    """The tile ids of a prepared split that no flag covered (``derived`` rule); empty when there are none."""
    path = Path(split_dir) / UNFLAGGED_FILE
    return set(json.loads(path.read_text())["tiles"]) if path.is_file() else set()


def sample_tiles(tile_ids: Sequence[str], share: float, seed: int = 0, where: str = "flag_budget") -> list[str]:
    """The tiles an analyst flags when flagging a share of them: a seeded draw of ``round(share * n)`` tiles
    (at least one), in the order given. The draw depends on the ids and the seed, not on their order.

    Raises:
        InputError: ``share`` outside (0, 1] (naming ``where``, the setting that gave it).
    """
    if not 0 < share <= 1:
        raise InputError(where, f"a share in (0, 1], got {share}")
    ids = sorted(tile_ids)
    chosen = set(np.random.default_rng(seed).permutation(ids)[: max(1, round(share * len(ids)))].tolist())
    return [t for t in tile_ids if t in chosen]


def read_flags_file(path: str | Path) -> dict[str, bool]:
    """``flags.json``: tile id or image name -> has a vehicle (``{}`` when the file is absent).

    Raises:
        InputError: unreadable, not JSON, not a mapping, or a value that is not true/false.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(path, "must map tile ids or image names to true/false")
    for k, v in doc.items():
        if not isinstance(v, bool):
            raise InputError(f"{path}: {k}", f"flag must be true or false, got {v!r}")
    return doc


def read_flags_csv(path: str | Path) -> dict[str, bool]:
    """``flags.csv``: rows ``id,flag`` (flag 1/0, true/false or vehicle/empty; an ``id,flag`` header is skipped).

    Raises:
        InputError: unreadable, a row without two columns, an unknown flag, or an id given twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"unreadable flags file ({exc.__class__.__name__})") from None
    out: dict[str, bool] = {}
    for n, row in enumerate(csv.reader(text.splitlines()), 1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) != 2 or not cells[0]:
            raise InputError(f"{path}:{n}", "expected two columns: id,flag")
        key, value = cells[0], cells[1].lower()
        if n == 1 and value not in _CSV_VALUES and cells[0].lower() in ("id", "tile", "tile_id", "image"):
            continue  # header row
        if value not in _CSV_VALUES:
            raise InputError(f"{path}:{n}", f"flag must be 1/0, true/false or vehicle/empty, got {cells[1]!r}")
        if key in out and out[key] != _CSV_VALUES[value]:
            raise InputError(f"{path}:{n}", f"{key!r} is flagged twice, differently")
        out[key] = _CSV_VALUES[value]
    return out


def write_flags_file(path: str | Path, flags: Mapping[str, bool]) -> Path:
    """Write ``flags.json`` atomically (keys sorted, so the same flags give the same bytes)."""
    return atomic_write_json(path, {str(k): bool(v) for k, v in flags.items()})


def _shapes(doc: dict, where: Path) -> list[tuple[str, np.ndarray]]:
    """``("point" | "polygon", coordinates)`` of every feature (polygons by their outer ring)."""
    shapes: list[tuple[str, np.ndarray]] = []
    for i, feat in enumerate(doc["features"]):
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        kinds = ("Point", "MultiPoint", "Polygon", "MultiPolygon")
        for kind, pts in geometry_shapes(geom, f"{where}: feature {i}", kinds):
            shapes.append(("point" if kind.endswith("Point") else "polygon", pts))
    return shapes


@dataclass
class TargetFlags:
    """The weak flags given with a target folder.

    Attributes:
        entries: tile id, image file name or image stem -> has a vehicle (``flags.json`` and ``flags.csv``).
        sources: the file each entry comes from (its name), for counts and messages.
        geojson: ``flags.geojson``, or ``None``.
        geojson_path: where it was read.
    """

    entries: dict[str, bool] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    geojson: dict | None = None
    geojson_path: Path | None = None

    def __post_init__(self) -> None:
        self._tiles_of: dict[str, set[tuple[int, int]]] = {}
        for key in self.entries:
            parsed = parse_tile_id(key)
            if parsed is not None:
                self._tiles_of.setdefault(parsed[0], set()).add((parsed[1], parsed[2]))
        self._shapes = _shapes(self.geojson, self.geojson_path or Path(FLAGS_GEOJSON)) if self.geojson else []

    @property
    def files(self) -> list[str]:
        """The flag files read (names)."""
        names = sorted(set(self.sources.values()), key=FLAG_FILES.index)
        return names + ([FLAGS_GEOJSON] if self.geojson is not None else [])

    def image_entry(self, name: str, stem: str) -> tuple[bool, str] | None:
        """The flag given for a whole image (by file name, else stem) and its file, or ``None``."""
        for key in (name, stem):
            if key in self.entries:
                return self.entries[key], self.sources[key]
        return None

    def tile_entries(self, stem: str) -> set[tuple[int, int]]:
        """Offsets ``(x0, y0)`` of the tiles of image ``stem`` that have an entry of their own."""
        return self._tiles_of.get(stem, set())

    def covers(self, name: str, stem: str, raster: bool) -> bool:
        """Whether some flag reaches image ``name``: an image entry, a tile entry, or the GeoJSON for a raster."""
        return (
            self.image_entry(name, stem) is not None or bool(self.tile_entries(stem)) or (raster and bool(self.geojson))
        )

    def unknown_entries(self, names: Collection[str], stems: Collection[str]) -> list[str]:
        """Entries that name no image of ``names``/``stems``, directly or as one of its tile ids."""
        out = []
        for key in self.entries:
            if key in names or key in stems:
                continue
            parsed = parse_tile_id(key)
            if parsed is None or parsed[0] not in stems:
                out.append(key)
        return sorted(out)

    def _pixel_shapes(
        self, transform: Affine | None, crs: Any, where: str | Path
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The points (``(N, 2)`` pixels) and polygons (outer rings, 1/16 pixels) of ``flags.geojson`` in an
        image georeferenced by ``transform`` and ``crs``."""
        if transform is None or crs is None:
            raise InputError(where, f"{FLAGS_GEOJSON} flags georeferenced rasters only: this image has no CRS")
        to_image = transformer(geojson_crs(self.geojson, str(self.geojson_path)), crs)
        points, polygons = [np.zeros((0, 2))], []
        for kind, pts in self._shapes:
            mx, my = to_image.transform(pts[:, 0], pts[:, 1])
            px, py = map_to_pixel(transform, np.asarray(mx, np.float64), np.asarray(my, np.float64))
            if not (np.all(np.isfinite(px)) and np.all(np.isfinite(py))):
                raise InputError(f"{self.geojson_path}", f"a shape could not be reprojected to the CRS of {where}")
            if kind == "point":
                points.append(np.stack([px, py], axis=1))
            else:  # sub-pixel vertices (4 fractional bits); a polygon smaller than a pixel still marks one
                xy = np.stack([px, py], axis=1).clip(-1e6, 1e6)
                polygons.append(np.round(xy * 16).astype(np.int32))
        return np.concatenate(points), polygons

    def vehicle_mask(
        self, transform: Affine | None, crs: Any, width: int, height: int, where: str | Path
    ) -> np.ndarray | None:
        """Pixels of an image (``width`` x ``height``, georeferenced by ``transform`` and ``crs``) that hold a
        point or polygon of ``flags.geojson``; ``None`` without a GeoJSON.

        Raises:
            InputError: the image has no georeference, or a shape cannot be reprojected to its CRS.
        """
        if self.geojson is None:
            return None
        points, polygons = self._pixel_shapes(transform, crs, where)
        mask = np.zeros((height, width), np.uint8)
        col, row = np.floor(points[:, 0]).astype(np.int64), np.floor(points[:, 1]).astype(np.int64)
        inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        mask[row[inside], col[inside]] = 1
        for polygon in polygons:
            cv2.fillPoly(mask, [polygon], 1, lineType=cv2.LINE_8, shift=4)
        return mask.astype(bool)

    def marked_tiles(
        self,
        transform: Affine | None,
        crs: Any,
        width: int,
        height: int,
        where: str | Path,
        tiles: tuple[Sequence[int], Sequence[int], int],
    ) -> set[tuple[int, int]] | None:
        """The tiles of an image in which its :meth:`vehicle_mask` holds a pixel, without that whole mask.

        Each polygon is drawn on its own bounding box (cut at the image's edges, so that OpenCV draws it
        pixel for pixel as on the whole image), one at a time: the memory is that of the largest polygon.

        Args:
            transform: pixel -> map transform of the image.
            crs: its CRS.
            width: image width.
            height: image height.
            where: the image, named in messages.
            tiles: ``(x offsets, y offsets, tile side)`` of the tile grid, offsets ascending.

        Returns:
            ``(x0, y0)`` of the tiles marked, or ``None`` without a GeoJSON.

        Raises:
            InputError: the image has no georeference, or a shape cannot be reprojected to its CRS.
        """
        if self.geojson is None:
            return None
        points, polygons = self._pixel_shapes(transform, crs, where)
        xs, ys, size = np.asarray(tiles[0], np.int64), np.asarray(tiles[1], np.int64), tiles[2]

        def covering(offsets: np.ndarray, lo: int, hi: int) -> range:  # tiles meeting pixels lo .. hi - 1
            return range(int(np.searchsorted(offsets + size, lo, "right")), int(np.searchsorted(offsets, hi, "left")))

        marked: set[tuple[int, int]] = set()
        for c, r in np.floor(points).astype(np.int64):
            if 0 <= c < width and 0 <= r < height:
                marked |= {(int(xs[i]), int(ys[j])) for j in covering(ys, r, r + 1) for i in covering(xs, c, c + 1)}
        for polygon in polygons:
            lo, hi = polygon.min(axis=0) // 16 - 2, polygon.max(axis=0) // 16 + 3
            x0, y0, x1, y1 = max(int(lo[0]), 0), max(int(lo[1]), 0), min(int(hi[0]), width), min(int(hi[1]), height)
            if x1 <= x0 or y1 <= y0:
                continue
            box = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillPoly(box, [polygon - np.array([16 * x0, 16 * y0], np.int32)], 1, lineType=cv2.LINE_8, shift=4)
            for j in covering(ys, y0, y1):
                for i in covering(xs, x0, x1):
                    tx, ty = int(xs[i]), int(ys[j])
                    part = box[max(ty - y0, 0) : ty + size - y0, max(tx - x0, 0) : tx + size - x0]
                    if (tx, ty) not in marked and part.any():
                        marked.add((tx, ty))
        return marked

    def tile_flag(
        self, tid: str, name: str, stem: str, marked: Collection[tuple[int, int]] | None, x0: int, y0: int
    ) -> tuple[bool, str] | None:
        """The flag of one tile and its file: a tile entry, else an image entry, else the GeoJSON.

        Args:
            tid: the tile id.
            name: file name of its image.
            stem: stem of its image.
            marked: :meth:`marked_tiles` of the resampled image, or ``None``.
            x0: left edge of the tile in resampled pixels.
            y0: top edge.
        """
        if tid in self.entries:
            return self.entries[tid], self.sources[tid]
        whole = self.image_entry(name, stem)
        if whole is not None:
            return whole
        if marked is not None:
            return (x0, y0) in marked, FLAGS_GEOJSON
        return None


def read_target_flags(folder: str | Path) -> TargetFlags | None:
    """The flag files of a target folder (:data:`FLAG_FILES`), or ``None`` when it has none.

    Raises:
        InputError: an unreadable or malformed file, or an id that ``flags.json`` and ``flags.csv`` flag
            differently.
    """
    folder = Path(folder)
    entries: dict[str, bool] = {}
    sources: dict[str, str] = {}
    found = False
    for name, reader in ((FLAGS_FILE, read_flags_file), (FLAGS_CSV, read_flags_csv)):
        path = folder / name
        if not path.is_file():
            continue
        found = True
        for key, value in reader(path).items():
            if key in entries and entries[key] != value:
                raise InputError(
                    path, f"{key!r} is {str(value).lower()} here but {str(entries[key]).lower()} in {sources[key]}"
                )
            entries[key], sources[key] = value, sources.get(key, name)
    geo_path = folder / FLAGS_GEOJSON
    geojson = read_geojson(geo_path) if geo_path.is_file() else None
    if not found and geojson is None:
        return None
    return TargetFlags(entries, sources, geojson, geo_path if geojson is not None else None)
