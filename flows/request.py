"""The ``request`` flow: N labelled tiles in the style of one domain, from an adapted model.

For GIS analysts: "give me 200 tiles that look like Munich, with vehicles, labelled". A request
synthesises ``count`` images with the adapted latent diffusion model (image ``i`` from seed
``seed + i``), labels them from their cross-attention heat maps (:mod:`aerosynth.annotation.heatmap_boxes`,
the default) or with a trained detector (``detector=PATH.pt``, boxes of confidence >= 0.25), and
writes one new dated export folder, never touching an earlier one. Its steps:

1. check every input before anything is written, find the model (:func:`resolve_model`, :func:`resolve_domain`);
2. synthesise the images (:func:`aerosynth.generation.sampling.generate_set`);
3. label them (:func:`heatmap_labels` or :func:`detector_labels`);
4. export them into a new folder published atomically under a lock (:mod:`aerosynth.data.export_folder` has the
   layout): GeoTIFF tiles, GeoJSON, COCO and YOLO (:mod:`aerosynth.data.tile_export`), a STAC catalog with an
   image and a label Item per tile (:mod:`aerosynth.data.stac`), ``preview.png`` (tiles | heat maps with their
   boxes, first 16 tiles) and ``request.json`` (the request, model, seeds, counts and the sha256 of every file);
5. :func:`request_flow` validates the export offline (:func:`aerosynth.data.export_validation.validate_export`).

Synthetic georeference: generated images have no place on Earth. Tile ``i`` is laid on the grid
that :mod:`aerosynth.annotation.export` uses for ``georef.json``: EPSG:3857 near (0, 0), ``ceil(sqrt(N))``
tiles per row, 10 m apart, north up, one pixel = the tile GSD. STAC geometries are the same
footprints in WGS84 (a few metres off Null Island); every Item says ``aerosynth:synthetic: true``.

Tile GSD: the run's tile GSD times ``tile_size / image_size`` (a 32 px model trained on 128 px
tiles at 0.125 m/px makes 0.5 m/px images), read from ``WORK/tiles/manifest.json``; 0.125 m/px at
128 px without a run; ``gsd=`` overrides.

Run it as :func:`request_tiles` (plain function) or :func:`request_flow` (Prefect flow ``request``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger

from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.export_folder import check_name, check_new_export, export_folder, file_inventory, publish_export
from aerosynth.data.export_validation import validate_export
from aerosynth.data.json_input import read_json_object
from aerosynth.data.manifest import file_sha256

CLASS_NAMES = ["vehicle"]
DETECTOR_CONF = 0.25
MODEL_STAGES = ("stageC", "stageB", "stageA")
DEFAULT_TILE_GSD, DEFAULT_TILE_SIZE = 0.125, 128
MAX_COUNT = 100_000
REQUEST_FILE = "request.json"
PREVIEW_COUNT = 16
LABEL_CHUNK = 256


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


def _run_tiles(run_dir: Path) -> tuple[dict[str, str], float, int]:
    """Domains, tile GSD and tile size of a run's ``tiles/manifest.json`` (defaults when absent)."""
    path = run_dir / "tiles" / "manifest.json"
    if not path.is_file():
        return {}, DEFAULT_TILE_GSD, DEFAULT_TILE_SIZE
    doc = read_json_object(path)
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
    spec = read_json_object(model_dir / "ldm.json").get("spec")
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
    from aerosynth.data.tiling import resample
    from aerosynth.detection.prediction import predict

    imgsz, det_gsd = _detector_settings(detector)
    scale = 1.0 if det_gsd is None else tile_gsd / det_gsd
    inputs = [rgb if abs(scale - 1.0) <= 1e-6 else resample(rgb, scale) for rgb in images]
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


# ------------------------------------------------------------------------------ the request
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
    check_new_export(folder)
    model = resolve_model(source)
    domain_name = resolve_domain(model, req.domain)
    tile_gsd = req.gsd or model.tile_gsd * model.tile_size / model.image_size
    log, kind = _logger(), "with" if req.with_vehicles else "without"
    log.info(
        "request %s: %d tiles of %s (%s vehicles) from %s", req.name, req.count, domain_name, kind, model.model_dir
    )
    with publish_export(folder) as tmp:
        _build(tmp, folder, req, model, domain_name, tile_gsd, progress)
    log.info("request %s: export %s", req.name, folder)
    return folder


def _build(
    tmp: Path, folder: Path, req: TileRequest, model: ModelSource, domain: str, tile_gsd: float, progress: bool
) -> None:
    """Synthesise, label and export the tiles into ``tmp`` (published as ``folder``)."""
    from aerosynth.annotation.export import SYNTHETIC_CRS, AnnotatedImage, preview_grid, synthetic_transform
    from aerosynth.data.imageio import read_rgb, write_png
    from aerosynth.data.stac import write_stac_catalog
    from aerosynth.data.tile_export import TileExport
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
    export = TileExport(tmp, SYNTHETIC_CRS, CLASS_NAMES)
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
            tile_id, png = f"{req.name}_{n}", work / "images" / f"{n}.png"
            h, w = rgb.shape[:2]
            export.add(tile_id, req.seed + i, rgb, det, synthetic_transform(i, req.count, w, h, tile_gsd), png)
            if i < PREVIEW_COUNT:
                previews.append(AnnotatedImage(tile_id, png, det, heatmap_path=work / "heatmaps" / f"{n}.png"))
    tiles = export.finish()
    write_png(tmp / "preview.png", preview_grid(previews))
    write_stac_catalog(export, folder.name, req.name, req.with_vehicles, domain, tile_gsd, created, label_method)
    shutil.rmtree(work)

    files = file_inventory(tmp)
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
