"""The STAC catalog of a tile export: one image Item and one label Item per tile, relative hrefs only.

Layout inside the export folder::

    catalog.json              STAC 1.1 catalog, self-contained, relative hrefs only
    stac/images/catalog.json  one Item per tile, asset ``image`` = the GeoTIFF
    stac/images/<id>.json
    stac/labels/catalog.json  one label Item per tile (label extension: vector, detection,
    stac/labels/<id>.json     class ``vehicle``), asset ``labels`` = its GeoJSON, ``source`` link
                              to the image Item

Geometries are the tile footprints in WGS84; synthetic tiles say ``aerosynth:synthetic: true``,
real tiles (``aerosynth request --real``) ``false``.
Label Items come from :mod:`aerosynth.data.stac_labels`; the export is checked offline by
:mod:`aerosynth.data.export_validation`.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import numpy as np
import pystac
from affine import Affine

from aerosynth.data.stac_labels import add_label_item
from aerosynth.data.tile_export import TileExport


def footprint_wgs84(transform: Affine, width: int, height: int, crs: Any) -> tuple[dict, list[float]]:
    """GeoJSON polygon (counter-clockwise) and bbox in WGS84 of a tile's footprint."""
    from aerosynth.data.geo import WGS84, pixel_to_map, transformer

    px = np.array([0, width, width, 0, 0], dtype=np.float64)
    py = np.array([height, height, 0, 0, height], dtype=np.float64)
    mx, my = pixel_to_map(transform, px, py)
    lon, lat = transformer(crs, WGS84).transform(mx, my)
    ring = [[float(a), float(b)] for a, b in zip(lon, lat, strict=True)]
    bbox = [float(np.min(lon)), float(np.min(lat)), float(np.max(lon)), float(np.max(lat))]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


def write_stac_catalog(
    export: TileExport,
    catalog_id: str,
    request_name: str,
    with_vehicles: bool | None,
    domain: str,
    gsd: float,
    created: dt.datetime,
    label_method: str,
    real: bool = False,
    georeference: str = "the georeference of their source rasters",
) -> None:
    """Write the self-contained STAC catalog of a tile export (layout in the module docstring).

    Args:
        export: the export's tiles (``tiles/<id>.tif`` and ``labels/<id>.geojson`` written), its folder,
            CRS and class names.
        catalog_id: id of the root catalog (the export folder's name).
        request_name: the request name, for the title.
        with_vehicles: whether the tiles were made with the vehicle prompt (real tiles: chosen with boxes,
            without, or ``None``: either).
        domain: the domain whose style they take (real tiles: whose tiles they are).
        gsd: metres per pixel.
        created: the Items' datetime.
        label_method: where the boxes came from, in words.
        real: real tiles (``aerosynth:synthetic: false``, no seed).
        georeference: where real tiles' georeference comes from, in words.
    """
    # pystac reads a relative href as relative to the object that holds it, not to the working folder: every
    # href is built absolute here (wherever the export is being built: a relative OUT_ROOT, a temporary
    # folder) and made relative to its file when the catalog is saved, so the catalog works wherever it is moved.
    root = Path(os.path.abspath(export.root))
    tiles, crs, class_names = export.tiles, export.crs, export.class_names
    kind = {True: "with vehicles", False: "without vehicles", None: "all"}[with_vehicles]
    if real:
        what, where = f"real tiles of {domain}", georeference
    else:
        what, where = f"synthetic tiles in the style of {domain}", "synthetic georeference (no place on Earth)"
    catalog = pystac.Catalog(
        id=catalog_id,
        title=f"aerosynth request {request_name}",
        description=f"{len(tiles)} {what} ({kind}), labelled from {label_method}; {where}.",
    )
    images = pystac.Catalog(
        id=f"{catalog_id}-images", description=f"{'Real' if real else 'Synthetic'} RGB GeoTIFF tiles."
    )
    labels = pystac.Catalog(id=f"{catalog_id}-labels", description="Vehicle box labels (STAC label extension).")
    catalog.add_child(images)
    catalog.add_child(labels)
    catalog.set_self_href(str(root / "catalog.json"))
    images.set_self_href(str(root / "stac" / "images" / "catalog.json"))
    labels.set_self_href(str(root / "stac" / "labels" / "catalog.json"))
    for tile in tiles:
        geometry, bbox = footprint_wgs84(tile.transform, tile.width, tile.height, crs)
        props = {
            "gsd": gsd,
            "aerosynth:synthetic": not real,
            "aerosynth:domain": domain,
            **({} if tile.seed is None else {"aerosynth:seed": tile.seed}),
            **({} if with_vehicles is None else {"aerosynth:with_vehicles": with_vehicles}),
            "aerosynth:crs": crs,
            "aerosynth:transform": [float(v) for v in tile.transform[:6]],
            **tile.properties,
        }
        item = pystac.Item(id=tile.tile_id, geometry=geometry, bbox=bbox, datetime=created, properties=props)
        item.add_asset(
            "image",
            pystac.Asset(
                href=str(root / "tiles" / f"{tile.tile_id}.tif"),
                media_type=pystac.MediaType.GEOTIFF,
                roles=["data"],
                title=f"RGB tile ({georeference})" if real else "RGB tile (synthetic georeference, EPSG:3857)",
            ),
        )
        images.add_item(item)
        item.set_self_href(str(root / "stac" / "images" / f"{tile.tile_id}.json"))
        add_label_item(
            labels,
            item,
            root / "labels" / f"{tile.tile_id}.geojson",
            len(tile.detections),
            created,
            label_method,
            class_names,
            root / "stac" / "labels" / f"{tile.tile_id}.json",
        )
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
