"""Vehicle boxes written as vector features while a raster is searched, then as the file asked for.

:class:`FeatureStream` appends GeoJSON features, one a line (GeoJSON Lines), to a stream file as soon
as they are final, and reports how many bytes are safely written (a resumed run cuts the stream back
to that length). :func:`finish_output` turns the stream into the output, reading it line by line:

* ``.geojsonl`` / ``.jsonl``: the stream itself (GeoJSON Lines; coordinates in the raster's CRS
  unless written in WGS84, which GeoJSON Lines readers assume);
* ``.geojson``: one FeatureCollection, with the legacy ``crs`` member when not in WGS84;
* ``.gpkg`` (GeoPackage) and ``.fgb`` (FlatGeobuf): through pyogrio, with the CRS, in chunks.

Features are box polygons with ``class_id``, ``class_name`` (``vehicle`` for class 0) and ``confidence``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from aerosynth.data.atomic import atomic_output_path
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.geo import WGS84, as_crs, crs_member, detections_to_geojson

#: Output suffixes and their GDAL drivers (``None``: written here without GDAL).
FORMATS: dict[str, str | None] = {
    ".geojson": None,
    ".geojsonl": None,
    ".jsonl": None,
    ".gpkg": "GPKG",
    ".fgb": "FlatGeobuf",
}
#: Features per pyogrio write when converting the stream.
CHUNK = 50_000


def check_output_format(path: str | Path) -> str:
    """The suffix of a supported output file.

    Raises:
        InputError: another suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(path, f"unknown output format {suffix or '(none)'!r} (use {', '.join(FORMATS)})")
    return suffix


class FeatureStream:
    """GeoJSON Lines appended to a file, in the raster's CRS or WGS84.

    Args:
        path: the stream file.
        transform: raster pixel -> map affine.
        crs: the raster's CRS.
        to_wgs84: write longitude/latitude.
        resume_at: bytes of an earlier stream to keep (0: start a new one).
    """

    def __init__(self, path: str | Path, transform: Affine, crs: Any, to_wgs84: bool = False, resume_at: int = 0):
        self.path = Path(path)
        self.transform, self.crs, self.to_wgs84 = transform, crs, to_wgs84
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at and self.path.is_file() and self.path.stat().st_size >= resume_at:
            self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
            self._file.truncate(resume_at)
            self._file.seek(resume_at)
        else:
            self._file = open(self.path, "wb")  # noqa: SIM115

    def write(self, dets: Detections) -> None:
        """Append boxes (raster pixels) as features."""
        if len(dets) == 0:
            return
        doc = detections_to_geojson(dets, self.transform, self.crs, to_wgs84=self.to_wgs84)
        lines = []
        for feature in doc["features"]:
            props = feature["properties"]
            if props["class_id"] == 0:
                props["class_name"] = "vehicle"
            lines.append(json.dumps(feature, separators=(",", ":")))
        self._file.write(("\n".join(lines) + "\n").encode())

    def checkpoint(self) -> int:
        """Flush to disk; the bytes written so far."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> FeatureStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_stream(path: str | Path) -> Iterator[dict]:
    """The features of a GeoJSON Lines file, one at a time."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _write_ogr(stream: Path, tmp: Path, driver: str, crs: Any) -> None:
    import pyogrio.raw
    import shapely

    fields = ["class_id", "class_name", "confidence"]
    chunk: list[dict] = []

    def flush(first: bool) -> None:
        geometry = shapely.to_wkb(
            np.array([shapely.geometry.shape(f["geometry"]) for f in chunk], dtype=object).reshape(-1)
        )
        props = [f["properties"] for f in chunk]
        data = [
            np.array([p.get("class_id", 0) for p in props], np.int64),
            np.array([p.get("class_name", "") for p in props], object),
            np.array([p.get("confidence", np.nan) for p in props], np.float64),
        ]
        pyogrio.raw.write(
            tmp,
            geometry,
            data,
            fields,
            crs=crs.to_wkt(),
            geometry_type="Polygon",
            driver=driver,
            append=not first,
            **({"layer": "vehicles"} if driver == "GPKG" else {}),
        )

    first = True
    for feature in read_stream(stream):
        chunk.append(feature)
        if len(chunk) >= CHUNK and driver != "FlatGeobuf":  # FlatGeobuf is written once (its index)
            flush(first)
            chunk, first = [], False
    if chunk or first:
        flush(first)


def finish_output(stream: str | Path, out: str | Path, crs: Any, to_wgs84: bool = False) -> Path:
    """Turn a finished stream into the output file (atomically) and remove the stream."""
    stream, out = Path(stream), Path(out)
    suffix = check_output_format(out)
    if suffix in (".geojsonl", ".jsonl"):
        os.replace(stream, out)
        return out
    with atomic_output_path(out, suffix) as tmp:
        if suffix == ".geojson":
            with open(tmp, "w", encoding="utf-8") as f:
                head: dict[str, Any] = {"type": "FeatureCollection"}
                if not to_wgs84:
                    head["crs"] = crs_member(crs)
                f.write(json.dumps(head)[:-1] + ', "features": [\n')
                for i, feature in enumerate(read_stream(stream)):
                    f.write(("" if i == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
                f.write("\n]}\n")
        else:
            _write_ogr(stream, tmp, FORMATS[suffix], WGS84 if to_wgs84 else as_crs(crs))
    stream.unlink(missing_ok=True)
    return out
