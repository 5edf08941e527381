"""``aerosynth data prepare`` and ``data demo``: tile datasets and the embedded demo domains."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from aerosynth.data.errors import InputError

console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _counts_table(manifest: dict) -> Table:
    table = Table(
        title=f"tiles ({manifest.get('preset')}, {manifest.get('target_gsd')} m/px, {manifest.get('tile_size')} px)"
    )
    for col in ("split", "domain", "images", "tiles", "with vehicles", "boxes", "ignore regions", "labels"):
        table.add_column(col, justify="right" if col not in ("split", "domain", "labels") else "left")
    for name, s in manifest["splits"].items():
        table.add_row(
            name,
            s["domain"],
            str(s["images"]),
            str(s["tiles"]),
            str(s["tiles_with_vehicles"]),
            str(s["boxes"]),
            str(s["ignore_regions"]),
            "weak flags only" if s["weak"] else "boxes",
        )
    return table


def data_prepare(
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    preset: Annotated[
        str | None, typer.Option(help="aerial-v1 (Madison -> KIT), aerial-v1-minsk (Madison -> Minsk) or demo.")
    ] = None,
    aerial_root: Annotated[Path | None, typer.Option(help="Folder with the aerial-v1 domains.")] = None,
    source: Annotated[
        Path | None, typer.Option(help="Source domain: YOLO folder, GeoTIFF folder or COCO json.")
    ] = None,
    target: Annotated[
        Path | None,
        typer.Option(help="Target domain: its flags.json/flags.csv/flags.geojson, else its boxes, give weak flags."),
    ] = None,
    source_gsd: Annotated[float | None, typer.Option(help="Source m/px (plain images).")] = None,
    target_gsd: Annotated[float | None, typer.Option(help="Target m/px (plain images).")] = None,
    val_groups: Annotated[str, typer.Option(help="Comma-separated source groups for source-val.")] = "",
    test_groups: Annotated[str, typer.Option(help="Comma-separated target groups for target-test.")] = "",
    train_groups: Annotated[
        str, typer.Option(help="Comma-separated target groups for target-train (default: all but the test groups).")
    ] = "",
    exclude_groups: Annotated[str, typer.Option(help="Comma-separated target groups used by neither split.")] = "",
    bands: Annotated[str, typer.Option(help="Band selection for rasters, e.g. 3,2,1.")] = "",
    classes: Annotated[
        str | None,
        typer.Option(
            help="Vehicle classes of multi-class labels: YOLO ids / COCO category ids (0,1) or names from data.yaml "
            "or the COCO categories (car,truck); boxes of other classes are dropped. Default: class 0 only, "
            "other classes refused."
        ),
    ] = None,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 128,
    gsd: Annotated[float, typer.Option(help="Target ground sample distance, m/px.")] = 0.125,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    unflagged: Annotated[
        str,
        typer.Option(
            help="A tile of a target without boxes that no flag covers (flags.json, flags.csv, flags.geojson): "
            "error (refuse, naming it), empty, or skip (leave it out); "
            "`aerosynth adapt` also takes derived (data.unflagged: flagged by the source-only detector)."
        ),
    ] = "error",
) -> None:
    """Resample, tile and split domains into the normalised tile dataset (prints counts, writes manifest.json)."""
    from aerosynth.data.classes import choose_classes, parse_classes
    from aerosynth.data.flags import check_unflagged_rule
    from aerosynth.data.prepare import prepare_dataset
    from aerosynth.data.presets import AERIAL_V1_PRESETS

    if preset is not None and classes is not None:
        raise InputError("--classes", "a preset chooses its own classes; use --source/--target to choose others")
    tokens = parse_classes(classes) if classes is not None else None  # given, even empty: "" is refused
    rule = check_unflagged_rule(unflagged)
    if rule == "derived":
        raise InputError(
            "--unflagged",
            "derived: the source-only detector flags them, which aerosynth adapt trains first: set "
            "data: {unflagged: derived} in its config (here: error, empty or skip)",
        )
    if preset in AERIAL_V1_PRESETS:
        from aerosynth.data.presets import aerial_v1, default_aerial_root

        spec = aerial_v1(aerial_root or default_aerial_root(), AERIAL_V1_PRESETS[preset])
    elif preset == "demo":
        from aerosynth.data.demo import demo_spec, write_demo_data

        raw = out.parent / f"{out.name}-raw"
        if not raw.exists():
            write_demo_data(raw)
        spec = demo_spec(raw, gsd, tile_size)
    elif preset is not None:
        raise InputError("--preset", f"unknown preset {preset!r} (aerial-v1, aerial-v1-minsk or demo)")
    else:
        if source is None or target is None:
            raise InputError("--source/--target", "give --preset, or both --source and --target")
        from aerosynth.data.domains import open_domain
        from aerosynth.data.prepare import custom_spec

        band_list = [int(b) for b in bands.split(",")] if bands else None
        src = open_domain(source, source_gsd, band_list)
        tgt = open_domain(target, target_gsd, band_list)
        if tokens is not None:
            choose_classes([src, tgt], tokens)
        tg = [g for g in test_groups.split(",") if g]
        if not tg:
            raise InputError("--test-groups", "name the target groups held out for target-test")
        spec = custom_spec(
            src,
            tgt,
            [g for g in val_groups.split(",") if g],
            tg,
            gsd,
            tile_size,
            train_groups=[g for g in train_groups.split(",") if g],
            exclude_groups=[g for g in exclude_groups.split(",") if g],
        )
    spec.unflagged = rule
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def report(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = progress.add_task(split, total=total)
            progress.update(tasks[split], completed=done)

        manifest = prepare_dataset(spec, out, overwrite=overwrite, progress=report)
    Console(width=max(Console().width, 120)).print(_counts_table(manifest))
    for name, s in manifest["splits"].items():
        if s.get("flag_sources"):
            where = ", ".join(f"{k} {v}" for k, v in s["flag_sources"].items())
            boxes = "" if s.get("target_boxes", True) else " (no target boxes: not scored)"
            Console().print(f"{name} flags from: {where}{boxes}")
    dropped = {n: s["dropped_boxes"] for n, s in manifest["splits"].items() if s.get("dropped_boxes")}
    if dropped:
        per_split = ", ".join(f"{n} {k}" for n, k in dropped.items())
        Console().print(f"boxes of classes not chosen by --classes, dropped: {per_split}")
    Console().print(f"manifest: {out / 'manifest.json'}")


def data_demo(
    out: Annotated[Path, typer.Option(help="Output folder for the GeoTIFF + GeoJSON demo domains.")],
    scenes: Annotated[int, typer.Option(help="Scenes (rasters) per domain.")] = 4,
    size: Annotated[int, typer.Option(help="Raster side in pixels.")] = 384,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Write the embedded demo domains (leafy_suburb -> arid_carpark) as GeoTIFF + GeoJSON."""
    from aerosynth.data.demo import DemoConfig, write_demo_data

    if scenes < 2:
        raise InputError("--scenes", "need at least 2 scenes per domain (one is held out)")
    write_demo_data(out, DemoConfig(scenes_per_domain=scenes, size_px=size, seed=seed), overwrite=overwrite)
    Console().print(f"demo data: {out}")
