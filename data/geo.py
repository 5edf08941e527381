"""Pixel <-> map coordinates, reprojection, and GeoJSON labels in and out.

Conventions (the classic bugs are half-pixel offsets and axis order):

* Pixel coordinates are continuous, ``(x, y)`` = (column, row), with the *corner* of the
  top-left pixel at ``(0, 0)`` and its centre at ``(0.5, 0.5)``; a rasterio/GDAL affine
  transform maps exactly these coordinates to map coordinates.
* Map coordinates are always ``(x, y)`` = (easting, northing) or (longitude, latitude):
  every pyproj transformer here is built with ``always_xy=True``, whatever the CRS's
  official axis order.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from pyproj import CRS, Transformer

from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError

WGS84 = CRS.from_epsg(4326)


def as_crs(crs: Any) -> CRS:
    """A pyproj CRS from a rasterio CRS, an ``EPSG:n`` string, WKT or a pyproj CRS."""
    if isinstance(crs, CRS):
        return crs
    if hasattr(crs, "to_wkt"):
        return CRS.from_wkt(crs.to_wkt())
    return CRS.from_user_input(crs)


def crs_to_string(crs: Any) -> str:
    """``EPSG:n`` when the CRS has an EPSG code, else WKT."""
    c = as_crs(crs)
    epsg = c.to_epsg()
    return f"EPSG:{epsg}" if epsg else c.to_wkt()


def pixel_to_map(transform: Affine, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuous pixel coordinates to map coordinates."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    a, b, c, d, e, f = transform[:6]
    return a * x + b * y + c, d * x + e * y + f


def map_to_pixel(transform: Affine, mx: np.ndarray, my: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates to continuous pixel coordinates (inverse of :func:`pixel_to_map`)."""
    return pixel_to_map(~transform, mx, my)


def transformer(src: Any, dst: Any) -> Transformer:
    """A pyproj transformer with (x, y) axis order on both sides (cached per CRS pair)."""
    return _transformer(as_crs(src).to_wkt(), as_crs(dst).to_wkt())


@functools.lru_cache(maxsize=64)
def _transformer(src_wkt: str, dst_wkt: str) -> Transformer:
    return Transformer.from_crs(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), always_xy=True)


def pixel_size_m(transform: Affine, crs: Any | None) -> float | None:
    """Ground sample distance in metres per pixel, from a transform and its CRS.

    Projected CRS: pixel width times the unit's metre factor. Geographic CRS: the pixel
    width in degrees converted at the raster origin's latitude. ``None`` without a CRS.
    """
    if crs is None:
        return None
    c = as_crs(crs)
    size = float(np.hypot(transform.a, transform.d))
    if c.is_geographic:
        lat = float(transform.f)
        return size * 111_320.0 * max(np.cos(np.radians(lat)), 1e-6)
    factor = 1.0
    try:
        factor = float(c.axis_info[0].unit_conversion_factor)
    except (IndexError, AttributeError):  # pragma: no cover
        pass
    return size * factor


# ---------------------------------------------------------------------------- output
def detections_to_geojson(
    detections: Detections,
    transform: Affine,
    crs: Any,
    to_wgs84: bool = False,
    properties: list[dict] | None = None,
    class_names: list[str] | None = None,
) -> dict:
    """A GeoJSON FeatureCollection of box polygons in the raster's CRS (or WGS84 on request).

    A non-WGS84 collection carries the legacy ``crs`` member (GDAL, QGIS and geopandas read it).
    """
    if crs is None and not to_wgs84:
        raise InputError("crs", "the raster has no CRS: geo output needs one")
    out_crs = WGS84 if to_wgs84 else as_crs(crs)
    to_out = transformer(crs, out_crs) if to_wgs84 else None
    features = []
    for i in range(len(detections)):
        x1, y1, x2, y2 = detections.xyxy[i]
        px = np.array([x1, x2, x2, x1, x1])
        py = np.array([y1, y1, y2, y2, y1])
        mx, my = pixel_to_map(transform, px, py)
        if to_out is not None:
            mx, my = to_out.transform(mx, my)
        ring = [[float(a), float(b)] for a, b in zip(mx, my, strict=True)]
        # exterior rings counter-clockwise (RFC 7946); north-up rasters give a clockwise ring
        if _signed_area(ring) < 0:
            ring = ring[::-1]
        props: dict[str, Any] = {"class_id": int(detections.class_id[i])}
        if class_names:
            props["class_name"] = class_names[int(detections.class_id[i])]
        if detections.confidence is not None:
            props["confidence"] = float(detections.confidence[i])
        if properties:
            props.update(properties[i])
        features.append(
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}
        )
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if not to_wgs84:
        doc["crs"] = crs_member(out_crs)
    return doc


def crs_member(crs: Any) -> dict:
    """The legacy GeoJSON ``crs`` member naming ``crs`` (an EPSG URN, else its WKT)."""
    crs = as_crs(crs)
    epsg = crs.to_epsg()
    return {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()}}


def _signed_area(ring: list[list[float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:], strict=True))


def write_geojson(path: str | Path, doc: dict) -> Path:
    """Write a GeoJSON document atomically."""
    return atomic_write_json(path, doc)


# ----------------------------------------------------------------------------- input
def geojson_crs(doc: dict, where: str) -> CRS:
    """The CRS of a GeoJSON document: its legacy ``crs`` member, else WGS84 (RFC 7946)."""
    member = doc.get("crs")
    if not member:
        return WGS84
    try:
        return _crs_from_name(member["properties"]["name"])
    except Exception:
        raise InputError(where, f"unknown CRS {str(member)[:60]!r}") from None


