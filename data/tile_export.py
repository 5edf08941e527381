"""The tiles and dataset files of a tile export (layout: :mod:`aerosynth.data.export_folder`).

:class:`TileExport` writes each tile as ``tiles/<id>.tif`` (RGB GeoTIFF) with its boxes as
``labels/<id>.geojson``, then the dataset files of all tiles: ``labels.geojson`` (property ``tile``
names the tile), ``coco.json`` (``file_name`` ``tiles/<id>.tif``) and the YOLO dataset ``yolo/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from affine import Affine

from aerosynth.data.atomic import atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.exporters import LabelledImage, write_coco, write_yolo_split
from aerosynth.data.geo import crs_member, detections_to_geojson, write_geojson
from aerosynth.data.rasters import write_geotiff


# ------------------------------------------------------------------- tiles and datasets
@dataclass
class GeoTile:
    """One exported tile.

    Attributes:
        tile_id: file stem of the tile in the export.
        seed: the seed it was generated from (``None``: a real tile).
        transform: pixel -> map affine transform.
        width: width in pixels.
        height: height in pixels.
        detections: its boxes (pixels).
        properties: extra properties of its STAC image Item.
    """

    tile_id: str
    seed: int | None
    transform: Affine
    width: int
    height: int
    detections: Detections
    properties: dict[str, Any] = field(default_factory=dict)


class TileExport:
    """The tiles of an export being built: written one at a time (:meth:`add`), then the dataset files (:meth:`finish`).

    Args:
        root: the export folder being built.
        crs: the CRS of every tile.
        class_names: class names of the boxes (index = class id).
    """

    def __init__(self, root: Path, crs: Any, class_names: Sequence[str]) -> None:
        self.root, self.crs, self.class_names = root, crs, list(class_names)
        self.tiles: list[GeoTile] = []
        self._features: list[dict] = []
        self._tif: list[LabelledImage] = []
        self._png: list[LabelledImage] = []

    def add(
        self,
        tile_id: str,
        seed: int | None,
        rgb: np.ndarray,
        detections: Detections,
        transform: Affine,
        png: Path,
        properties: dict[str, Any] | None = None,
    ) -> GeoTile:
        """Write ``tiles/<id>.tif`` and ``labels/<id>.geojson`` of one tile.

        Args:
            tile_id: the tile's file stem.
            seed: the seed it was generated from (``None``: a real tile).
            rgb: ``(H, W, 3)`` uint8 pixels.
            detections: its boxes in pixels (checked against the tile size).
            transform: its georeference.
            png: the same pixels as a PNG file (copied into ``yolo/images/``).
            properties: extra properties of its STAC image Item.

        Returns:
            The tile as recorded for :meth:`finish` and the STAC catalog.
        """
        h, w = rgb.shape[:2]
        detections.validate(tile_id, w, h)
        tif = write_geotiff(self.root / "tiles" / f"{tile_id}.tif", rgb, transform, self.crs)
        props = [
            {"tile": tile_id, "pixel_xyxy": [float(v) for v in detections.xyxy[k]]} for k in range(len(detections))
        ]
        geo = detections_to_geojson(detections, transform, self.crs, properties=props, class_names=self.class_names)
        write_geojson(self.root / "labels" / f"{tile_id}.geojson", geo)
        self._features.extend(geo["features"])
        self._tif.append(LabelledImage(tile_id, tif, detections))
        self._png.append(LabelledImage(tile_id, png, detections))
        tile = GeoTile(tile_id, seed, transform, w, h, detections, dict(properties or {}))
        self.tiles.append(tile)
        return tile

    def finish(self) -> list[GeoTile]:
        """Write ``labels.geojson``, ``coco.json`` and ``yolo/`` of the tiles added; returns them."""
        merged = {"type": "FeatureCollection", "crs": crs_member(self.crs), "features": self._features}
        write_geojson(self.root / "labels.geojson", merged)
        write_coco(self.root / "coco.json", self._tif, self.class_names, image_prefix="tiles/")
        write_yolo_split(self.root / "yolo", self._png, link=False)
        data_yaml = {"train": "images", "val": "images", "names": dict(enumerate(self.class_names))}
        atomic_write_text(self.root / "yolo" / "data.yaml", yaml.safe_dump(data_yaml, sort_keys=False))
        return self.tiles
