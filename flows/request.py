"""The ``request`` flow: N labelled tiles in the style of one domain, from an adapted model.

For GIS analysts: "give me 200 tiles that look like Munich, with vehicles, labelled". A request
synthesises ``count`` images with the adapted latent diffusion model (image ``i`` from seed
``seed + i``), labels them from their cross-attention heat maps (:mod:`aerosynth.annotation.heatmap_boxes`,
the default) or with a trained detector (``detector=PATH.pt``, boxes of confidence >= 0.25), and
writes one new dated export folder, never touching an earlier one. Its steps:

1. check every input before anything is written, find the model (:mod:`aerosynth.data.run_model`);
2. synthesise the images (:func:`aerosynth.generation.sampling.generate_set`);
3. label them (:func:`heatmap_labels` or :func:`detector_labels`);
4. export them into a temporary folder (:mod:`aerosynth.data.export_folder` has the layout): GeoTIFF tiles,
   GeoJSON, COCO and YOLO (:mod:`aerosynth.data.tile_export`), a STAC catalog with an image and a label Item
   per tile (:mod:`aerosynth.data.stac`, relative hrefs only), ``preview.png`` (tiles | heat maps with their
   boxes, first 16 tiles) and ``request.json`` (the request, model, seeds, counts and the sha256 of every file);
5. validate it there, offline (:func:`aerosynth.data.export_validation.validate_export`), and only then
   publish it under its final name (a rename under a lock). A request that fails at any step leaves no
   folder under the final name and no temporary one, so the same request can be made again.

Synthetic georeference: generated images have no place on Earth. Tile ``i`` is laid on the grid
that :mod:`aerosynth.annotation.export` uses for ``georef.json``: EPSG:3857 near (0, 0), ``ceil(sqrt(N))``
tiles per row, 10 m apart, north up, one pixel = the tile GSD. STAC geometries are the same
footprints in WGS84 (a few metres off Null Island); every Item says ``aerosynth:synthetic: true``.

Tile GSD: the run's tile GSD times ``tile_size / image_size`` (a 32 px model trained on 128 px
tiles at 0.125 m/px makes 0.5 m/px images), read from ``WORK/tiles/manifest.json``; 0.125 m/px at
128 px without a run; ``gsd=`` overrides.

Real tiles (``real="detector"|"self-training"|"heatmap"``, ``aerosynth request --real``): nothing is
synthesised; the run's real target-train tiles are exported with their labels. ``detector`` (the
recommended one): labelled by the detector the run handed over (``RUN/detector.pt``), flags applied and its
threshold chosen on source-val, made once into ``RUN/annotation/real-detector`` (:func:`label_with_run_detector`);
``self-training`` / ``heatmap``: as the adapt flow labelled them (``RUN/annotation/real-<method>/dataset``,
:mod:`aerosynth.data.real_tiles`) are exported in the same layout, each with the transform and CRS of its
``tiles.json`` record (the synthetic grid when the split has none). ``count`` tiles are drawn with ``seed``
(all when there are fewer): with boxes, without (``with_vehicles`` true/false) or either (``None``).
``request.json`` records the method and its ``summary.json`` (threshold, provenance).

Run it as :func:`request_tiles` (plain function) or :func:`request_flow` (Prefect flow ``request``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import shutil
from collections.abc import Callable
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
from aerosynth.data.manifest import file_sha256
from aerosynth.data.real_tiles import REAL_METHODS, RealChoice, choose_real_tiles
from aerosynth.data.run_model import ModelSource, resolve_domain, resolve_model
from aerosynth.data.tile_export import GeoTile

CLASS_NAMES = ["vehicle"]
DETECTOR_CONF = 0.25
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
class TileRequest:
    """A validated request (what ``request.json`` records under ``request``).

    Attributes:
        name: the request name (folder ``<date>_<name>``).
        domain: the domain whose style the tiles take.
        count: number of tiles.
        with_vehicles: vehicle prompt (``target_cars`` style) or empty prompt (``target_empty``: no boxes);
            real tiles: with boxes, without, or ``None``: either.
        seed: seed of tile 0 (tile ``i`` uses ``seed + i``); real tiles: seed of the draw.
        steps: denoising steps.
        guidance_scale: classifier-free guidance scale.
        scheduler: ``ddim``, ``dpm``, ``euler`` or ``pndm``.
        batch_size: images per UNet batch.
        detector: a detector ``.pt`` labelling the tiles instead of the heat maps, or ``None``.
        detector_conf: lowest detector confidence kept.
        heatmap_options: fields of :class:`aerosynth.annotation.heatmap_boxes.HeatmapBoxConfig`.
        gsd: metres per pixel of the tiles (``None``: from the run, see the module docstring).
        real: export the run's real target tiles labelled by ``self-training`` or ``heatmap`` instead.
    """

    name: str
    domain: str
    count: int
    with_vehicles: bool | None = True
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 4.0
    scheduler: str = "ddim"
    batch_size: int = 8
    detector: Path | None = None
    detector_conf: float = DETECTOR_CONF
    heatmap_options: dict[str, Any] = field(default_factory=dict)
    gsd: float | None = None
    real: str | None = None

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
        if not isinstance(self.with_vehicles, bool) and not (self.real and self.with_vehicles is None):
            raise InputError("with_vehicles", f"got {self.with_vehicles!r}, expected true or false")
        if self.real is not None:
            if self.real not in REAL_METHODS:
                raise InputError("real", f"unknown labelling method {self.real!r}; choose one of {REAL_METHODS}")
            if self.detector is not None:
                raise InputError("detector", "real tiles keep the labels of --real; a detector cannot relabel them")
            return self
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
        doc["labels_from"] = f"real-{self.real}" if self.real else "detector" if self.detector else "heatmap"
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
    with_vehicles: bool | None = None,
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
    real: str | None = None,
) -> Path:
    """Synthesise, label and export ``count`` tiles in the style of ``domain`` (layout in the module docstring).

    Args:
        source: an adapted run folder (``WORK`` of the adapt flow) or a model folder.
        out_root: where the dated export folder is created.
        name: the request name (``^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$``).
        domain: a domain the model knows; with a run folder, ``source``/``target`` name its domains
            (real tiles: ``target`` or the run's target domain).
        count: number of tiles.
        with_vehicles: vehicle prompt (``None``: ``True``); ``False``: the empty prompt, and no boxes at all.
            Real tiles: only tiles with boxes, only tiles without, or (``None``) either.
        seed: seed of tile 0 (tile ``i`` uses ``seed + i``); real tiles: seed of their draw.
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
        real: ``self-training`` or ``heatmap``: export the run's real target-train tiles with the labels
            that method gave them (``source`` must be the run folder; module docstring).

    Returns:
        The export folder (validated before it was published).

    Raises:
        InputError: a bad name or value, an unknown domain, no model, a missing detector, a run without
            the real-tile labels asked for, or an export of that name and date that already exists
            (nothing is written then); or an export that fails its validation (nothing is published).
    """
    req = TileRequest(
        name=name,
        domain=domain,
        count=count,
        with_vehicles=True if with_vehicles is None and real is None else with_vehicles,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        batch_size=batch_size,
        detector=None if detector is None else Path(detector),
        detector_conf=detector_conf,
        heatmap_options=dict(heatmap_options or {}),
        gsd=gsd,
        real=real,
    ).validate()
    folder = export_folder(out_root, req.name, day)
    check_new_export(folder)
    if req.real is not None:
        return _request_real(Path(source), folder, req)
    model = resolve_model(source)
    domain_name = resolve_domain(model, req.domain)
    tile_gsd = req.gsd or model.tile_gsd * model.tile_size / model.image_size
    log, kind = _logger(), "with" if req.with_vehicles else "without"
    log.info(
        "request %s: %d tiles of %s (%s vehicles) from %s", req.name, req.count, domain_name, kind, model.model_dir
    )
    _publish(folder, req, lambda tmp: _build(tmp, folder, req, model, domain_name, tile_gsd, progress))
    return folder


def _publish(folder: Path, req: TileRequest, build: Callable[[Path], None]) -> dict[str, int]:
    """Build the export into a temporary folder, validate it there, then rename it to ``folder``.

    Any error (the validation's included) removes the temporary folder: nothing is left under ``folder``.

    Returns:
        The validation's counts (catalogs, items, label items).

    Raises:
        InputError: the export fails its validation (named by ``folder`` and the file at fault).
    """
    with publish_export(folder) as tmp:
        build(tmp)
        try:
            counts = validate_export(tmp)
        except InputError as exc:
            try:
                where = Path(exc.where).relative_to(tmp.resolve()).as_posix()
            except ValueError:
                where = exc.where
            raise InputError(folder, f"not published, the export is invalid: {where}: {exc.problem}") from None
    _logger().info("request %s: export %s (STAC valid: %s)", req.name, folder, counts)
    return counts


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
    _write_record(
        tmp,
        tiles,
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
        },
        detector_boxes_in_empty_tiles=hits_in_empty,
    )


def _write_record(tmp: Path, tiles: list[GeoTile], record: dict, **extra_counts: int) -> None:
    """Write ``request.json``: ``record``, the counts of ``tiles`` (and ``extra_counts``), every file's sha256."""
    boxes = [len(t.detections) for t in tiles]
    counts = {"tiles": len(tiles), "tiles_with_boxes": sum(1 for b in boxes if b), "boxes": int(sum(boxes))}
    record = {**record, "counts": {**counts, **extra_counts}, "files": file_inventory(tmp)}
    atomic_write_json(tmp / REQUEST_FILE, record)


def label_with_run_detector(run_dir: str | Path) -> Path:
    """``RUN/annotation/real-detector/dataset``: the run's target-train tiles labelled by ``RUN/detector.pt``.

    The handed-over detector proposes boxes; tiles flagged empty get none, flagged tiles keep the boxes at
    or above its F1-optimal confidence on real source-val (and at least the best one), as every real-tile
    label of the adapt flow. Made once per detector (its sha256 is the stage key); target boxes are never read.

    Raises:
        InputError: the run has no ``detector.pt`` or no tiles.
    """
    from aerosynth.data.real_tiles import run_detector
    from aerosynth.flows.adapt_annotation import label_real_split
    from aerosynth.flows.adapt_common import _val_split
    from aerosynth.flows.stage_cache import run_stage

    run_dir = Path(run_dir)
    weights, tiles = run_detector(run_dir), run_dir / "tiles"
    if not (tiles / "target-train" / "tiles.json").is_file():
        raise InputError(tiles, "the run has no target-train tiles to label")
    handed = run_dir / "detector.json"
    key = {
        "method": "detector",
        "detector_sha256": file_sha256(weights),
        "variant": json.loads(handed.read_text()).get("variant") if handed.is_file() else None,
    }
    out, _ = run_stage(
        "annotation/real-detector",
        run_dir / "annotation" / "real-detector",
        key,
        {"tiles": tiles},
        lambda o: label_real_split(
            "self-training", tiles / "target-train", _val_split(tiles), o / "dataset", weights, provenance=key
        ),
        _logger(),
    )
    return out / "dataset"


def _request_real(run_dir: Path, folder: Path, req: TileRequest) -> Path:
    """Check the run's labelled real tiles, draw ``req.count`` of them and export them as ``folder``."""
    if req.real == "detector":
        label_with_run_detector(run_dir)
    choice = choose_real_tiles(run_dir, str(req.real), req.domain, req.count, req.seed, req.with_vehicles)
    log, domain = _logger(), choice.dataset.split.domain
    log.info(
        "request %s: %d of %d real %s tiles, labels %s",
        req.name,
        len(choice.tiles),
        choice.candidates,
        domain,
        req.real,
    )
    _publish(folder, req, lambda tmp: _build_real(tmp, folder, req, choice))
    return folder


def _build_real(tmp: Path, folder: Path, req: TileRequest, choice: RealChoice) -> None:
    """Export real tiles with their labels into ``tmp`` (published as ``folder``)."""
    from aerosynth.annotation.export import SYNTHETIC_CRS, AnnotatedImage, preview_grid, synthetic_transform
    from aerosynth.data.imageio import read_rgb, write_png
    from aerosynth.data.stac import write_stac_catalog
    from aerosynth.data.tile_export import TileExport

    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    split, crs, n = choice.dataset.split, choice.crs, len(choice.tiles)
    threshold = float(choice.dataset.summary.get("threshold", float("nan")))
    label_method = f"real-{req.real} labels (annotation.real_target, threshold {threshold:.3g})"
    export = TileExport(tmp, crs or SYNTHETIC_CRS, CLASS_NAMES)
    previews: list[AnnotatedImage] = []
    for i, tile in enumerate(choice.tiles):
        tile_id, rgb = f"{req.name}_{tile.tile_id}", read_rgb(tile.png)
        h, w = rgb.shape[:2]
        transform = tile.transform if crs is not None else synthetic_transform(i, n, w, h, split.gsd)
        props = {"aerosynth:source_tile": tile.tile_id, "aerosynth:flagged_vehicle": tile.flagged}
        export.add(tile_id, None, rgb, tile.detections, transform, tile.png, props)  # type: ignore[arg-type]
        if i < PREVIEW_COUNT:
            previews.append(AnnotatedImage(tile_id, tile.png, tile.detections))
    tiles = export.finish()
    write_png(tmp / "preview.png", preview_grid(previews))
    georef = f"tiles.json of {split.name}" if crs else "synthetic grid: the split has no georeference"
    write_stac_catalog(
        export, folder.name, req.name, req.with_vehicles, split.domain, split.gsd, created, label_method, True, georef
    )
    record = {"request": req.to_dict(), "domain": split.domain, "created": created.isoformat(), "export": folder.name}
    record.update(
        run=str(choice.dataset.split_dir.parent.parent.resolve()),
        real=choice.record(),
        image_size=split.tile_size,
        gsd=split.gsd,
        crs=crs or SYNTHETIC_CRS,
        georeference=georef,
        labels_from=label_method,
        source_tiles={t.tile_id: r.tile_id for t, r in zip(tiles, choice.tiles, strict=True)},
    )
    _write_record(tmp, tiles, record, flagged_tiles=sum(1 for t in choice.tiles if t.flagged))


@flow(name="request", log_prints=True)
def request_flow(
    source: Path,
    out_root: Path,
    name: str,
    domain: str,
    count: int,
    with_vehicles: bool | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 4.0,
    scheduler: str = "ddim",
    detector: Path | None = None,
    heatmap_options: dict[str, Any] | None = None,
    gsd: float | None = None,
    real: str | None = None,
) -> str:
    """Prefect flow ``request``: :func:`request_tiles` (which validates the export before publishing it); its path."""
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
        real=real,
    )
    return str(folder)
