"""The ``request`` flow: N labelled tiles in the style of one domain, from an adapted model.

For GIS analysts: "give me 200 tiles that look like Munich, with vehicles, labelled". A request
synthesises ``count`` images with the adapted latent diffusion model (image ``i`` from seed
``seed + i``), labels them from their cross-attention heat maps (:mod:`aerosynth.annotation.heatmap_boxes`,
the default) or with a trained detector (``detector=PATH.pt``, boxes of confidence >= 0.25), and
writes one new dated export folder, never touching an earlier one::

    OUT_ROOT/<YYYY-MM-DD>_<name>/
      tiles/<id>.tif            RGB uint8 GeoTIFF, synthetic georeference (below)
      labels/<id>.geojson       box polygons of that tile in its CRS (EPSG:3857)
      labels.geojson            all boxes of all tiles (property ``tile`` names the tile)
      coco.json                 COCO; ``file_name`` is ``tiles/<id>.tif``
      yolo/images/<id>.png      the same pixels as PNG
      yolo/labels/<id>.txt      YOLO rows (empty file: no vehicle)
      yolo/data.yaml            ultralytics dataset (no ``path`` key: ultralytics then reads the
                                splits next to the yaml, so the folder can be moved or zipped)
      catalog.json              STAC 1.1 catalog, self-contained, relative hrefs only
      stac/images/catalog.json  one Item per tile, asset ``image`` = the GeoTIFF
      stac/images/<id>.json
      stac/labels/catalog.json  one label Item per tile (label extension: vector, detection,
      stac/labels/<id>.json     class ``vehicle``), asset ``labels`` = its GeoJSON, ``source`` link
                                to the image Item
      preview.png               tiles | heat maps with their boxes (first 16 tiles)
      request.json              the request, model, seeds, counts and the sha256 of every file above

Synthetic georeference: generated images have no place on Earth. Tile ``i`` is laid on the grid
that :mod:`aerosynth.annotation.export` uses for ``georef.json``: EPSG:3857 near (0, 0), ``ceil(sqrt(N))``
tiles per row, 10 m apart, north up, one pixel = the tile GSD. STAC geometries are the same
footprints in WGS84 (a few metres off Null Island); every Item says ``aerosynth:synthetic: true``.

Tile GSD: the run's tile GSD times ``tile_size / image_size`` (a 32 px model trained on 128 px
tiles at 0.125 m/px makes 0.5 m/px images), read from ``WORK/tiles/manifest.json``; 0.125 m/px at
128 px without a run; ``gsd=`` overrides.

Safety: the request name must match ``^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`` (no path); every input is
checked before anything is written; the export is built under a temporary name and renamed into
place (:func:`aerosynth.data.atomic.atomic_directory`), under an exclusive lock file
``OUT_ROOT/.<folder>.lock`` so two concurrent requests of one name cannot both publish; an existing
export of that name and date is an error.

Run it as :func:`request_tiles` (plain function) or :func:`request_flow` (Prefect flow ``request``);
check an export with :func:`validate_export`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import yaml
from aerosynth.data.atomic import atomic_directory, atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.manifest import file_sha256
from prefect import flow, get_run_logger
from pystac.errors import STACValidationError
from pystac.validation.stac_validator import GetSchemaError, JsonSchemaSTACValidator

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
CLASS_NAMES = ["vehicle"]
CLASS_PROPERTY = "class_name"
DETECTOR_CONF = 0.25
MODEL_STAGES = ("stageC", "stageB", "stageA")
DEFAULT_TILE_GSD, DEFAULT_TILE_SIZE = 0.125, 128
MAX_COUNT = 100_000
REQUEST_FILE = "request.json"
PREVIEW_COUNT = 16
LABEL_CHUNK = 256
LABEL_SCHEMA_PREFIX = "https://stac-extensions.github.io/label/"


def _logger() -> logging.Logger:
    try:
        return get_run_logger()  # type: ignore[return-value]
    except Exception:
        return logging.getLogger("aerosynth.flows.request")


# ------------------------------------------------------------------------------ inputs
@dataclass
class ModelSource:
    """Where a request's model comes from.

    Attributes:
        model_dir: the model folder (``ldm.json``, weights).
        stage: ``stageC``/``stageB``/``stageA`` when taken from a run, else ``None``.
        run_dir: the adapted run folder (``WORK``), when known.
        run_domains: ``{"source": ..., "target": ...}`` of the run's tiles, when known.
        domains: domains the model knows (background tokens).
        image_size: side of the images it makes.
        tile_gsd: metres per pixel of the run's tiles (before resizing to ``image_size``).
        tile_size: side of the run's tiles in pixels.
    """

    model_dir: Path
    stage: str | None
    run_dir: Path | None
    run_domains: dict[str, str]
    domains: list[str]
    image_size: int
    tile_gsd: float = DEFAULT_TILE_GSD
    tile_size: int = DEFAULT_TILE_SIZE


def check_name(name: Any) -> str:
    """Return ``name`` if it is a safe request name, else raise :class:`InputError` naming ``name``."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InputError(
            "name",
            f"{name!r} is not a request name: 1 to 64 letters, digits, '_' or '-', starting with a letter or digit "
            "(no path separators)",
        )
    return name


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise InputError(path, "expected a JSON object")
    return doc


