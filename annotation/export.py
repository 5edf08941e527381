"""Export of a labelled synthetic dataset: YOLO, COCO, GeoJSON, preview, summary, manifest.

One folder, built under a temporary name and renamed into place (a reader never sees a
half-written export)::

    OUT/
      images/<name>.png       the synthetic images (copied)
      heatmaps/<name>.png     their heat-map stacks (copied, when known)
      labels/<name>.txt       YOLO rows ``class cx cy w h`` (empty file: no vehicle)
      data.yaml               ultralytics dataset (train = val = images/)
      annotations.json        COCO (``score`` = the box's confidence)
      boxes.geojson           box polygons in a synthetic georeference (below)
      georef.json             that georeference: CRS and the affine transform of every image
      preview.png             a grid of images and heat maps with their boxes
      summary.json            counts: images, boxes, boxes-per-image histogram, kept/refined/dropped
      manifest.json           inputs, settings, and the sha256 of every file above

Synthetic georeference: generated images have no place on Earth, so GeoJSON needs a
made-up one. Image ``i`` of the export is laid on a grid in EPSG:3857 (Web Mercator,
metres) near (0, 0): ``ceil(sqrt(N))`` images per row, ``GEOREF_GAP_M`` metres apart,
north up, one pixel = the set's GSD. The transform of each image is in ``georef.json``.

The same items give the same bytes (sorted JSON, no timestamps).
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from affine import Affine

from aerosynth.data.atomic import atomic_directory, atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.exporters import LabelledImage, write_coco, write_data_yaml
from aerosynth.data.imageio import read_rgb, write_png
from aerosynth.data.manifest import file_sha256

SYNTHETIC_CRS = "EPSG:3857"
GEOREF_GAP_M = 10.0
STATUS_COLOURS = {"kept": (0, 255, 0), "refined": (255, 200, 0)}
BOX_STATUSES = ("kept", "refined")


@dataclass
class AnnotatedImage:
    """One synthetic image with the boxes annotation gave it.

    Attributes:
        name: unique file stem in the export (e.g. ``target_cars_000012``).
        image_path: the generated RGB image.
        heatmap_path: its heat-map stack PNG, or ``None``.
        detections: the boxes (pixels), with confidences.
        status: per box, ``kept`` (accepted outright) or ``refined`` (accepted by the refinement CNN).
        set_name: the synthetic set it comes from.
        with_vehicles: whether it was generated with a vehicle prompt.
        dropped: candidate boxes of this image that annotation rejected.
    """

    name: str
    image_path: Path
    detections: Detections
    heatmap_path: Path | None = None
    status: list[str] = field(default_factory=list)
    set_name: str = ""
    with_vehicles: bool = True
    dropped: int = 0

    def __post_init__(self) -> None:
        if not self.status:
            self.status = ["kept"] * len(self.detections)
        if len(self.status) != len(self.detections):
            raise ValueError(f"{self.name}: {len(self.status)} statuses for {len(self.detections)} boxes")
        bad = set(self.status) - set(BOX_STATUSES)
        if bad:
            raise ValueError(f"{self.name}: unknown box status {sorted(bad)}")


def synthetic_transform(index: int, count: int, width: int, height: int, gsd: float) -> Affine:
    """The made-up pixel -> EPSG:3857 transform of image ``index`` of ``count`` (see module docstring)."""
    per_row = max(1, math.ceil(math.sqrt(max(count, 1))))
    row, col = divmod(index, per_row)
    x0 = col * (width * gsd + GEOREF_GAP_M)
    y0 = -row * (height * gsd + GEOREF_GAP_M)
    return Affine(gsd, 0.0, x0, 0.0, -gsd, y0)


def _geojson_features(dets: Detections, transform: Affine, props: list[dict]) -> list[dict]:
    """Box polygons (counter-clockwise rings) in map coordinates of ``transform``."""
    try:
        from aerosynth.data.geo import detections_to_geojson
    except ImportError:  # pragma: no cover - data.geo is part of the core
        detections_to_geojson = None
    if detections_to_geojson is not None:
        return detections_to_geojson(dets, transform, SYNTHETIC_CRS, properties=props, class_names=["vehicle"])[
            "features"
        ]
    features = []  # pragma: no cover
    for i in range(len(dets)):  # pragma: no cover
        x1, y1, x2, y2 = dets.xyxy[i]
        corners = [(x1, y2), (x2, y2), (x2, y1), (x1, y1), (x1, y2)]
        ring = [list(transform * (float(x), float(y))) for x, y in corners]
        features.append(
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props[i]}
        )
    return features  # pragma: no cover


def draw_boxes(rgb: np.ndarray, dets: Detections, status: Sequence[str], thickness: int = 1) -> np.ndarray:
    """A copy of ``rgb`` with boxes drawn (green: kept, amber: refined)."""
    out = np.ascontiguousarray(rgb.copy())
    for i in range(len(dets)):
        x1, y1, x2, y2 = (int(round(v)) for v in dets.xyxy[i])
        colour = STATUS_COLOURS.get(status[i], (255, 0, 0))
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
    return out


def preview_grid(items: Sequence[AnnotatedImage], columns: int = 4, cell: int = 128) -> np.ndarray:
    """Image | heat map pairs with their boxes, ``columns`` pairs per row, as one RGB array."""
    if not items:
        return np.zeros((cell, 2 * cell, 3), np.uint8)
    rows = math.ceil(len(items) / columns)
    grid = np.full((rows * (cell + 4), columns * (2 * cell + 8), 3), 32, np.uint8)
    for k, item in enumerate(items):
        r, c = divmod(k, columns)
        image = read_rgb(item.image_path)
        h, w = image.shape[:2]
        dets = item.detections.scale(cell / w, cell / h)
        panels = [image]
        heat = read_rgb(item.heatmap_path) if item.heatmap_path is not None else np.zeros_like(image)
        panels.append(heat)
        for j, panel in enumerate(panels):
            resized = cv2.resize(panel, (cell, cell), interpolation=cv2.INTER_NEAREST)
            drawn = draw_boxes(resized, dets, item.status)
            y0 = r * (cell + 4)
            x0 = c * (2 * cell + 8) + j * cell
            grid[y0 : y0 + cell, x0 : x0 + cell] = drawn
    return grid


def summarise(items: Sequence[AnnotatedImage]) -> dict:
    """Counts of an export: images, boxes, boxes-per-image histogram, kept/refined/dropped."""
    per_image = Counter(len(it.detections) for it in items)
    status = Counter(s for it in items for s in it.status)
    by_set: dict[str, dict] = {}
    for it in items:
        entry = by_set.setdefault(it.set_name, {"images": 0, "boxes": 0, "with_vehicles": it.with_vehicles})
        entry["images"] += 1
        entry["boxes"] += len(it.detections)
    return {
        "images": len(items),
        "boxes": int(sum(len(it.detections) for it in items)),
        "images_without_boxes": int(per_image.get(0, 0)),
        "boxes_per_image_histogram": {str(k): int(v) for k, v in sorted(per_image.items())},
        "kept": int(status.get("kept", 0)),
        "refined": int(status.get("refined", 0)),
        "dropped": int(sum(it.dropped for it in items)),
        "sets": by_set,
    }


def export_dataset(
    items: Sequence[AnnotatedImage],
    out_dir: str | Path,
    gsd: float,
    method: str,
    inputs: list[dict] | None = None,
    settings: dict | None = None,
    extra_summary: dict | None = None,
    preview_count: int = 16,
    class_names: Sequence[str] = ("vehicle",),
    overwrite: bool = True,
) -> Path:
    """Write the labelled synthetic dataset (layout in the module docstring) atomically.

    Args:
        items: the annotated images (names unique).
        out_dir: the export folder; an existing one is replaced only once the new one is complete.
        gsd: metres per pixel of the images (for the synthetic georeference).
        method: how the boxes were made (``direct``, ``relay``), recorded in summary and manifest.
        inputs: fingerprints of the input sets / splits for the manifest.
        settings: the configuration used, for the manifest.
        extra_summary: more entries for ``summary.json`` (thresholds ...).
        preview_count: images in the preview grid (the first ones by name).
        class_names: class names of the YOLO and COCO files.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        InputError: duplicate names, or boxes outside their image.
    """
    out_dir = Path(out_dir)
    items = sorted(items, key=lambda it: it.name)
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        dup = next(n for n, c in Counter(names).items() if c > 1)
        raise InputError(out_dir, f"two images named {dup!r} in one export")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        labelled: list[LabelledImage] = []
        features: list[dict] = []
        georef: dict[str, list[float]] = {}
        for index, item in enumerate(items):
            target = tmp / "images" / f"{item.name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.image_path, target)
            if item.heatmap_path is not None:
                (tmp / "heatmaps").mkdir(exist_ok=True)
                shutil.copyfile(item.heatmap_path, tmp / "heatmaps" / f"{item.name}.png")
            lab = LabelledImage(item.name, target, item.detections)
            w, h = lab.size()
            item.detections.validate(str(item.image_path), w, h)
            (tmp / "labels").mkdir(exist_ok=True)
            (tmp / "labels" / f"{item.name}.txt").write_text(item.detections.to_yolo(w, h))
            labelled.append(lab)
            transform = synthetic_transform(index, len(items), w, h, gsd)
            georef[item.name] = [float(v) for v in transform[:6]]
            props = [
                {
                    "image": item.name,
                    "status": item.status[i],
                    "pixel_xyxy": [float(v) for v in item.detections.xyxy[i]],
                }
                for i in range(len(item.detections))
            ]
            features.extend(_geojson_features(item.detections, transform, props))
        write_data_yaml(tmp / "data.yaml", None, "images", "images", list(class_names))
        write_coco(tmp / "annotations.json", labelled, list(class_names))
        geo_doc = {
            "type": "FeatureCollection",
            "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}},
            "features": features,
        }
        atomic_write_json(tmp / "boxes.geojson", geo_doc)
        atomic_write_json(
            tmp / "georef.json",
            {
                "crs": SYNTHETIC_CRS,
                "synthetic": True,
                "note": "made-up placement: images on a grid near (0, 0), north up, pixel = GSD",
                "gsd": gsd,
                "transforms": georef,
            },
        )
        write_png(tmp / "preview.png", preview_grid(items[:preview_count]))
        summary = {"method": method, "gsd": gsd, **summarise(items), **(extra_summary or {})}
        atomic_write_json(tmp / "summary.json", summary)
        files = {
            str(p.relative_to(tmp)): file_sha256(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        manifest = {
            "stage": "annotation",
            "method": method,
            "inputs": inputs or [],
            "settings": settings or {},
            "counts": {k: summary[k] for k in ("images", "boxes", "kept", "refined", "dropped")},
            "files": files,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return out_dir
