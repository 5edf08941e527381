"""Turn domains into normalised tile splits (the format of :mod:`aerosynth.data.tileset`).

A target split is weak: one flag per tile (vehicle or empty). Each flag comes from, in this order, the
target's flag files (:mod:`aerosynth.data.flags`: a tile entry, an image entry, ``flags.geojson``), else its
boxes (a tile with a kept box has a vehicle), else the rule for unflagged tiles (``unflagged``: refuse,
empty, leave the tile out, or keep it for the source-only detector to flag: ``derived``). The boxes of a
target, when it has any, go to ``evaluation/<split>`` only; a target without boxes has no ``evaluation/``
folder and its manifest says ``"target_boxes": false`` (a target with boxes has no such key; with flag files,
each weak split counts its ``flag_sources``).

With ``PrepareSpec.flags_holdout`` > 0 a share of target-train is held out as the weak split ``target-holdout``
(:func:`holdout_tiles`: whole groups where target-train has several, else tiles of each flag with a fixed
seed): its flags score detectors without boxes; no training or labelling step reads it.

A raster of more than :data:`WINDOWED_PIXELS` pixels is never read whole: :func:`cut_raster` reads it window
by window (a run of tiles of one tile row at a time, with the source pixels its resampling needs) and gives
the tiles :func:`cut_image` gives, pixel for pixel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from affine import Affine

from aerosynth.data.atomic import atomic_directory, atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.domains import RASTER_SUFFIXES, Domain, DomainImage, check_image_headers
from aerosynth.data.errors import InputError
from aerosynth.data.exporters import LabelledImage, write_coco
from aerosynth.data.flags import (
    FLAG_FILES,
    FLAGS_GEOJSON,
    UNFLAGGED_FILE,
    UnflaggedRule,
    check_unflagged_rule,
    tile_id,
)
from aerosynth.data.geo import crs_to_string
from aerosynth.data.imageio import write_png
from aerosynth.data.manifest import tree_sha256, write_manifest
from aerosynth.data.rasters import RasterSource, raster_size
from aerosynth.data.tileset import COCO_FILE, EVALUATION_DIR, TILES_FILE, SplitInfo, TileRecord, tiles_document
from aerosynth.data.tiling import (
    Tile,
    assign_boxes,
    axis_taps,
    cut_tiles,
    resample,
    resample_labels,
    resample_size,
    resample_transform,
    resample_window,
    tile_offsets,
)

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: Rasters with more pixels than this are cut window by window (:func:`cut_raster`), never read whole.
WINDOWED_PIXELS = 8192 * 8192
#: Largest raster cut window by window (pixels); a header claiming more is refused unread (its tiles alone
#: would fill a disk).
MAX_WINDOWED_PIXELS = 65_536 * 65_536
#: Resampled pixels across one windowed read: the tiles of a tile row are read this many at a time.
WINDOW_WIDTH = 512


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
    holdout: float = 0.0


#: The weak split of target-train tiles held out of training, scored against their flags.
HOLDOUT_SPLIT = "target-holdout"
#: The seed of the tiles :func:`holdout_tiles` holds out (fixed, so a run's holdout never moves).
HOLDOUT_SEED = 0


@dataclass
class PrepareSpec:
    """A whole dataset: target GSD, tile size, splits, and what a target tile without flag becomes.

    ``unflagged`` applies to tiles of a target without boxes that no flag covers: ``"error"`` refuses
    them (naming the tile), ``"empty"`` flags them empty, ``"skip"`` leaves them out of the split,
    ``"derived"`` keeps them with a placeholder flag, listed in the split's :data:`UNFLAGGED_FILE` for the
    source-only detector to flag (``aerosynth adapt``); none of them is held out.
    ``flags_holdout``: the share of ``target-train`` tiles written to :data:`HOLDOUT_SPLIT` instead.
    """

    preset: str
    splits: list[SplitSpec]
    target_gsd: float = 0.125
    tile_size: int = 128
    single_class: bool = True
    min_valid_fraction: float = 0.5
    min_inside: float = 0.5
    unflagged: UnflaggedRule = "error"
    flags_holdout: float = 0.0

    def __post_init__(self) -> None:
        check_unflagged_rule(self.unflagged, "unflagged")
        if not 0.0 <= self.flags_holdout < 1.0:
            raise InputError("flags_holdout", f"a fraction in [0, 1), got {self.flags_holdout}")


def holdout_tiles(records: list[TileRecord], fraction: float, seed: int = HOLDOUT_SEED) -> tuple[set[str], str]:
    """The tiles held out of a weak split: ``(tile ids, "group" or "tile")``.

    Where the tiles come from several groups, whole groups in a seeded order until ``fraction`` of the tiles
    is reached (frames of one group are never split; at least one group stays for training); else, tiles
    of each flag in a seeded order, ``fraction`` of each (at least one of each flag that has two tiles).

    Raises:
        InputError: no tile can be held out with some left for training.
    """
    rng = np.random.default_rng(seed)
    groups = sorted({r.group for r in records})
    held: set[str] = set()
    if len(groups) > 1:
        by = "group"
        for group in [groups[i] for i in rng.permutation(len(groups))][: len(groups) - 1]:
            if len(held) >= fraction * len(records):
                break
            held |= {r.tile_id for r in records if r.group == group}
    else:
        by = "tile"
        for flag in (True, False):
            ids = sorted(r.tile_id for r in records if r.has_vehicle == flag)
            take = min(max(int(round(fraction * len(ids))), 1), len(ids) - 1)
            held |= {ids[i] for i in rng.permutation(len(ids))[: max(take, 0)]}
    if not held:
        raise InputError("flags_holdout", f"{len(records)} tile(s) in one group: none can be held out of training")
    return held, by


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


def _scale_for(scale: float | None, gsd: float | None, target_gsd: float, where: Path) -> float:
    if scale is not None:
        return scale
    if gsd is None:
        raise InputError(where, "unknown ground sample distance: give the domain a gsd or use a georeferenced raster")
    return gsd / target_gsd


@dataclass
class CutImage:
    """One domain image resampled to the tiles' GSD, with its boxes and georeference at that scale.

    Attributes:
        item: the domain image.
        rgb: its pixels, resampled.
        valid: valid (not nodata) pixels, resampled, or ``None`` when all are valid.
        detections: vehicle boxes in resampled pixels, or ``None`` without labels (or when not asked for).
        dropped: boxes of classes that are not vehicles, dropped.
        transform: pixel -> map transform of the resampled image, or ``None``.
        crs: CRS of ``transform``, or ``None``.
    """

    item: DomainImage
    rgb: np.ndarray
    valid: np.ndarray | None
    detections: Detections | None
    dropped: int
    transform: Affine | None
    crs: object | None

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the resampled image."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])

    def tile_positions(self, tile_size: int, mode: str = "grid") -> list[tuple[int, int]]:
        """``(x0, y0)`` of every tile of the grid, those later skipped for nodata included."""
        return _tile_positions(self.size, tile_size, mode)

    def tiles(
        self, tile_size: int, mode: str = "grid", min_valid_fraction: float = 0.5, min_inside: float = 0.5
    ) -> Iterator[tuple[str, Tile]]:
        """``(tile id, tile)`` of the tiles kept (at least ``min_valid_fraction`` valid pixels), row by row."""
        for tile in cut_tiles(self.rgb, self.detections, tile_size, mode, self.valid, str(self.item.path), min_inside):
            if tile.valid_fraction >= min_valid_fraction:
                yield tile_id(self.item.image_id, tile.x0, tile.y0), tile


def _tile_positions(size: tuple[int, int], tile_size: int, mode: str) -> list[tuple[int, int]]:
    w, h = size
    return [(x0, y0) for y0 in tile_offsets(h, tile_size, mode) for x0 in tile_offsets(w, tile_size, mode)]


def _vehicle_boxes(
    domain: Domain,
    item: DomainImage,
    dets: Detections | None,
    single_class: bool,
    old_size: tuple[int, int],
    new_size: tuple[int, int],
) -> tuple[Detections | None, int]:
    """The vehicle boxes of an image in resampled pixels, and how many boxes of other classes were dropped."""
    if dets is None:
        return None, 0
    dets, dropped = domain.keep_vehicles(item, dets)
    if single_class:
        dets = dets.with_class(0)
    return resample_labels(dets, old_size, new_size), dropped


def cut_image(
    domain: Domain,
    item: DomainImage,
    target_gsd: float,
    scale: float | None = None,
    single_class: bool = True,
    boxes: bool = True,
) -> CutImage:
    """Decode one image of ``domain`` and resample it (and its vehicle boxes) to ``target_gsd``.

    The one resampling every tile of aerosynth goes through (``data prepare``, ``aerosynth flag``), so that
    tile ids and pixels agree between them (:func:`cut_raster` gives the same tiles window by window).

    Args:
        domain: the domain.
        item: one of its images.
        target_gsd: metres per pixel of the tiles.
        scale: fixed resampling factor (overrides ``gsd / target_gsd``).
        single_class: fold every vehicle class into class 0.
        boxes: read the boxes (``False``: :attr:`CutImage.detections` is ``None``).

    Raises:
        InputError: unknown GSD, unreadable image or labels, a box of a class not chosen.
    """
    loaded = domain.load(item)
    scale = _scale_for(scale, loaded.gsd, target_gsd, item.path)
    h, w = loaded.rgb.shape[:2]
    rgb = resample(loaded.rgb, scale)
    nh, nw = rgb.shape[:2]
    valid = None
    if loaded.valid is not None and not loaded.valid.all():
        valid = resample(loaded.valid.astype(np.uint8) * 255, scale) >= 128
    dets, dropped = _vehicle_boxes(domain, item, loaded.detections if boxes else None, single_class, (w, h), (nw, nh))
    transform = resample_transform(loaded.transform, (w, h), (nw, nh)) if loaded.transform is not None else None
    return CutImage(item, rgb, valid, dets, dropped, transform, loaded.crs)


@dataclass
class WindowedCut:
    """One raster resampled to the tiles' GSD window by window: :class:`CutImage` without the pixels in memory.

    Attributes:
        item: the domain image.
        source: the raster, read by window.
        size: ``(width, height)`` of the resampled raster.
        enlarge: resampled by Lanczos (the GSD of the tiles is finer than the raster's), not by area.
        detections: vehicle boxes in resampled pixels, or ``None`` without labels (or when not asked for).
        dropped: boxes of classes that are not vehicles, dropped.
        transform: pixel -> map transform of the resampled raster, or ``None``.
        crs: CRS of ``transform``, or ``None``.
    """

    item: DomainImage
    source: RasterSource
    size: tuple[int, int]
    enlarge: bool
    detections: Detections | None
    dropped: int
    transform: Affine | None
    crs: object | None

    def tile_positions(self, tile_size: int, mode: str = "grid") -> list[tuple[int, int]]:
        """``(x0, y0)`` of every tile of the grid, those later skipped for nodata included."""
        return _tile_positions(self.size, tile_size, mode)

    def tiles(
        self, tile_size: int, mode: str = "grid", min_valid_fraction: float = 0.5, min_inside: float = 0.5
    ) -> Iterator[tuple[str, Tile]]:
        """The tiles :meth:`CutImage.tiles` gives, in the same order, read window by window.

        Each read covers up to :data:`WINDOW_WIDTH` resampled pixels of one tile row and the source pixels
        their resampling needs (:func:`aerosynth.data.tiling.axis_taps`); the raster is closed at the end.

        Raises:
            InputError: the tile is larger than the resampled raster, or a block cannot be read.
        """
        (nw, nh), (w, h) = self.size, (self.source.width, self.source.height)
        if tile_size > nw or tile_size > nh:
            raise InputError(
                str(self.item.path), f"tile size {tile_size} is larger than the {nw}x{nh} image (after resampling)"
            )
        boxes = self.detections if self.detections is not None else Detections.empty()
        xs = tile_offsets(nw, tile_size, mode)
        per = max(1, WINDOW_WIDTH // tile_size)
        try:
            for y0 in tile_offsets(nh, tile_size, mode):
                rows = axis_taps(h, nh, y0, y0 + tile_size, self.enlarge)
                for run in (xs[i : i + per] for i in range(0, len(xs), per)):
                    x0, x1 = run[0], run[-1] + tile_size
                    cols = axis_taps(w, nw, x0, x1, self.enlarge)
                    (r0, r1), (c0, c1) = rows.span, cols.span
                    rgb, valid = self.source.read(c0, r0, c1 - c0, r1 - r0)
                    pixels = resample_window(rgb, rows, cols, (r0, c0))
                    inside = None
                    if not valid.all():
                        inside = resample_window(valid.astype(np.uint8) * 255, rows, cols, (r0, c0)) >= 128
                    b = boxes.xyxy
                    near = boxes[(b[:, 2] >= x0) & (b[:, 0] <= x1) & (b[:, 3] >= y0) & (b[:, 1] <= y0 + tile_size)]
                    for tx in run:
                        c = tx - x0
                        vf = 1.0 if inside is None else float(inside[:, c : c + tile_size].mean())
                        if vf < min_valid_fraction:
                            continue
                        kept, ignore = assign_boxes(near, tx, y0, tile_size, tile_size, min_inside)
                        tile = Tile(tx, y0, np.ascontiguousarray(pixels[:, c : c + tile_size]), kept, ignore, vf)
                        yield tile_id(self.item.image_id, tx, y0), tile
        finally:
            self.source.close()


def cut_raster(
    domain: Domain,
    item: DomainImage,
    target_gsd: float,
    scale: float | None = None,
    single_class: bool = True,
    boxes: bool = True,
) -> WindowedCut:
    """Open one raster of ``domain`` for windowed cutting at ``target_gsd``: :func:`cut_image` without reading it.

    Its tiles, boxes, flags and georeference are those :func:`cut_image` gives, pixel for pixel, except that a
    raster of other than 8 bits takes its stretch from a sample of its pixels
    (:class:`aerosynth.data.rasters.RasterSource`).

    Args:
        domain: the domain.
        item: one of its rasters.
        target_gsd: metres per pixel of the tiles.
        scale: fixed resampling factor (overrides ``gsd / target_gsd``).
        single_class: fold every vehicle class into class 0.
        boxes: read the boxes (``False``: :attr:`WindowedCut.detections` is ``None``).

    Raises:
        InputError: unknown GSD, unreadable raster or labels, a box of a class not chosen.
    """
    source = RasterSource(item.path, domain.bands)
    gsd = domain.gsd if domain.gsd is not None else source.gsd
    scale = _scale_for(scale, gsd, target_gsd, item.path)
    w, h = source.width, source.height
    nw, nh = resample_size(w, h, scale)
    dets = domain.load_labels(item, w, h, source.transform, source.crs, gsd) if boxes else None
    dets, dropped = _vehicle_boxes(domain, item, dets, single_class, (w, h), (nw, nh))
    transform = resample_transform(source.transform, (w, h), (nw, nh)) if source.transform is not None else None
    return WindowedCut(item, source, (nw, nh), scale >= 1, dets, dropped, transform, source.crs)


def open_cut(
    domain: Domain,
    item: DomainImage,
    target_gsd: float,
    scale: float | None = None,
    single_class: bool = True,
) -> CutImage | WindowedCut:
    """:func:`cut_raster` for a raster of more than :data:`WINDOWED_PIXELS` pixels, else :func:`cut_image`.

    Raises:
        InputError: as those do, or a raster of more than :data:`MAX_WINDOWED_PIXELS` pixels.
    """
    if item.path.suffix.lower() in RASTER_SUFFIXES:
        w, h = raster_size(item.path)
        if w * h > MAX_WINDOWED_PIXELS:
            raise InputError(item.path, f"raster of {w}x{h} pixels is over the {MAX_WINDOWED_PIXELS} limit")
        if w * h > WINDOWED_PIXELS:
            return cut_raster(domain, item, target_gsd, scale, single_class)
    return cut_image(domain, item, target_gsd, scale, single_class)


#: How to give the flags that are missing (the end of every "no flag" message).
FLAG_HINT = (
    "flag its tiles (aerosynth flag TARGET), or choose what unflagged tiles are: --unflagged empty|skip "
    "(data.unflagged in a config, where derived lets the source-only detector flag them)"
)


def check_target_flags(split: SplitSpec, unflagged: str) -> None:
    """Refuse a weak split that cannot get a flag for every tile, before any pixel is decoded.

    Checks that flag entries name images of the domain, and, for a domain without boxes under the
    ``"error"`` rule, that it has flags and that some flag reaches every image of the split (tiles not
    covered inside a covered image are found while cutting).

    Raises:
        InputError: one line naming the folder, the flag file or the image.
    """
    domain = split.domain
    where = domain.root or domain.name
    flags = domain.flags
    if flags is not None:
        names, stems = {im.path.name for im in domain.images}, {im.image_id for im in domain.images}
        unknown = flags.unknown_entries(names, stems)
        if unknown:
            first = unknown[0]
            raise InputError(
                Path(where) / flags.sources[first],
                f"{first!r} names no image of the target (keys: tile id <image stem>_<x0>_<y0>, image name or stem)"
                + (f", nor {len(unknown) - 1} other key(s)" if len(unknown) > 1 else ""),
            )
    if domain.has_labels or unflagged != "error":
        return
    if flags is None:
        raise InputError(
            where,
            f"target without boxes (no labels) and without flags ({', '.join(FLAG_FILES)}): {FLAG_HINT}",
        )
    for item in _select(split):
        raster = item.path.suffix.lower() in RASTER_SUFFIXES
        if not flags.covers(item.path.name, item.image_id, raster):
            why = f"; {FLAGS_GEOJSON} flags georeferenced rasters only" if flags.geojson is not None else ""
            raise InputError(
                item.path, f"no flag for this image or its tiles in {', '.join(flags.files)}{why}: {FLAG_HINT}"
            )


def _weak_flag(
    split: SplitSpec, cut: CutImage | WindowedCut, tid: str, tile: Tile, marked: set[tuple[int, int]] | None
) -> tuple[bool | None, str]:
    flags = split.domain.flags
    if flags is not None:
        found = flags.tile_flag(tid, cut.item.path.name, cut.item.image_id, marked, tile.x0, tile.y0)
        if found is not None:
            return found
    if cut.detections is not None:
        return bool(len(tile.boxes)), "boxes"
    return None, "unflagged"


def build_split(
    spec: PrepareSpec, split: SplitSpec, out_root: Path, progress: Progress | None = None
) -> dict[str, dict]:
    """Write one split under ``out_root`` and return its counts by split name.

    A labelled split takes boxes and flags from the domain's labels; a weak split takes its flags as the
    module docstring says, and writes the domain's boxes (if any) under ``evaluation/<split>``. With
    ``split.holdout`` the tiles :func:`holdout_tiles` picks go to :data:`HOLDOUT_SPLIT` (flags only), whose
    counts come back too.
    """
    items = _select(split)
    domain = split.domain
    if not domain.has_labels and not split.weak:
        raise InputError(domain.root or domain.name, f"split {split.name} needs boxes: the domain has no labels")
    split_dir = out_root / split.name
    labels_dir = out_root / EVALUATION_DIR / split.name if split.weak else split_dir
    flags = domain.flags if split.weak else None
    records: list[TileRecord] = []
    coco_items: list[LabelledImage] = []
    sources: dict[str, int] = {}
    tile_source: dict[str, str] = {}
    unflagged: set[str] = set()
    tile_boxes: dict[str, tuple[int, int]] = {}
    n_dropped = 0
    unlabelled = False
    for k, item in enumerate(items):
        cut = open_cut(domain, item, spec.target_gsd, split.scale, spec.single_class)
        dets = cut.detections
        if dets is None and domain.has_labels:
            unlabelled = True
        n_dropped += cut.dropped
        crs = crs_to_string(cut.crs) if cut.crs is not None else None
        marked = None
        if flags is not None:
            grid = set(cut.tile_positions(spec.tile_size, split.mode))
            stray = sorted(flags.tile_entries(item.image_id) - grid)
            if stray:
                tid = tile_id(item.image_id, *stray[0])
                raise InputError(
                    Path(domain.root or ".") / flags.sources[tid],
                    f"{tid} is not a tile of {item.path.name} at {spec.target_gsd} m/px and {spec.tile_size} px "
                    "(flags made with another --gsd or --tile-size?)",
                )
            if flags.geojson is not None and flags.image_entry(item.path.name, item.image_id) is None:
                w, h = cut.size
                grid_xy = (tile_offsets(w, spec.tile_size, split.mode), tile_offsets(h, spec.tile_size, split.mode))
                marked = flags.marked_tiles(cut.transform, cut.crs, w, h, item.path, (*grid_xy, spec.tile_size))
        for tid, tile in cut.tiles(spec.tile_size, split.mode, spec.min_valid_fraction, spec.min_inside):
            if split.weak:
                flag, source = _weak_flag(split, cut, tid, tile, marked)
                if flag is None:
                    if spec.unflagged == "error":
                        raise InputError(
                            item.path,
                            f"tile {tid} has no flag in {', '.join(flags.files) if flags else 'any flag file'}: "
                            f"{FLAG_HINT}",
                        )
                    source = f"unflagged ({spec.unflagged})"
                    if spec.unflagged == "skip":
                        sources[source] = sources.get(source, 0) + 1
                        continue
                    if spec.unflagged == "derived":  # a placeholder: adapt's F_S flags it (UNFLAGGED_FILE)
                        unflagged.add(tid)
                    flag = False
            else:
                flag, source = bool(len(tile.boxes)), "boxes"
            sources[source] = sources.get(source, 0) + 1
            tile_source[tid] = source
            png = write_png(split_dir / "images" / f"{tid}.png", tile.pixels)
            tt = cut.transform @ Affine.translation(tile.x0, tile.y0) if cut.transform is not None else None
            records.append(
                TileRecord(
                    tile_id=tid,
                    source_image=str(item.path.name),
                    group=item.group,
                    x0=tile.x0,
                    y0=tile.y0,
                    width=spec.tile_size,
                    height=spec.tile_size,
                    has_vehicle=bool(flag),
                    transform=tuple(float(v) for v in tt[:6]) if tt is not None else None,
                    crs=crs,
                )
            )
            if dets is not None:
                atomic_write_text(
                    labels_dir / "labels" / f"{tid}.txt", tile.boxes.to_yolo(spec.tile_size, spec.tile_size)
                )
                # the tile's PNG, not its pixels: memory holds no split's images (the COCO json needs their size)
                coco_items.append(LabelledImage(tid, png, tile.boxes, tile.ignore))
                tile_boxes[tid] = (len(tile.boxes), len(tile.ignore))
        if progress:
            progress(split.name, k + 1, len(items))
    if unlabelled and not split.weak:
        raise InputError(f"split {split.name}", "a labelled split needs labels for every image")
    if unlabelled and split.weak:
        raise InputError(f"split {split.name}", "weak flags need labels (or a flag file) for every image")
    if not records:
        raise InputError(f"split {split.name}", "no tile could be cut (images smaller than the tile, or all nodata)")
    info = SplitInfo(
        split.name,
        domain.name,
        spec.target_gsd,
        spec.tile_size,
        split.weak,
        domain.class_names if not spec.single_class else ["vehicle"],
    )
    held: set[str] = set()
    if split.holdout > 0:  # held-out tiles are scored against their flags: none is drawn among the unflagged
        held, by = holdout_tiles([r for r in records if r.tile_id not in unflagged], split.holdout)
        if by == "group" and unflagged:  # an unflagged tile of a held-out group: in neither part
            held_groups = {r.group for r in records if r.tile_id in held}
            dropped = {r.tile_id for r in records if r.tile_id in unflagged and r.group in held_groups}
            for tid in dropped:
                (split_dir / "images" / f"{tid}.png").unlink()
            records = [r for r in records if r.tile_id not in dropped]
            unflagged -= dropped
        _move_tiles(held, split_dir, out_root / HOLDOUT_SPLIT, labels_dir if domain.has_labels else None)
    if unflagged:
        atomic_write_json(split_dir / UNFLAGGED_FILE, {"rule": "derived", "tiles": sorted(unflagged)})
    parts = {split.name: [r for r in records if r.tile_id not in held]}
    if held:
        parts[HOLDOUT_SPLIT] = [r for r in records if r.tile_id in held]
    out: dict[str, dict] = {}
    for name, part in parts.items():
        ids = {r.tile_id for r in part}
        part_dir = out_root / name
        atomic_write_json(part_dir / TILES_FILE, tiles_document(replace(info, name=name), part))
        if domain.has_labels and name == split.name:  # a holdout is flags only
            write_coco(labels_dir / COCO_FILE, [c for c in coco_items if c.name in ids], info.class_names)
        counts = {
            "domain": domain.name,
            "weak": split.weak,
            "images": len({r.source_image for r in part}) if held else len(items),
            "groups": sorted({r.group for r in part}) if held else sorted({im.group for im in items}),
            "tiles": len(part),
            "tiles_with_vehicles": sum(r.has_vehicle for r in part),
            "boxes": sum(tile_boxes.get(t, (0, 0))[0] for t in ids) if name == split.name else 0,
            "ignore_regions": sum(tile_boxes.get(t, (0, 0))[1] for t in ids) if name == split.name else 0,
            "vehicle_classes": [int(c) for c in domain.vehicle_classes],
            "dropped_boxes": n_dropped if name == split.name else 0,
            "content_sha256": tree_sha256(part_dir),
        }
        if split.weak and (flags is not None or not domain.has_labels):  # a target labelled by boxes alone: as before
            counts["target_boxes"] = domain.has_labels
            part_sources = {}
            for t in ids:
                part_sources[tile_source[t]] = part_sources.get(tile_source[t], 0) + 1
            skipped = {k: v for k, v in sources.items() if k == "unflagged (skip)"} if name == split.name else {}
            counts["flag_sources"] = dict(sorted({**part_sources, **skipped}.items()))
        if name == HOLDOUT_SPLIT:
            counts["held_out"] = {"from": split.name, "fraction": split.holdout, "by": by, "seed": HOLDOUT_SEED}
        out[name] = counts
    return out


def _move_tiles(ids: set[str], split_dir: Path, holdout_dir: Path, labels_dir: Path | None) -> None:
    """Move the images of ``ids`` to the holdout split; their boxes (if any) are dropped: a holdout is flags only."""
    (holdout_dir / "images").mkdir(parents=True, exist_ok=True)
    for tid in sorted(ids):
        (split_dir / "images" / f"{tid}.png").rename(holdout_dir / "images" / f"{tid}.png")
        if labels_dir is not None:
            (labels_dir / "labels" / f"{tid}.txt").unlink(missing_ok=True)


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
    for split in spec.splits:  # a flag for every target tile, or a rule for those without
        if split.weak:
            check_target_flags(split, spec.unflagged)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        splits = {}
        for split in spec.splits:
            if spec.flags_holdout and split.weak and split.name == "target-train":
                split = replace(split, holdout=spec.flags_holdout)
            for name, counts in build_split(spec, split, tmp, progress).items():
                splits[name] = counts
                log.info("%s: %d tiles, %d boxes", name, counts["tiles"], counts["boxes"])
        manifest = {
            "kind": "aerosynth.tiles",
            "preset": spec.preset,
            "target_gsd": spec.target_gsd,
            "tile_size": spec.tile_size,
            "splits": splits,
        }
        if not all(s.get("target_boxes", True) for s in splits.values()):
            # absent, the target has boxes: the manifests of box-labelled targets (and the stage hashes
            # of the adapt runs built on them) stay what they were
            manifest["target_boxes"] = False
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
    unflagged: UnflaggedRule = "error",
) -> PrepareSpec:
    """Source (train, and val when ``val_groups``) and weak target (train, test) splits of two domains.

    Target-train is every target group not in ``test_groups``, or only ``train_groups`` when given;
    ``exclude_groups`` are used by neither target split (e.g. Minsk's oblique ``photos``). ``unflagged``
    is what a tile of a target without boxes that no flag covers becomes (see :class:`PrepareSpec`).
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
    return PrepareSpec("custom", splits, target_gsd=target_gsd, tile_size=tile_size, unflagged=unflagged)