def _run_tiles(run_dir: Path) -> tuple[dict[str, str], float, int]:
    """Domains, tile GSD and tile size of a run's ``tiles/manifest.json`` (defaults when absent)."""
    path = run_dir / "tiles" / "manifest.json"
    if not path.is_file():
        return {}, DEFAULT_TILE_GSD, DEFAULT_TILE_SIZE
    doc = _read_json(path)
    splits = doc.get("splits") or {}
    domains = {
        role: splits[split]["domain"]
        for role, split in (("source", "source-train"), ("target", "target-train"))
        if isinstance(splits.get(split), dict) and "domain" in splits[split]
    }
    gsd = float(doc.get("target_gsd") or DEFAULT_TILE_GSD)
    size = int(doc.get("tile_size") or DEFAULT_TILE_SIZE)
    return domains, gsd, size


def resolve_model(source: str | Path) -> ModelSource:
    """Find the model of an adapted run folder (``ldm/stageC/model``, else stage B, else A) or a model folder.

    Reads only JSON (no weights are loaded).

    Raises:
        InputError: neither a run folder with a trained model nor a model folder.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(source, "not found (give an adapted run folder or a model folder)")
    run_dir: Path | None = None
    stage: str | None = None
    if (source / "ldm.json").is_file():
        model_dir = source
        # a model inside a run: WORK/ldm/stageX/model
        parents = source.resolve().parents
        if len(parents) >= 3 and parents[1].name == "ldm" and parents[0].name in MODEL_STAGES:
            run_dir, stage = parents[2], parents[0].name
    elif (source / "ldm").is_dir():
        found = [s for s in MODEL_STAGES if (source / "ldm" / s / "model" / "ldm.json").is_file()]
        if not found:
            looked = ", ".join(f"{s}/model" for s in MODEL_STAGES)
            raise InputError(source / "ldm", f"no trained model (looked for {looked})")
        run_dir, stage = source, found[0]
        model_dir = source / "ldm" / stage / "model"
    else:
        raise InputError(source, "neither an adapted run folder (no ldm/) nor a model folder (no ldm.json)")
    spec = _read_json(model_dir / "ldm.json").get("spec")
    if not isinstance(spec, dict) or "domains" not in spec or "image_size" not in spec:
        raise InputError(model_dir / "ldm.json", "malformed model description (no spec.domains / spec.image_size)")
    run_domains, tile_gsd, tile_size = (
        _run_tiles(run_dir) if run_dir is not None else ({}, DEFAULT_TILE_GSD, DEFAULT_TILE_SIZE)
    )
    return ModelSource(
        model_dir, stage, run_dir, run_domains, sorted(spec["domains"]), int(spec["image_size"]), tile_gsd, tile_size
    )


def resolve_domain(model: ModelSource, domain: str) -> str:
    """The domain name to generate: one the model knows; ``source``/``target`` name the run's domains.

    Raises:
        InputError: a domain the model does not know (the message lists those it knows).
    """
    if domain in model.domains:
        return domain
    if domain in model.run_domains and model.run_domains[domain] in model.domains:
        return model.run_domains[domain]
    aliases = f" (or {', '.join(sorted(model.run_domains))})" if model.run_domains else ""
    raise InputError(
        "domain", f"unknown domain {domain!r}: the model at {model.model_dir} knows {', '.join(model.domains)}{aliases}"
    )


@dataclass
class TileRequest:
    """A validated request (what ``request.json`` records under ``request``).

    Attributes:
        name: the request name (folder ``<date>_<name>``).
        domain: the domain whose style the tiles take.
        count: number of tiles.
        with_vehicles: vehicle prompt (``target_cars`` style) or empty prompt (``target_empty``: no boxes).
        seed: seed of tile 0 (tile ``i`` uses ``seed + i``).
        steps: denoising steps.
        guidance_scale: classifier-free guidance scale.
        scheduler: ``ddim``, ``dpm``, ``euler`` or ``pndm``.
        batch_size: images per UNet batch.
        detector: a detector ``.pt`` labelling the tiles instead of the heat maps, or ``None``.
        detector_conf: lowest detector confidence kept.
        heatmap_options: fields of :class:`aerosynth.annotation.heatmap_boxes.HeatmapBoxConfig`.
        gsd: metres per pixel of the tiles (``None``: from the run, see the module docstring).
    """

    name: str
    domain: str
    count: int
    with_vehicles: bool = True
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 4.0
    scheduler: str = "ddim"
    batch_size: int = 8
    detector: Path | None = None
    detector_conf: float = DETECTOR_CONF
    heatmap_options: dict[str, Any] = field(default_factory=dict)
    gsd: float | None = None

    def validate(self) -> TileRequest:
        """Raise :class:`InputError` naming the first bad field (no file is touched)."""
        check_name(self.name)
        checks = [
            ("count", isinstance(self.count, int) and 1 <= self.count <= MAX_COUNT, f"an integer in 1..{MAX_COUNT}"),
            ("steps", isinstance(self.steps, int) and self.steps >= 1, "an integer >= 1"),
            ("guidance_scale", self.guidance_scale >= 1.0, ">= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("detector_conf", 0.0 <= self.detector_conf <= 1.0, "in [0, 1]"),
            ("gsd", self.gsd is None or (math.isfinite(self.gsd) and self.gsd > 0), "a positive number"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(name, f"got {getattr(self, name)!r}, expected {expected}")
        if not isinstance(self.with_vehicles, bool):
            raise InputError("with_vehicles", f"got {self.with_vehicles!r}, expected true or false")
        from aerosynth.generation.sampling import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise InputError("scheduler", f"unknown scheduler {self.scheduler!r}; choose one of {sorted(SCHEDULERS)}")
        if self.detector is not None:
            if self.detector.suffix != ".pt" or not self.detector.is_file():
                raise InputError(self.detector, "detector weights not found (a .pt file)")
        else:
            self.heatmap_config()
        return self

    def heatmap_config(self):
        """The :class:`aerosynth.annotation.heatmap_boxes.HeatmapBoxConfig` of ``heatmap_options`` (validated)."""
        from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig

        try:
            return HeatmapBoxConfig(**(self.heatmap_options or {})).validate()
        except TypeError as exc:
            raise InputError("heatmap_options", f"unknown option ({exc})") from None

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc["detector"] = None if self.detector is None else str(self.detector.resolve())
        doc["labels_from"] = "detector" if self.detector is not None else "heatmap"
        return doc


# ------------------------------------------------------------------------------ labelling


def heatmap_labels(set_dir: Path, request: TileRequest, names: list[str] | None = None) -> list[Detections]:
    """Boxes of images of a synthetic set (all, or ``names``) from their heat maps (none for an empty-prompt set)."""
    from aerosynth.annotation.heatmap_boxes import boxes_from_heatmap
    from aerosynth.annotation.synthetic_set import open_synthetic_set

    sset = open_synthetic_set(set_dir)
    names = sset.names if names is None else names
    if not sset.with_vehicles:
        return [Detections.empty(with_confidence=True) for _ in names]
    config = request.heatmap_config()
    size = sset.info.image_size
    return [
        boxes_from_heatmap(
            sset.heatmap(n, config.view, raw=config.raw_maps), config, gsd=sset.info.gsd, image_size=(size, size)
        )
        for n in names
    ]


def _detector_settings(detector: Path) -> tuple[int, float | None]:
    """Training image size and GSD recorded in the ``detector.json`` beside a model (128, ``None`` without)."""
    path = detector.with_name("detector.json")
    if not path.is_file():
        return 128, None
    try:
        doc = json.loads(path.read_text())
        imgsz = int((doc.get("config") or {}).get("imgsz") or 128)
        gsd = doc.get("gsd")
        return imgsz, None if gsd is None else float(gsd)
    except (ValueError, TypeError):
        return 128, None


def detector_labels(images: list[np.ndarray], detector: Path, tile_gsd: float, conf: float) -> list[Detections]:
    """Boxes of a trained detector on RGB tiles, resampled to the detector's training GSD when it is recorded."""
    import cv2
    from aerosynth.detection.prediction import predict

    imgsz, det_gsd = _detector_settings(detector)
    scale = 1.0 if det_gsd is None else tile_gsd / det_gsd
    inputs = []
    for rgb in images:
        h, w = rgb.shape[:2]
        if abs(scale - 1.0) > 1e-6:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4
            rgb = cv2.resize(rgb, size, interpolation=interp)
        inputs.append(rgb)
    side = max(max(im.shape[:2]) for im in inputs)
    imgsz = max(imgsz, 32 * math.ceil(side / 32))
    preds = predict(detector, inputs, conf=conf, imgsz=imgsz)
    out = []
    for rgb, det, inp in zip(images, preds, inputs, strict=True):
        h, w = rgb.shape[:2]
        det = det.filter_confidence(conf).scale(w / inp.shape[1], h / inp.shape[0]).clip(w, h).with_class(0)
        keep = (det.xyxy[:, 2] > det.xyxy[:, 0]) & (det.xyxy[:, 3] > det.xyxy[:, 1])
        out.append(det[keep])
    return out


