"""GeoTIFF (and any GDAL raster) reading and writing with rasterio.

Pixel values are brought to 8 bits by one documented rule:

* ``uint8`` bands are used as they are;
* any other type (``uint16``, ``int16``, ``float32`` ...) is stretched linearly per band
  from its 2nd to its 98th percentile over valid pixels onto 0..255, then clipped.

Nodata pixels (the dataset's nodata value or its mask) are set to 0 and reported in
``RasterImage.valid``. A raster with other than three bands needs a band selection.

:func:`read_raster` reads a raster whole (up to ``MAX_IMAGE_PIXELS``). :class:`RasterSource` reads any
size by window: one GeoTIFF or COG, a ``.vrt``, or a mosaic of several files on one pixel grid (a folder
or a list of paths, joined by a VRT written here, with a mask that is 0 where no file covers the
mosaic). Windows may have fractional offsets and be resampled on reading (GDAL's ``average`` when
shrinking, ``bilinear`` when enlarging). For its 8-bit rule a non-``uint8`` source takes its percentiles
once, from the whole raster when it has at most ``STRETCH_SAMPLE_PIXELS`` pixels, else from a
decimated read of that many pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

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


def stretch_limits(band: np.ndarray, valid: np.ndarray) -> tuple[float, float] | None:
    """The 2nd and 98th percentile of a band's valid pixels (``None`` when it has none)."""
    vals = band[valid]
    vals = vals[np.isfinite(vals)] if vals.dtype.kind == "f" else vals
    if vals.size == 0:
        return None
    lo, hi = (float(v) for v in np.percentile(vals, [2, 98]))
    return lo, (lo + 1 if hi <= lo else hi)


def to_uint8(band: np.ndarray, valid: np.ndarray, limits: tuple[float, float] | None | str = "own") -> np.ndarray:
    """Apply the documented 8-bit rule to one band.

    Args:
        band: one band, any numeric type.
        valid: where the band has data.
        limits: the stretch ``(lo, hi)``; ``"own"`` takes them from this band (:func:`stretch_limits`),
            ``None`` means the band has no valid pixel.
    """
    if band.dtype == np.uint8:
        return band
    if isinstance(limits, str):
        limits = stretch_limits(band, valid)
    if limits is None:
        return np.zeros(band.shape, np.uint8)
    lo, hi = limits
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
    with open_raster(path) as ds:
        if ds.width * ds.height > MAX_IMAGE_PIXELS:
            raise InputError(path, f"raster of {ds.width}x{ds.height} pixels is over the {MAX_IMAGE_PIXELS} limit")
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


def raster_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of a raster from its header, without reading its pixels.

    Raises:
        InputError: missing, unreadable or corrupt file.
    """
    with open_raster(path) as ds:
        return ds.width, ds.height


@contextmanager
def open_raster(path: str | Path) -> Iterator[Any]:
    """``rasterio.open`` for reading, with a missing, unreadable or corrupt file as one ``InputError`` line
    (and no warning for a raster without georeference)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                yield ds
    except (RasterioIOError, rasterio.errors.RasterioError) as exc:
        raise InputError(path, f"unreadable or corrupt raster ({str(exc).splitlines()[0][:80]})") from None


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


# ----------------------------------------------------------------------------- windowed reading
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
#: Bound set on GDAL's block cache when a :class:`RasterSource` opens (GDAL's default, 5 % of the machine's
#: memory, lets a long windowed read grow by that much); enough for a row of blocks of a wide raster.
GDAL_CACHE_BYTES = 256 * 2**20
STRETCH_SAMPLE_PIXELS = 4096 * 4096


