"""Turn domains into normalised tile splits (the format of :mod:`aerosynth.data.tileset`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from affine import Affine

from aerosynth.data.atomic import atomic_directory, atomic_write_json, atomic_write_text
from aerosynth.data.domains import Domain, check_image_headers
from aerosynth.data.errors import InputError
from aerosynth.data.exporters import LabelledImage, write_coco
from aerosynth.data.geo import crs_to_string
from aerosynth.data.imageio import write_png
from aerosynth.data.manifest import tree_sha256, write_manifest
from aerosynth.data.tileset import COCO_FILE, EVALUATION_DIR, TILES_FILE, SplitInfo, TileRecord, tiles_document
from aerosynth.data.tiling import cut_tiles, resample, resample_labels, resample_transform

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass
class SplitSpec:
    """One split to build.

    Attributes:
        name: split name (``source-train`` ...).
        domain: the imagery.
        groups: groups to include (``None``: all not excluded).
        exclude_groups: groups to leave out.
        mode: tiling, ``"grid"`` or ``"cover"`` (see :func:`aerosynth.data.tiling.tile_offsets`).
        weak: expose only the per-tile vehicle flag; boxes go to ``evaluation/<name>``.
        scale: fixed resampling factor (overrides ``domain.gsd / target_gsd``).
    """

    name: str
    domain: Domain
    groups: list[str] | None = None
    exclude_groups: list[str] = field(default_factory=list)
    mode: str = "grid"
    weak: bool = False
    scale: float | None = None


@dataclass
class PrepareSpec:
    """A whole dataset: target GSD, tile size, splits."""

    preset: str
    splits: list[SplitSpec]
    target_gsd: float = 0.125
    tile_size: int = 128
    single_class: bool = True
    min_valid_fraction: float = 0.5
    min_inside: float = 0.5


def _select(split: SplitSpec) -> list:
    known = set(split.domain.groups)
    for g in list(split.groups or []) + list(split.exclude_groups):
        if g not in known:
            raise InputError(f"split {split.name}", f"group {g!r} not in domain {split.domain.name}")
    items = [
        im
        for im in split.domain.images
        if (split.groups is None or im.group in split.groups) and im.group not in split.exclude_groups
    ]
    if not items:
        raise InputError(f"split {split.name}", "no image selected (empty split)")
    return items


def _scale_for(split: SplitSpec, gsd: float | None, target_gsd: float, where: Path) -> float:
    if split.scale is not None:
        return split.scale
    if gsd is None:
        raise InputError(where, "unknown ground sample distance: give the domain a gsd or use a georeferenced raster")
    return gsd / target_gsd


def build_split(spec: PrepareSpec, split: SplitSpec, out_root: Path, progress: Progress | None = None) -> dict:
    """Write one split under ``out_root`` and return its counts."""
    items = _select(split)
    split_dir = out_root / split.name
    labels_dir = out_root / EVALUATION_DIR / split.name if split.weak else split_dir
    records: list[TileRecord] = []
    coco_items: list[LabelledImage] = []
    n_boxes = n_ignore = n_dropped = 0
    unlabelled = False
    for k, item in enumerate(items):
        loaded = split.domain.load(item)
        scale = _scale_for(split, loaded.gsd, spec.target_gsd, item.path)
        h, w = loaded.rgb.shape[:2]
        rgb = resample(loaded.rgb, scale)
        nh, nw = rgb.shape[:2]
        valid = None
        if loaded.valid is not None and not loaded.valid.all():
            valid = resample(loaded.valid.astype(np.uint8) * 255, scale) >= 128
        dets = loaded.detections
        if dets is None:
            unlabelled = True
        else:
            dets, dropped = split.domain.keep_vehicles(item, dets)
            n_dropped += dropped
            if spec.single_class:
                dets = dets.with_class(0)
            dets = resample_labels(dets, (w, h), (nw, nh))
        transform = resample_transform(loaded.transform, (w, h), (nw, nh)) if loaded.transform is not None else None
        crs = crs_to_string(loaded.crs) if loaded.crs is not None else None
        for tile in cut_tiles(rgb, dets, spec.tile_size, split.mode, valid, str(item.path), spec.min_inside):
            if tile.valid_fraction < spec.min_valid_fraction:
                continue
            tile_id = f"{item.image_id}_{tile.x0}_{tile.y0}"
            write_png(split_dir / "images" / f"{tile_id}.png", tile.pixels)
            tt = transform @ Affine.translation(tile.x0, tile.y0) if transform is not None else None
            records.append(
                TileRecord(
                    tile_id=tile_id,
                    source_image=str(item.path.name),
                    group=item.group,
                    x0=tile.x0,
                    y0=tile.y0,
                    width=spec.tile_size,
                    height=spec.tile_size,
                    has_vehicle=bool(len(tile.boxes)),
                    transform=tuple(float(v) for v in tt[:6]) if tt is not None else None,
                    crs=crs,
                )
            )
            if dets is not None:
                atomic_write_text(
                    labels_dir / "labels" / f"{tile_id}.txt", tile.boxes.to_yolo(spec.tile_size, spec.tile_size)
                )
                coco_items.append(LabelledImage(tile_id, tile.pixels, tile.boxes, tile.ignore))
                n_boxes += len(tile.boxes)
                n_ignore += len(tile.ignore)
        if progress:
            progress(split.name, k + 1, len(items))
    if unlabelled and not split.weak:
        raise InputError(f"split {split.name}", "a labelled split needs labels for every image")
    if unlabelled and split.weak:
        raise InputError(f"split {split.name}", "weak flags need labels (or a flag file) for every image")
    info = SplitInfo(
        split.name,
        split.domain.name,
        spec.target_gsd,
        spec.tile_size,
        split.weak,
        split.domain.class_names if not spec.single_class else ["vehicle"],
    )
    atomic_write_json(split_dir / TILES_FILE, tiles_document(info, records))
    class_names = info.class_names
    write_coco(labels_dir / COCO_FILE, coco_items, class_names)
    if not records:
        raise InputError(f"split {split.name}", "no tile could be cut (images smaller than the tile, or all nodata)")
    counts = {
        "domain": split.domain.name,
        "weak": split.weak,
        "images": len(items),
        "groups": sorted({im.group for im in items}),
        "tiles": len(records),
        "tiles_with_vehicles": sum(r.has_vehicle for r in records),
        "boxes": n_boxes,
        "ignore_regions": n_ignore,
        "vehicle_classes": [int(c) for c in split.domain.vehicle_classes],
        "dropped_boxes": n_dropped,
        "content_sha256": tree_sha256(split_dir),
    }
    return counts


def prepare_dataset(
    spec: PrepareSpec, out_dir: str | Path, overwrite: bool = False, progress: Progress | None = None
) -> dict:
    """Build every split of ``spec`` into ``out_dir`` atomically and write ``manifest.json``.

    The folder appears only when complete; a failure leaves nothing behind.

    Returns:
        The manifest (counts per split).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(out_dir, "output folder already exists (use --overwrite to replace it)")
    names = [s.name for s in spec.splits]
    if len(set(names)) != len(names):
        raise InputError("splits", "two splits share a name")
    for split in spec.splits:  # fail fast: every selection and image header before any work
        _select(split)
    for domain in {id(s.domain): s.domain for s in spec.splits}.values():
        check_image_headers(domain)
    for split in spec.splits:  # boxes of classes nobody chose as vehicles, before any pixel is decoded
        split.domain.check_classes(_select(split))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        splits = {}
        for split in spec.splits:
            splits[split.name] = build_split(spec, split, tmp, progress)
            log.info("%s: %d tiles, %d boxes", split.name, splits[split.name]["tiles"], splits[split.name]["boxes"])
        manifest = {
            "kind": "aerosynth.tiles",
            "preset": spec.preset,
            "target_gsd": spec.target_gsd,
            "tile_size": spec.tile_size,
            "splits": splits,
        }
        write_manifest(tmp, manifest)
    return manifest


