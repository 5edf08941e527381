"""GeoTIFF (and any GDAL raster) reading and writing with rasterio.

Pixel values are brought to 8 bits by one documented rule:

* ``uint8`` bands are used as they are;
* any other type (``uint16``, ``int16``, ``float32`` ...) is stretched linearly per band
  from its 2nd to its 98th percentile over valid pixels onto 0..255, then clipped.

Nodata pixels (the dataset's nodata value or its mask) are set to 0 and reported in
``RasterImage.valid``. A raster with other than three bands needs a band selection.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from aerosynth.data.atomic import atomic_output_path
from aerosynth.data.errors import InputError
from aerosynth.data.geo import pixel_size_m
from aerosynth.data.imageio import MAX_IMAGE_PIXELS


@dataclass
class RasterImage:
    """An RGB raster in memory.

    Attributes:
        rgb: ``(H, W, 3)`` uint8.
        valid: ``(H, W)`` bool, False where the source had nodata.
        transform: pixel -> map affine, or ``None`` when not georeferenced.
        crs: the raster's CRS (rasterio), or ``None``.
        gsd: metres per pixel from the transform, or ``None``.
        path: where it was read from.
    """

    rgb: np.ndarray
    valid: np.ndarray
    transform: Affine | None
    crs: Any | None
    gsd: float | None
    path: Path | None = None

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def to_uint8(band: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Apply the documented 8-bit rule to one band."""
    if band.dtype == np.uint8:
        return band
    vals = band[valid]
    vals = vals[np.isfinite(vals)] if vals.dtype.kind == "f" else vals
    if vals.size == 0:
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(vals, [2, 98])
    if hi <= lo:
        hi = lo + 1
    out = (band.astype(np.float64) - lo) / (hi - lo) * 255.0
    out = np.nan_to_num(out, nan=0.0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def read_raster(path: str | Path, bands: list[int] | None = None) -> RasterImage:
    """Read a raster as 8-bit RGB.

    Args:
        path: GeoTIFF (or any raster GDAL reads).
        bands: 1-based band indices to use as R, G, B (three, or one for grey). Required
            when the raster does not have exactly three bands.

    Raises:
        InputError: unreadable or corrupt file, oversized raster, wrong band count or index.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                if ds.width * ds.height > MAX_IMAGE_PIXELS:
                    raise InputError(
                        path, f"raster of {ds.width}x{ds.height} pixels is over the {MAX_IMAGE_PIXELS} limit"
                    )
                if bands is None:
                    if ds.count != 3:
                        raise InputError(path, f"has {ds.count} band(s), not 3: choose bands (e.g. bands=[1, 2, 3])")
                    bands = [1, 2, 3]
                if len(bands) not in (1, 3):
                    raise InputError(path, f"band selection {bands} must name 1 or 3 bands")
                for b in bands:
                    if not 1 <= b <= ds.count:
                        raise InputError(path, f"band {b} does not exist (raster has {ds.count})")
                data = ds.read(bands)
                masks = ds.read_masks(bands)
                transform = ds.transform
                crs = ds.crs
                georeferenced = crs is not None or transform != Affine.identity()
    except InputError:
        raise
    except (RasterioIOError, rasterio.errors.RasterioError) as exc:
        raise InputError(path, f"unreadable or corrupt raster ({str(exc).splitlines()[0][:80]})") from None
    valid = np.all(masks > 0, axis=0)
    if data.dtype.kind == "f":
        valid &= np.all(np.isfinite(data), axis=0)
    if len(bands) == 1:
        data = np.repeat(data, 3, axis=0)
    rgb = np.stack([to_uint8(data[i], valid) for i in range(3)], axis=-1)
    rgb[~valid] = 0
    return RasterImage(
        rgb=np.ascontiguousarray(rgb),
        valid=valid,
        transform=transform if georeferenced else None,
        crs=crs,
        gsd=pixel_size_m(transform, crs) if crs is not None else None,
        path=path,
    )


def write_geotiff(path: str | Path, rgb: np.ndarray, transform: Affine | None, crs: Any | None) -> Path:
    """Write an ``(H, W, 3)`` uint8 RGB GeoTIFF atomically (deflate-compressed)."""
    path = Path(path)
    h, w = rgb.shape[:2]
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 3,
        "dtype": "uint8",
        "compress": "deflate",
        "photometric": "RGB",
    }
    if transform is not None:
        profile["transform"] = transform
    if crs is not None:
        profile["crs"] = crs
    with atomic_output_path(path, ".tif") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **profile) as ds:
                ds.write(np.moveaxis(rgb, -1, 0))
    return path
