"""Write the tiny fixtures under tests/data (run: python tests/data/make_fixtures.py).

Deterministic: the same script writes the same files. Everything is small (a few KB each).

* ``yolo_domain/`` — 4 plain images (3 groups) with YOLO labels, one negative.
* ``coco_domain/`` — the same images as a COCO json.
* ``geotiff_domain/`` — two RGB GeoTIFFs in EPSG:32632 with GeoJSON labels: polygons in the
  raster CRS for one, vehicle-centre points in WGS84 for the other.
* ``rasters/`` — a 16-bit single-band GeoTIFF with nodata, and a 4-band one.

:func:`write_flag_target` writes, where a test asks (not under tests/data: 300 KB), a target without labels
of two GeoTIFFs large enough for 200 tiles of 32 px, for the flagging page.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

HERE = Path(__file__).resolve().parent
CRS = "EPSG:32632"
ORIGIN = (690_000.0, 5_336_000.0)  # Munich, UTM 32N


def _scene(rng: np.random.Generator, w: int, h: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    img = (rng.normal(110, 2, (h, w, 3))).clip(0, 255).astype(np.uint8)
    for x1, y1, x2, y2 in boxes:
        img[y1:y2, x1:x2] = (220, 40, 40)
    return img


def write_yolo_domain(root: Path, rng: np.random.Generator) -> None:
    import cv2

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    groups = {}
    specs = {
        "a_0": ("clipA", [(10, 20, 46, 34), (150, 150, 190, 166)]),
        "a_1": ("clipA", [(12, 22, 48, 36)]),
        "b_0": ("clipB", [(100, 60, 116, 100)]),
        "c_0": ("clipC", []),
    }
    w, h = 200, 180
    for stem, (group, boxes) in specs.items():
        img = _scene(rng, w, h, boxes)
        cv2.imwrite(str(root / "images" / f"{stem}.png"), img[:, :, ::-1])
        rows = [
            f"0 {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            for x1, y1, x2, y2 in boxes
        ]
        (root / "labels" / f"{stem}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
        groups[f"{stem}.png"] = group
    (root / "groups.json").write_text(json.dumps(groups, indent=1, sort_keys=True))


def write_coco_domain(root: Path, yolo_root: Path) -> None:
    root.mkdir()
    images, anns = [], []
    for i, p in enumerate(sorted((yolo_root / "images").glob("*.png")), 1):
        shutil.copy(p, root / p.name)
        images.append({"id": i, "file_name": p.name, "width": 200, "height": 180})
        for line in (yolo_root / "labels" / f"{p.stem}.txt").read_text().split("\n"):
            if line.strip():
                _, cx, cy, bw, bh = map(float, line.split())
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": 1,
                        "bbox": [(cx - bw / 2) * 200, (cy - bh / 2) * 180, bw * 200, bh * 180],
                        "iscrowd": 0,
                    }
                )
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "vehicle"}]}
    (root / "annotations.json").write_text(json.dumps(doc, indent=1))


def _write_tif(path: Path, data: np.ndarray, transform: Affine, crs: str | None, nodata=None) -> None:
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "transform": transform,
    }
    if crs:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)


def write_geotiff_domain(root: Path, rng: np.random.Generator) -> None:
    from pyproj import Transformer

    root.mkdir()
    gsd = 0.25
    to_wgs = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    for i, boxes in enumerate([[(20, 30, 38, 37), (120, 200, 127, 218)], [(60, 60, 78, 67)]]):
        w, h = 256, 256
        transform = Affine(gsd, 0, ORIGIN[0] + 100 * i, 0, -gsd, ORIGIN[1])
        img = _scene(rng, w, h, boxes)
        _write_tif(root / f"scene_{i}.tif", np.moveaxis(img, -1, 0), transform, CRS)
        feats = []
        for x1, y1, x2, y2 in boxes:
            if i == 0:
                ring = [transform @ (x, y) for x, y in [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]]
                geom = {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}
            else:
                cx, cy = transform @ ((x1 + x2) / 2, (y1 + y2) / 2)
                lon, lat = to_wgs.transform(cx, cy)
                geom = {"type": "Point", "coordinates": [lon, lat]}
            feats.append({"type": "Feature", "geometry": geom, "properties": {"class_id": 0}})
        doc = {"type": "FeatureCollection", "features": feats}
        if i == 0:
            doc["crs"] = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32632"}}
        (root / f"scene_{i}.geojson").write_text(json.dumps(doc, indent=1))


def write_rasters(root: Path, rng: np.random.Generator) -> None:
    root.mkdir()
    transform = Affine(0.5, 0, ORIGIN[0], 0, -0.5, ORIGIN[1])
    data16 = rng.integers(1000, 1016, (1, 160, 160)).astype(np.uint16)
    data16[:, :20, :20] = 0
    _write_tif(root / "single_band_16bit.tif", data16, transform, CRS, nodata=0)
    _write_tif(root / "four_band.tif", rng.integers(100, 104, (4, 160, 160)).astype(np.uint8), transform, CRS)
    _write_tif(root / "no_crs.tif", rng.integers(100, 104, (3, 160, 160)).astype(np.uint8), Affine.identity(), None)


def write_flag_target(root: Path, seed: int = 1) -> dict[str, list[tuple[int, int, int, int]]]:
    """Two 320 x 320 px RGB GeoTIFFs at 0.25 m/px (EPSG:32632) with red vehicles, no labels; returns the boxes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(2):
        boxes = []
        for _ in range(12):
            x, y = (int(v) for v in rng.integers(4, 300, 2))
            boxes.append((x, y, x + 14, y + 7))
        img = _scene(rng, 320, 320, boxes)
        img[::40, :] = (90, 90, 90)  # a road grid, for the context view
        transform = Affine(0.25, 0, ORIGIN[0] + 200 * i, 0, -0.25, ORIGIN[1])
        _write_tif(root / f"scene_{i}.tif", np.moveaxis(img, -1, 0), transform, CRS)
        out[f"scene_{i}.tif"] = boxes
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    for name in ("yolo_domain", "coco_domain", "geotiff_domain", "rasters"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    write_yolo_domain(HERE / "yolo_domain", rng)
    write_coco_domain(HERE / "coco_domain", HERE / "yolo_domain")
    write_geotiff_domain(HERE / "geotiff_domain", rng)
    write_rasters(HERE / "rasters", rng)


if __name__ == "__main__":
    main()


def write_demo_targets(root: Path, scenes: int = 3, size_px: int = 384) -> tuple[Path, Path, Path]:
    """The demo's domains, and its target again as flags only; returns ``(source, target, flags-only target)``.

    The flags-only copy holds the target's GeoTIFFs without their GeoJSON boxes, and ``flags.json``: each
    tile's flag as ``data prepare`` derives it from those boxes (a tile with a kept box holds a vehicle), so
    the two targets give the same target tiles and flags.
    """
    import json

    from aerosynth.data.demo import DemoConfig, demo_spec, write_demo_data
    from aerosynth.data.prepare import prepare_dataset

    raw = root / "raw"
    write_demo_data(raw, DemoConfig(scenes_per_domain=scenes, size_px=size_px, seed=0), overwrite=True)
    manifest = prepare_dataset(demo_spec(raw), root / "tiles")
    flags = {}
    for split in ("target-train", "target-test"):
        doc = json.loads((root / "tiles" / split / "tiles.json").read_text())
        flags.update({t["tile_id"]: t["has_vehicle"] for t in doc["tiles"]})
    assert len(flags) == sum(manifest["splits"][s]["tiles"] for s in ("target-train", "target-test"))
    flagged = root / "flags_only" / "arid_carpark"
    flagged.mkdir(parents=True)
    for tif in sorted((raw / "arid_carpark").glob("*.tif")):
        shutil.copy(tif, flagged / tif.name)
    (flagged / "flags.json").write_text(json.dumps(flags, indent=1, sort_keys=True))
    shutil.rmtree(root / "tiles")
    return raw / "leafy_suburb", raw / "arid_carpark", flagged