# ------------------------------------------------------------------------------ STAC
def _footprint_wgs84(transform, width: int, height: int, crs: str) -> tuple[dict, list[float]]:
    """GeoJSON polygon (counter-clockwise) and bbox in WGS84 of a tile's footprint."""
    from aerosynth.data.geo import WGS84, pixel_to_map, transformer

    px = np.array([0, width, width, 0, 0], dtype=np.float64)
    py = np.array([height, height, 0, 0, height], dtype=np.float64)
    mx, my = pixel_to_map(transform, px, py)
    lon, lat = transformer(crs, WGS84).transform(mx, my)
    ring = [[float(a), float(b)] for a, b in zip(lon, lat, strict=True)]
    bbox = [float(np.min(lon)), float(np.min(lat)), float(np.max(lon)), float(np.max(lat))]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


@dataclass
class _Tile:
    tile_id: str
    seed: int
    transform: Any
    width: int
    height: int
    detections: Detections


def _write_stac(
    root: Path,
    folder_name: str,
    tiles: list[_Tile],
    request: TileRequest,
    domain: str,
    gsd: float,
    crs: str,
    created: dt.datetime,
    label_method: str,
) -> None:
    with warnings.catch_warnings():  # pystac flags its label helpers as deprecated (the extension is "pilot")
        warnings.simplefilter("ignore", DeprecationWarning)
        from pystac.extensions.label import (
            LabelClasses,
            LabelCount,
            LabelExtension,
            LabelMethod,
            LabelOverview,
            LabelTask,
            LabelType,
        )

    kind = "with vehicles" if request.with_vehicles else "without vehicles"
    catalog = pystac.Catalog(
        id=folder_name,
        title=f"aerosynth request {request.name}",
        description=f"{len(tiles)} synthetic tiles in the style of {domain} ({kind}), labelled "
        f"from {label_method}; synthetic georeference (no place on Earth).",
    )
    images = pystac.Catalog(id=f"{folder_name}-images", description="Synthetic RGB GeoTIFF tiles.")
    labels = pystac.Catalog(id=f"{folder_name}-labels", description="Vehicle box labels (STAC label extension).")
    catalog.add_child(images)
    catalog.add_child(labels)
    catalog.set_self_href(str(root / "catalog.json"))
    images.set_self_href(str(root / "stac" / "images" / "catalog.json"))
    labels.set_self_href(str(root / "stac" / "labels" / "catalog.json"))
    for tile in tiles:
        geometry, bbox = _footprint_wgs84(tile.transform, tile.width, tile.height, crs)
        props = {
            "gsd": gsd,
            "aerosynth:synthetic": True,
            "aerosynth:domain": domain,
            "aerosynth:seed": tile.seed,
            "aerosynth:with_vehicles": request.with_vehicles,
            "aerosynth:crs": crs,
            "aerosynth:transform": [float(v) for v in tile.transform[:6]],
        }
        item = pystac.Item(id=tile.tile_id, geometry=geometry, bbox=bbox, datetime=created, properties=props)
        item.add_asset(
            "image",
            pystac.Asset(
                href=str(root / "tiles" / f"{tile.tile_id}.tif"),
                media_type=pystac.MediaType.GEOTIFF,
                roles=["data"],
                title="RGB tile (synthetic georeference, EPSG:3857)",
            ),
        )
        images.add_item(item)
        item.set_self_href(str(root / "stac" / "images" / f"{tile.tile_id}.json"))

        label = pystac.Item(
            id=f"{tile.tile_id}-labels",
            geometry=geometry,
            bbox=bbox,
            datetime=created,
            properties={"aerosynth:boxes": len(tile.detections)},
        )
        ext = LabelExtension.ext(label, add_if_missing=True)
        ext.apply(
            label_description=f"Vehicle boxes of tile {tile.tile_id}, read from {label_method}.",
            label_type=LabelType.VECTOR,
            label_properties=[CLASS_PROPERTY],
            label_classes=[LabelClasses.create(classes=list(CLASS_NAMES), name=CLASS_PROPERTY)],
            label_tasks=[LabelTask.DETECTION],
            label_methods=[LabelMethod.AUTOMATED],
            label_overviews=[
                LabelOverview.create(
                    property_key=CLASS_PROPERTY, counts=[LabelCount.create(CLASS_NAMES[0], len(tile.detections))]
                )
            ],
        )
        ext.add_source(item, title="the labelled tile", assets=["image"])
        ext.add_geojson_labels(href=str(root / "labels" / f"{tile.tile_id}.geojson"), title="vehicle boxes")
        label.assets["labels"].roles = ["labels", "labels-vector"]
        labels.add_item(label)
        label.set_self_href(str(root / "stac" / "labels" / f"{tile.tile_id}.json"))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)