def raster_files(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """The raster files of an input: a file, a ``.vrt``, a folder (its rasters, sorted) or several of these.

    Raises:
        InputError: a path that does not exist, or a folder without rasters.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise InputError("raster", "no raster given")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in RASTER_SUFFIXES and p.is_file())
            if not found:
                raise InputError(item, f"folder holds no raster ({', '.join(RASTER_SUFFIXES)})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise InputError(item, "file not found")
    return files


def _source_xml(path: Path, band: str, src: tuple[int, int], dst: tuple[int, int]) -> str:
    w, h = src
    return (
        f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(path.resolve()))}</SourceFilename>'
        f"<SourceBand>{band}</SourceBand>"
        f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
        f'<DstRect xOff="{dst[0]}" yOff="{dst[1]}" xSize="{w}" ySize="{h}"/></SimpleSource>'
    )


def mosaic_vrt(files: Sequence[Path]) -> str:
    """VRT XML joining rasters on one pixel grid (same CRS, pixel size, band count and type, north-up).

    The VRT has a per-dataset mask from the files' masks: 0 where no file covers the mosaic.

    Raises:
        InputError: unreadable files, or files that are not on one grid.
    """
    metas = []
    for path in files:
        try:
            with rasterio.open(path) as ds:
                metas.append((path, ds.width, ds.height, ds.transform, ds.crs, ds.count, ds.dtypes[0]))
        except rasterio.errors.RasterioError as exc:
            raise InputError(path, f"unreadable or corrupt raster ({str(exc).splitlines()[0][:80]})") from None
    _, _, _, t0, crs0, count0, dtype0 = metas[0]
    if crs0 is None or t0.b != 0 or t0.d != 0 or t0.e >= 0:
        raise InputError(files[0], "a mosaic needs north-up rasters with a CRS")
    for path, _, _, t, crs, count, dtype in metas[1:]:
        if crs != crs0 or count != count0 or dtype != dtype0:
            raise InputError(path, f"differs from {files[0].name} in CRS, band count or data type: cannot mosaic")
        if t.b != 0 or t.d != 0 or abs(t.a - t0.a) > 1e-9 * abs(t0.a) or abs(t.e - t0.e) > 1e-9 * abs(t0.e):
            raise InputError(path, f"pixel size or rotation differs from {files[0].name}: cannot mosaic")
    px, py = t0.a, t0.e
    left = min(m[3].c for m in metas)
    top = max(m[3].f for m in metas)
    offsets = []
    for path, _w, _h, t, *_ in metas:
        ox, oy = (t.c - left) / px, (t.f - top) / py
        if abs(ox - round(ox)) > 0.01 or abs(oy - round(oy)) > 0.01:
            raise InputError(path, f"not on the pixel grid of {files[0].name} (offset {ox:.3f}, {oy:.3f} px)")
        offsets.append((int(round(ox)), int(round(oy))))
    width = max(o[0] + m[1] for o, m in zip(offsets, metas, strict=True))
    height = max(o[1] + m[2] for o, m in zip(offsets, metas, strict=True))
    type_name = rasterio.dtypes._gdal_typename(dtype0)
    parts = [
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
        f"<SRS>{escape(crs0.to_wkt())}</SRS>",
        f"<GeoTransform>{left!r}, {px!r}, 0, {top!r}, 0, {py!r}</GeoTransform>",
    ]
    for b in range(1, count0 + 1):
        parts.append(f'<VRTRasterBand dataType="{type_name}" band="{b}">')
        parts += [_source_xml(m[0], str(b), (m[1], m[2]), o) for o, m in zip(offsets, metas, strict=True)]
        parts.append("</VRTRasterBand>")
    parts.append('<MaskBand><VRTRasterBand dataType="Byte">')
    parts += [_source_xml(m[0], "mask,1", (m[1], m[2]), o) for o, m in zip(offsets, metas, strict=True)]
    parts.append("</VRTRasterBand></MaskBand></VRTDataset>")
    return "".join(parts)


class RasterSource:
    """A raster read window by window as 8-bit RGB (see the module docstring for the rules).

    Picklable (it reopens its files where it is unpickled), so blocks can be read in other processes.

    Args:
        inputs: a raster file, a ``.vrt``, a folder of rasters or several files on one grid.
        bands: 1-based band indices used as R, G, B (three, or one for grey); required unless the
            raster has three bands.

    Raises:
        InputError: missing or unreadable files, wrong band selection, files not on one grid.
    """

    def __init__(self, inputs: str | Path | Sequence[str | Path], bands: list[int] | None = None) -> None:
        self.files = raster_files(inputs)
        self.where: Path = self.files[0] if len(self.files) == 1 else self.files[0].parent
        self._vrt = mosaic_vrt(self.files) if len(self.files) > 1 else None
        self._ds = None
        ds = self._dataset()
        if bands is None:
            if ds.count != 3:
                raise InputError(self.where, f"has {ds.count} band(s), not 3: choose bands (e.g. bands=[1, 2, 3])")
            bands = [1, 2, 3]
        if len(bands) not in (1, 3):
            raise InputError(self.where, f"band selection {bands} must name 1 or 3 bands")
        for b in bands:
            if not 1 <= b <= ds.count:
                raise InputError(self.where, f"band {b} does not exist (raster has {ds.count})")
        self.bands = list(bands)
        # GDAL reports a band without nodata, mask or alpha as all valid: its mask need not be read
        self._masked = any(ds.mask_flag_enums[b - 1] != [MaskFlags.all_valid] for b in set(self.bands))
        self.width, self.height = ds.width, ds.height
        georeferenced = ds.crs is not None or ds.transform != Affine.identity()
        self.transform: Affine | None = ds.transform if georeferenced else None
        self.crs = ds.crs
        self.gsd = pixel_size_m(ds.transform, ds.crs) if ds.crs is not None else None
        self.dtype = np.dtype(ds.dtypes[0])
        self.limits: list[tuple[float, float] | None] | None = None if self.dtype == np.uint8 else self._limits()

    def _dataset(self):
        if self._ds is None:
            rasterio.env.set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_BYTES)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    self._ds = rasterio.open(self._vrt if self._vrt is not None else self.files[0])
            except (RasterioIOError, rasterio.errors.RasterioError) as exc:
                raise InputError(
                    self.where, f"unreadable or corrupt raster ({str(exc).splitlines()[0][:80]})"
                ) from None
        return self._ds

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ds": None}

    def close(self) -> None:
        """Close the open dataset (it is reopened on the next read)."""
        if self._ds is not None:
            self._ds.close()
            self._ds = None

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _limits(self) -> list[tuple[float, float] | None]:
        scale = min(1.0, (STRETCH_SAMPLE_PIXELS / (self.width * self.height)) ** 0.5)
        shape = (max(1, int(self.height * scale)), max(1, int(self.width * scale)))
        data, valid = self._read_raw(Window(0, 0, self.width, self.height), shape, Resampling.nearest)
        return [stretch_limits(band, valid) for band in data]

    def _read_raw(
        self, window: Window, shape: tuple[int, int], resampling: Resampling
    ) -> tuple[np.ndarray, np.ndarray]:
        ds = self._dataset()
        unique = sorted(set(self.bands))
        try:
            data = ds.read(unique, window=window, out_shape=(len(unique), *shape), resampling=resampling)
            if self._masked:
                masks = ds.read_masks(
                    unique, window=window, out_shape=(len(unique), *shape), resampling=Resampling.nearest
                )
        except (RasterioIOError, rasterio.errors.RasterioError) as exc:
            raise InputError(self.where, f"unreadable block ({str(exc).splitlines()[0][:80]})") from None
        valid = np.all(masks > 0, axis=0) if self._masked else np.ones(shape, bool)
        if data.dtype.kind == "f":
            valid &= np.all(np.isfinite(data), axis=0)
        return data[[unique.index(b) for b in self.bands]], valid

    def read(
        self, col_off: float, row_off: float, width: float, height: float, out_shape: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read a window inside the raster as ``(rgb, valid)``.

        Args:
            col_off: left edge in source pixels (may be fractional).
            row_off: top edge in source pixels.
            width: window width in source pixels.
            height: window height in source pixels.
            out_shape: ``(rows, cols)`` of the result; the window is resampled to it (default: its own size).

        Returns:
            ``(H, W, 3)`` uint8 RGB (0 at nodata) and ``(H, W)`` bool valid.
        """
        shape = out_shape or (int(round(height)), int(round(width)))
        same = abs(shape[0] - height) < 1e-9 and abs(shape[1] - width) < 1e-9
        resampling = Resampling.nearest if same else (Resampling.average if shape[1] < width else Resampling.bilinear)
        data, valid = self._read_raw(Window(col_off, row_off, width, height), shape, resampling)
        if len(self.bands) == 1:
            data = np.repeat(data, 3, axis=0)
        limits = self.limits if self.limits is not None else [None] * 3
        if len(self.bands) == 1 and self.limits is not None:
            limits = self.limits * 3
        rgb = np.stack([to_uint8(data[i], valid, limits[i]) for i in range(3)], axis=-1)
        rgb[~valid] = 0
        return np.ascontiguousarray(rgb), valid