@functools.lru_cache(maxsize=64)
def _crs_from_name(name: str) -> CRS:
    if not isinstance(name, str):
        raise TypeError(name)
    return CRS.from_user_input(name)


def read_geojson(path: str | Path) -> dict:
    """Load a GeoJSON FeatureCollection, with a one-line error when it is not one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection" or not isinstance(doc.get("features"), list):
        raise InputError(path, "not a GeoJSON FeatureCollection")
    return doc


def _position(c: Any) -> list[float]:
    if (
        not isinstance(c, list)
        or len(c) < 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in c[:2])
    ):
        raise ValueError("not a position")
    return [float(c[0]), float(c[1])]


def geometry_shapes(geom: Any, where: str, kinds: tuple[str, ...] = ("Point", "Polygon", "MultiPolygon")) -> list:
    """``[(GeoJSON type, (N, 2) coordinates)]`` of one geometry: a point set, or one outer ring per polygon.

    ``Point`` and ``MultiPoint`` give one point set, ``Polygon`` its outer ring and ``MultiPolygon`` one outer
    ring per polygon; ``kinds`` are the types accepted.

    Raises:
        InputError: no geometry, a type not in ``kinds``, malformed or non-finite coordinates.
    """
    if not isinstance(geom, dict) or "type" not in geom or "coordinates" not in geom:
        raise InputError(where, "feature without a geometry")
    kind = geom["type"]
    coords = geom["coordinates"]
    if kind not in kinds:
        raise InputError(where, f"geometry type {kind} is not a Point or Polygon")
    try:
        if kind == "Point":
            rings = [[_position(coords)]]
        elif kind == "MultiPoint":
            rings = [[_position(c) for c in coords]]
        elif kind == "Polygon":
            rings = [[_position(c) for c in coords[0]]]
        else:
            rings = [[_position(c) for c in poly[0]] for poly in coords]
    except (TypeError, ValueError, IndexError, KeyError):
        raise InputError(where, f"malformed {kind} coordinates") from None
    shapes = []
    for ring in rings or [[]]:
        arr = np.array(ring, dtype=np.float64).reshape(-1, 2)
        if arr.size == 0 or not np.all(np.isfinite(arr)):
            raise InputError(where, f"{kind} with missing or non-finite coordinates")
        shapes.append((kind, arr))
    return shapes


def _geometry_points(geom: Any, where: str) -> tuple[str, np.ndarray]:
    """Every vertex of a Point, Polygon or MultiPolygon (outer rings), for its bounding box."""
    shapes = geometry_shapes(geom, where)
    return shapes[0][0], np.concatenate([pts for _, pts in shapes])


def geojson_to_detections(
    doc: dict,
    where: str,
    transform: Affine,
    raster_crs: Any,
    width: int,
    height: int,
    gsd: float,
    point_box_m: float = 5.3,
    class_property: str = "class_id",
) -> Detections:
    """Boxes in raster pixels from GeoJSON boxes/polygons (their bounds) or points.

    Features are reprojected from the document's CRS to the raster's. A point (a vehicle
    centre, as in AGenDA) becomes a square box of ``point_box_m`` metres.

    Raises:
        InputError: malformed features, a raster without CRS, or labels that do not overlap
            the raster at all (wrong CRS).
    """
    if raster_crs is None:
        raise InputError(where, "GeoJSON labels need a raster with a CRS")
    src_crs = geojson_crs(doc, where)
    to_raster = transformer(src_crs, raster_crs)
    half = point_box_m / gsd / 2
    boxes, classes = [], []
    for i, feat in enumerate(doc["features"]):
        fwhere = f"{where}: feature {i}"
        kind, pts = _geometry_points(feat.get("geometry") if isinstance(feat, dict) else None, fwhere)
        mx, my = to_raster.transform(pts[:, 0], pts[:, 1])
        px, py = map_to_pixel(transform, np.asarray(mx), np.asarray(my))
        if not (np.all(np.isfinite(px)) and np.all(np.isfinite(py))):
            raise InputError(fwhere, "could not be reprojected to the raster's CRS")
        if kind == "Point":
            boxes.append([px[0] - half, py[0] - half, px[0] + half, py[0] + half])
        else:
            boxes.append([px.min(), py.min(), px.max(), py.max()])
        props = feat.get("properties") or {}
        try:
            if not isinstance(props, dict):
                raise TypeError("properties")
            value = props.get(class_property, 0)
            if (
                isinstance(value, bool)
                or (isinstance(value, float) and not float(value).is_integer())
                or int(value) < 0
            ):
                raise ValueError(value)
            classes.append(int(value))
        except (TypeError, ValueError, OverflowError):
            raise InputError(fwhere, f"property {class_property!r} is not a non-negative integer") from None
    dets = Detections(np.array(boxes, dtype=np.float64).reshape(-1, 4), None, np.array(classes, dtype=np.int64))
    if len(dets):
        inside = (dets.xyxy[:, 2] > 0) & (dets.xyxy[:, 0] < width) & (dets.xyxy[:, 3] > 0) & (dets.xyxy[:, 1] < height)
        if not inside.any():
            raise InputError(where, f"no label overlaps the raster (labels in {crs_to_string(src_crs)}: wrong CRS?)")
        dets = dets[inside].clip(width, height)
        dets = dets[(dets.xyxy[:, 2] > dets.xyxy[:, 0]) & (dets.xyxy[:, 3] > dets.xyxy[:, 1])]
    return dets