class OfflineSTACValidator(JsonSchemaSTACValidator):
    """pystac's JSON-schema validator limited to the schemas bundled with pystac (never fetches).

    Core Catalog/Collection/Item schemas (and the GeoJSON schemas they reference) come from
    ``pystac/validation/jsonschemas``; any other schema URI is refused instead of fetched. The
    label extension is checked by :func:`check_label_item` instead of its web-hosted schema; any
    other extension is an error.
    """

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        if schema_uri not in self.schema_cache:
            raise GetSchemaError(schema_uri, LookupError("not bundled with pystac (offline validation)"))
        return self.schema_cache[schema_uri]

    def validate_extension(self, stac_dict, stac_object_type, stac_version, extension_id, href=None) -> str:
        if extension_id.startswith(LABEL_SCHEMA_PREFIX):
            try:
                check_label_item(stac_dict, href or "?")
            except InputError as exc:
                raise STACValidationError(str(exc)) from None
            return extension_id
        raise STACValidationError(f"{href}: extension {extension_id} cannot be validated offline")


def _check_label_field(props: dict, key: str, ok: bool, expected: str, where: str) -> None:
    if not ok:
        raise InputError(where, f"label extension: {key} is {props.get(key)!r}, expected {expected}")


def check_label_item(item: dict, where: str) -> None:
    """Structural check of a label-extension Item (the rules of label schema v1.0.x, written out here).

    Properties ``label:properties`` (non-empty list of strings, or null), ``label:description``
    (non-empty string) and ``label:type`` (``vector``/``raster``) are required; ``label:classes``
    entries have ``name`` (a non-empty string for vector labels, null for raster) and ``classes``
    (all strings or all numbers); ``label:tasks``/``label:methods`` are lists of strings;
    ``label:overviews`` entries have a string ``property_key`` and ``counts`` of ``{name: str,
    count: int}``; no other ``label:`` field exists; link ``label:assets`` are lists of strings.

    Raises:
        InputError: the first violation.
    """
    props = item.get("properties")
    if not isinstance(props, dict):
        raise InputError(where, "label extension: no properties object")
    if not any(str(u).startswith(LABEL_SCHEMA_PREFIX) for u in item.get("stac_extensions") or []):
        raise InputError(where, "label extension: not listed in stac_extensions")
    known = {
        "label:properties",
        "label:classes",
        "label:description",
        "label:type",
        "label:tasks",
        "label:methods",
        "label:overviews",
    }
    extra = sorted(k for k in props if k.startswith("label:") and k not in known)
    if extra:
        raise InputError(where, f"label extension: unknown field {extra[0]}")
    for key in ("label:properties", "label:description", "label:type"):
        if key not in props:
            raise InputError(where, f"label extension: required field {key} missing")
    lp = props["label:properties"]
    _check_label_field(
        props,
        "label:properties",
        lp is None or (isinstance(lp, list) and len(lp) >= 1 and all(isinstance(p, str) for p in lp)),
        "a non-empty list of strings or null",
        where,
    )
    desc = props["label:description"]
    _check_label_field(
        props, "label:description", isinstance(desc, str) and len(desc) >= 1, "a non-empty string", where
    )
    _check_label_field(props, "label:type", props["label:type"] in ("vector", "raster"), "vector or raster", where)
    raster = props["label:type"] == "raster"
    classes = props.get("label:classes", [])
    _check_label_field(props, "label:classes", isinstance(classes, list), "a list", where)
    for entry in classes:
        ok = isinstance(entry, dict) and "name" in entry and "classes" in entry
        _check_label_field(props, "label:classes", ok, "objects with name and classes", where)
        name, values = entry["name"], entry["classes"]
        ok_name = name is None if raster else (isinstance(name, str) and len(name) >= 1)
        _check_label_field(props, "label:classes", ok_name, "null names (raster) or non-empty names (vector)", where)
        ok_values = isinstance(values, list) and (
            all(isinstance(v, str) for v in values)
            or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        )
        _check_label_field(props, "label:classes", ok_values, "classes all strings or all numbers", where)
    for key in ("label:tasks", "label:methods"):
        value = props.get(key, [])
        _check_label_field(
            props, key, isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings", where
        )
    for ov in props.get("label:overviews", []) or []:
        ok = isinstance(ov, dict) and isinstance(ov.get("property_key", ""), str)
        counts = ov.get("counts", []) if isinstance(ov, dict) else None
        ok = (
            ok
            and isinstance(counts, list)
            and all(
                isinstance(c, dict)
                and isinstance(c.get("name", ""), str)
                and isinstance(c.get("count", 0), int)
                and not isinstance(c.get("count", 0), bool)
                for c in counts
            )
        )
        _check_label_field(props, "label:overviews", ok, "objects with property_key and counts {name, count}", where)
    for link in item.get("links") or []:
        extra = [k for k in link if k.startswith("label:") and k != "label:assets"]
        if extra:
            raise InputError(where, f"label extension: unknown link field {extra[0]}")
        la = link.get("label:assets", [])
        if not (isinstance(la, list) and all(isinstance(a, str) for a in la)):
            raise InputError(where, "label extension: link label:assets must be a list of strings")