def custom_spec(
    source: Domain,
    target: Domain,
    val_groups: list[str],
    test_groups: list[str],
    target_gsd: float = 0.125,
    tile_size: int = 128,
    train_groups: list[str] | None = None,
    exclude_groups: list[str] | None = None,
) -> PrepareSpec:
    """Source (train, and val when ``val_groups``) and weak target (train, test) splits of two domains.

    Target-train is every target group not in ``test_groups``, or only ``train_groups`` when given;
    ``exclude_groups`` are used by neither target split (e.g. Minsk's oblique ``photos``).
    """
    if not test_groups:
        raise InputError("test_groups", "name the target groups held out for target-test")
    both = sorted(set(train_groups or []) & set(test_groups))
    if both:
        raise InputError("train_groups", f"group(s) {', '.join(both)} named for both target-train and target-test")
    excluded = sorted(set(exclude_groups or []) & (set(test_groups) | set(train_groups or [])))
    if excluded:
        raise InputError("exclude_groups", f"group(s) {', '.join(excluded)} are excluded and named for a split")
    splits = [SplitSpec("source-train", source, exclude_groups=list(val_groups), mode="cover")]
    if val_groups:
        splits.append(SplitSpec("source-val", source, groups=list(val_groups), mode="cover"))
    splits += [
        SplitSpec("target-train", target, groups=list(train_groups), mode="grid", weak=True)
        if train_groups
        else SplitSpec(
            "target-train", target, exclude_groups=[*test_groups, *(exclude_groups or [])], mode="grid", weak=True
        ),
        SplitSpec("target-test", target, groups=list(test_groups), mode="grid", weak=True),
    ]
    return PrepareSpec("custom", splits, target_gsd=target_gsd, tile_size=tile_size)