def _is_relative(href: str) -> bool:
    return "://" not in href and not href.startswith("/") and not re.match(r"^[A-Za-z]:[\\/]", href)


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def validate_export(folder: str | Path) -> dict[str, int]:
    """Validate a request export offline: STAC core schemas, label extension, hrefs, files.

    pystac ships the STAC core JSON schemas (``pystac/validation/jsonschemas``) but fetches
    extension schemas from the web, which fails offline. Here every Catalog and Item file is
    validated against the bundled core schemas with :class:`OfflineSTACValidator` (no URI is ever
    fetched), and the label extension is checked in Python by :func:`check_label_item` (its schema's
    rules) plus what the schema cannot see: a ``source`` link that resolves to an Item of this
    catalog whose assets include those named in ``label:assets``; a ``labels`` GeoJSON asset that
    exists, is a FeatureCollection whose features carry each ``label:properties`` key with a value
    from ``label:classes``, and matches the ``label:overviews`` counts. Every link and asset href
    must be relative and point to an existing file inside ``folder`` (self-contained catalog).

    Returns:
        Counts: ``catalogs``, ``items``, ``label_items``.

    Raises:
        InputError: the first problem, naming the file.
    """
    root = Path(folder)
    catalog_path = root / "catalog.json"
    if not catalog_path.is_file():
        raise InputError(catalog_path, "no STAC catalog")
    validator = OfflineSTACValidator()
    seen: set[Path] = set()
    docs: dict[Path, dict] = {}
    todo = [catalog_path.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if not _inside(root, path) or not path.is_file():
            raise InputError(path, "linked STAC file missing or outside the export")
        doc = _read_json(path)
        docs[path] = doc
        kind = doc.get("type")
        if kind not in ("Catalog", "Collection", "Feature"):
            raise InputError(path, f"not a STAC Catalog, Collection or Item (type {kind!r})")
        try:
            validator.validate(
                doc,
                pystac.STACObjectType(kind),
                doc.get("stac_version", ""),
                list(doc.get("stac_extensions") or []),
                href=str(path),
            )
        except STACValidationError as exc:
            raise InputError(path, str(exc).splitlines()[0] + " " + " ".join(str(exc).splitlines()[1:2])) from None
        for link in doc.get("links") or []:
            href = str(link.get("href", ""))
            if not _is_relative(href):
                raise InputError(path, f"link {link.get('rel')} has a non-relative href {href!r}")
            if link.get("rel") in ("child", "item", "source", "parent", "root"):
                todo.append((path.parent / href).resolve())
        for key, asset in (doc.get("assets") or {}).items():
            href = str(asset.get("href", ""))
            target = (path.parent / href).resolve()
            if not _is_relative(href) or not _inside(root, target) or not target.is_file():
                raise InputError(path, f"asset {key} href {href!r} is not a relative path to a file of the export")
    counts = {"catalogs": 0, "items": 0, "label_items": 0}
    for path, doc in docs.items():
        if doc["type"] != "Feature":
            counts["catalogs"] += 1
            continue
        counts["items"] += 1
        if any(str(u).startswith(LABEL_SCHEMA_PREFIX) for u in doc.get("stac_extensions") or []):
            counts["label_items"] += 1
            _check_label_semantics(path, doc, docs)
    # and the catalog loads with pystac itself
    try:
        loaded = pystac.Catalog.from_file(str(catalog_path))
        n_items = sum(1 for _ in loaded.get_items(recursive=True))
    except Exception as exc:
        raise InputError(catalog_path, f"pystac cannot read the catalog ({type(exc).__name__}: {exc})") from None
    if n_items != counts["items"]:
        raise InputError(catalog_path, f"pystac finds {n_items} items, the files hold {counts['items']}")
    return counts


def _check_label_semantics(path: Path, doc: dict, docs: dict[Path, dict]) -> None:
    props = doc["properties"]
    sources = [link for link in doc.get("links") or [] if link.get("rel") == "source"]
    if not sources:
        raise InputError(path, "label item without a source link to its image item")
    for link in sources:
        target = (path.parent / link["href"]).resolve()
        src = docs.get(target)
        if src is None or src.get("type") != "Feature":
            raise InputError(path, f"source link {link['href']!r} is not an item of this catalog")
        missing = [a for a in link.get("label:assets", []) if a not in (src.get("assets") or {})]
        if missing:
            raise InputError(path, f"label:assets names {missing[0]!r}, which the source item lacks")
    label_assets = [a for a in (doc.get("assets") or {}).values() if "labels" in (a.get("roles") or [])]
    if props["label:type"] == "vector":
        if not label_assets:
            raise InputError(path, "vector label item without a 'labels' asset")
        geo = _read_json((path.parent / label_assets[0]["href"]).resolve())
        if geo.get("type") != "FeatureCollection" or not isinstance(geo.get("features"), list):
            raise InputError(path, "labels asset is not a GeoJSON FeatureCollection")
        allowed = {c["name"]: set(c["classes"]) for c in props.get("label:classes") or []}
        tally: dict[str, dict[str, int]] = {}
        for i, feat in enumerate(geo["features"]):
            fprops = feat.get("properties") or {}
            for key in props["label:properties"] or []:
                value = fprops.get(key)
                if key in allowed and value not in allowed[key]:
                    raise InputError(path, f"label feature {i}: {key}={value!r} is not one of {sorted(allowed[key])}")
                tally.setdefault(key, {}).setdefault(str(value), 0)
                tally[key][str(value)] += 1
        for ov in props.get("label:overviews") or []:
            for c in ov.get("counts") or []:
                found = tally.get(ov.get("property_key", ""), {}).get(c["name"], 0)
                if found != c["count"]:
                    raise InputError(path, f"label:overviews says {c['count']} {c['name']!r}, the GeoJSON has {found}")


# ------------------------------------------------------------------------------ the request
@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold ``.<folder>.lock`` beside ``folder`` (O_EXCL) while an export is built."""
    lock = folder.parent / f".{folder.name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise InputError(
            folder,
            f"another request is writing this export now (or a crashed one left {lock.name}: "
            "remove it if no request is running)",
        ) from None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def export_folder(out_root: str | Path, name: str, day: dt.date | None = None) -> Path:
    """``OUT_ROOT/<YYYY-MM-DD>_<name>`` (``name`` checked first)."""
    check_name(name)
    day = day or dt.date.today()
    return Path(out_root) / f"{day.isoformat()}_{name}"


def request_tiles(
    source: str | Path,
    out_root: str | Path,
    name: str,
    domain: str,
    count: int,
    with_vehicles: bool = True,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 4.0,
    scheduler: str = "ddim",
    batch_size: int = 8,
    detector: str | Path | None = None,
    detector_conf: float = DETECTOR_CONF,
    heatmap_options: dict[str, Any] | None = None,
    gsd: float | None = None,
    day: dt.date | None = None,
    progress: bool = False,
) -> Path:
    """Synthesise, label and export ``count`` tiles in the style of ``domain`` (layout in the module docstring).

    Args:
        source: an adapted run folder (``WORK`` of the adapt flow) or a model folder.
        out_root: where the dated export folder is created.
        name: the request name (``^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$``).
        domain: a domain the model knows; with a run folder, ``source``/``target`` name its domains.
        count: number of tiles.
        with_vehicles: vehicle prompt; ``False``: the empty prompt, and no boxes at all.
        seed: seed of tile 0 (tile ``i`` uses ``seed + i``).
        steps: denoising steps.
        guidance_scale: classifier-free guidance scale.
        scheduler: ``ddim``, ``dpm``, ``euler`` or ``pndm``.
        batch_size: images per UNet batch.
        detector: label with this detector ``.pt`` (confidence >= ``detector_conf``) instead of the heat maps.
        detector_conf: lowest detector confidence kept.
        heatmap_options: :class:`aerosynth.annotation.heatmap_boxes.HeatmapBoxConfig` fields for heat-map labels.
        gsd: metres per pixel of the tiles (default: from the run; see the module docstring).
        day: the export's date (default: today, local time).
        progress: show the synthesis progress bar.

    Returns:
        The export folder.

    Raises:
        InputError: a bad name or value, an unknown domain, no model, a missing detector, or an
            export of that name and date that already exists. Nothing is written then.
    """
    req = TileRequest(
        name=name,
        domain=domain,
        count=count,
        with_vehicles=with_vehicles,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        batch_size=batch_size,
        detector=None if detector is None else Path(detector),
        detector_conf=detector_conf,
        heatmap_options=dict(heatmap_options or {}),
        gsd=gsd,
    ).validate()
    folder = export_folder(out_root, req.name, day)
    if folder.exists() or folder.is_symlink():
        raise InputError(
            folder,
            "an export of this name and date already exists (exports are never overwritten; choose another name)",
        )
    model = resolve_model(source)
    domain_name = resolve_domain(model, req.domain)
    tile_gsd = req.gsd or model.tile_gsd * model.tile_size / model.image_size
    log = _logger()
    log.info(
        "request %s: %d tiles of %s (%s vehicles) from %s",
        req.name,
        req.count,
        domain_name,
        "with" if req.with_vehicles else "without",
        model.model_dir,
    )

    Path(out_root).mkdir(parents=True, exist_ok=True)
    with _exclusive(folder):
        if folder.exists():
            raise InputError(folder, "an export of this name and date already exists")
        with atomic_directory(folder) as tmp:
            _build(tmp, folder, req, model, domain_name, tile_gsd, progress)
    log.info("request %s: export %s", req.name, folder)
    return folder


def _build(
    tmp: Path, folder: Path, req: TileRequest, model: ModelSource, domain: str, tile_gsd: float, progress: bool
) -> None:
    from aerosynth.annotation.export import SYNTHETIC_CRS, AnnotatedImage, preview_grid, synthetic_transform
    from aerosynth.data.exporters import LabelledImage, write_coco, write_yolo_split
    from aerosynth.data.geo import detections_to_geojson, write_geojson
    from aerosynth.data.imageio import read_rgb, write_png
    from aerosynth.data.rasters import write_geotiff
    from aerosynth.generation.sampling import SamplingConfig, generate_set

    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    set_name = "target_cars" if req.with_vehicles else "target_empty"
    work = tmp / ".synthetic"
    config = SamplingConfig(
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        scheduler=req.scheduler,
        batch_size=req.batch_size,
        shard_size=max(req.count, 1),
        gsd=tile_gsd,
        progress=progress,
    )
    generate_set(model.model_dir, work, set_name, domain, req.count, base_seed=req.seed, config=config)
    header = json.loads((work / "synthetic.json").read_text())
    names = [f"{i:06d}" for i in range(req.count)]
    if req.detector is not None:
        label_method = f"detector {req.detector.name} (confidence >= {req.detector_conf:g})"
    else:
        label_method = "cross-attention heat maps (annotation.heatmap_boxes)"
    hits_in_empty = 0
    tiles: list[_Tile] = []
    all_features: list[dict] = []
    labelled_tif: list[LabelledImage] = []
    labelled_png: list[LabelledImage] = []
    previews: list[AnnotatedImage] = []
    for start in range(0, len(names), LABEL_CHUNK):  # a chunk of images in memory at a time
        chunk = names[start : start + LABEL_CHUNK]
        rgbs = [read_rgb(work / "images" / f"{n}.png") for n in chunk]
        if req.detector is not None:
            dets = detector_labels(rgbs, req.detector, tile_gsd, req.detector_conf)
            if not req.with_vehicles:
                hits_in_empty += sum(1 for d in dets if len(d))
                dets = [Detections.empty(with_confidence=True) for _ in chunk]
        else:
            dets = heatmap_labels(work, req, chunk)
        for i, n, rgb, det in zip(range(start, start + len(chunk)), chunk, rgbs, dets, strict=True):
            tile_id = f"{req.name}_{n}"
            h, w = rgb.shape[:2]
            det.validate(tile_id, w, h)
            transform = synthetic_transform(i, req.count, w, h, tile_gsd)
            tif = write_geotiff(tmp / "tiles" / f"{tile_id}.tif", rgb, transform, SYNTHETIC_CRS)
            props = [{"tile": tile_id, "pixel_xyxy": [float(v) for v in det.xyxy[k]]} for k in range(len(det))]
            geo = detections_to_geojson(det, transform, SYNTHETIC_CRS, properties=props, class_names=CLASS_NAMES)
            write_geojson(tmp / "labels" / f"{tile_id}.geojson", geo)
            all_features.extend(geo["features"])
            labelled_tif.append(LabelledImage(tile_id, tif, det))
            labelled_png.append(LabelledImage(tile_id, work / "images" / f"{n}.png", det))
            if i < PREVIEW_COUNT:
                previews.append(
                    AnnotatedImage(
                        tile_id, work / "images" / f"{n}.png", det, heatmap_path=work / "heatmaps" / f"{n}.png"
                    )
                )
            tiles.append(_Tile(tile_id, req.seed + i, transform, w, h, det))

    crs_member = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}}
    write_geojson(tmp / "labels.geojson", {"type": "FeatureCollection", "crs": crs_member, "features": all_features})
    write_coco(tmp / "coco.json", labelled_tif, CLASS_NAMES, image_prefix="tiles/")
    write_yolo_split(tmp / "yolo", labelled_png, link=False)
    data_yaml = {"train": "images", "val": "images", "names": dict(enumerate(CLASS_NAMES))}
    atomic_write_text(tmp / "yolo" / "data.yaml", yaml.safe_dump(data_yaml, sort_keys=False))
    write_png(tmp / "preview.png", preview_grid(previews))
    _write_stac(tmp, folder.name, tiles, req, domain, tile_gsd, SYNTHETIC_CRS, created, label_method)
    shutil.rmtree(work)

    files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    boxes = [len(t.detections) for t in tiles]
    atomic_write_json(
        tmp / REQUEST_FILE,
        {
            "request": req.to_dict(),
            "domain": domain,
            "created": created.isoformat(),
            "export": folder.name,
            "model": {
                "path": str(model.model_dir.resolve()),
                "stage": model.stage,
                "run": None if model.run_dir is None else str(model.run_dir.resolve()),
                "ldm_json_sha256": file_sha256(model.model_dir / "ldm.json"),
            },
            "prompt": header["prompt"],
            "image_size": header["image_size"],
            "gsd": tile_gsd,
            "crs": SYNTHETIC_CRS,
            "georeference": "synthetic: annotation.export.synthetic_transform grid near (0, 0), north up",
            "labels_from": label_method,
            "seeds": {t.tile_id: t.seed for t in tiles},
            "counts": {
                "tiles": len(tiles),
                "tiles_with_boxes": sum(1 for b in boxes if b),
                "boxes": int(sum(boxes)),
                "detector_boxes_in_empty_tiles": hits_in_empty,
            },
            "files": files,
        },
    )


@flow(name="request", log_prints=True)
def request_flow(
    source: Path,
    out_root: Path,
    name: str,
    domain: str,
    count: int,
    with_vehicles: bool = True,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 4.0,
    scheduler: str = "ddim",
    detector: Path | None = None,
    heatmap_options: dict[str, Any] | None = None,
    gsd: float | None = None,
) -> str:
    """Prefect flow ``request``: :func:`request_tiles`, then the export is validated; returns its path."""
    folder = request_tiles(
        source,
        out_root,
        name,
        domain,
        count,
        with_vehicles=with_vehicles,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        detector=detector,
        heatmap_options=heatmap_options,
        gsd=gsd,
    )
    counts = validate_export(folder)
    _logger().info("STAC valid: %s", counts)
    return str(folder)
