"""The ``aerosynth`` command line (typer + rich).

Every command applies the offline settings first, prints progress it can measure, and turns
bad input into one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from data.errors import InputError
from data.offline import apply_offline_settings

app = typer.Typer(help="aerosynth: adapt aerial vehicle detectors to unseen regions with generated data.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Prepare tile datasets and the embedded demo data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=False,
    )


def _counts_table(manifest: dict) -> Table:
    table = Table(title=f"tiles ({manifest.get('preset')}, {manifest.get('target_gsd')} m/px, {manifest.get('tile_size')} px)")
    for col in ("split", "domain", "images", "tiles", "with vehicles", "boxes", "ignore regions", "labels"):
        table.add_column(col, justify="right" if col not in ("split", "domain", "labels") else "left")
    for name, s in manifest["splits"].items():
        table.add_row(name, s["domain"], str(s["images"]), str(s["tiles"]), str(s["tiles_with_vehicles"]),
                      str(s["boxes"]), str(s["ignore_regions"]), "weak flags only" if s["weak"] else "boxes")
    return table


def _open_domain(path: Path, gsd: float | None, name: str | None, bands: list[int] | None):
    from data.domains import coco_domain, geotiff_domain, yolo_folder_domain

    if path.is_file() and path.suffix.lower() == ".json":
        return coco_domain(path, name=name, gsd=gsd)
    if not path.is_dir():
        raise InputError(path, "domain not found (a folder with images/ and labels/, a folder of GeoTIFFs, or a COCO json)")
    if (path / "images").is_dir():
        return yolo_folder_domain(path, name=name, gsd=gsd, missing_labels="negative")
    return geotiff_domain(path, name=name, bands=bands, gsd=gsd)


@data_app.command("prepare")
def data_prepare(
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    preset: Annotated[str | None, typer.Option(help="aerial-v1 (../shared/data/aerial) or demo.")] = None,
    aerial_root: Annotated[Path | None, typer.Option(help="Folder with the aerial-v1 domains.")] = None,
    source: Annotated[Path | None, typer.Option(help="Source domain: YOLO folder, GeoTIFF folder or COCO json.")] = None,
    target: Annotated[Path | None, typer.Option(help="Target domain (its boxes become weak flags).")] = None,
    source_gsd: Annotated[float | None, typer.Option(help="Source m/px (plain images).")] = None,
    target_gsd: Annotated[float | None, typer.Option(help="Target m/px (plain images).")] = None,
    val_groups: Annotated[str, typer.Option(help="Comma-separated source groups for source-val.")] = "",
    test_groups: Annotated[str, typer.Option(help="Comma-separated target groups for target-test.")] = "",
    bands: Annotated[str, typer.Option(help="Band selection for rasters, e.g. 3,2,1.")] = "",
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 128,
    gsd: Annotated[float, typer.Option(help="Target ground sample distance, m/px.")] = 0.125,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Resample, tile and split domains into the normalised tile dataset (prints counts, writes manifest.json)."""
    from data.prepare import PrepareSpec, SplitSpec, prepare_dataset

    if preset == "aerial-v1":
        from data.presets import aerial_v1, default_aerial_root

        spec = aerial_v1(aerial_root or default_aerial_root())
    elif preset == "demo":
        from data.demo import demo_spec, write_demo_data

        raw = out.parent / f"{out.name}-raw"
        if not raw.exists():
            write_demo_data(raw)
        spec = demo_spec(raw, gsd, tile_size)
    elif preset is not None:
        raise InputError("--preset", f"unknown preset {preset!r} (aerial-v1 or demo)")
    else:
        if source is None or target is None:
            raise InputError("--source/--target", "give --preset, or both --source and --target")
        band_list = [int(b) for b in bands.split(",")] if bands else None
        src = _open_domain(source, source_gsd, None, band_list)
        tgt = _open_domain(target, target_gsd, None, band_list)
        vg = [g for g in val_groups.split(",") if g]
        tg = [g for g in test_groups.split(",") if g]
        if not tg:
            raise InputError("--test-groups", "name the target groups held out for target-test")
        splits = [SplitSpec("source-train", src, exclude_groups=vg, mode="cover")]
        if vg:
            splits.append(SplitSpec("source-val", src, groups=vg, mode="cover"))
        splits += [
            SplitSpec("target-train", tgt, exclude_groups=tg, mode="grid", weak=True),
            SplitSpec("target-test", tgt, groups=tg, mode="grid", weak=True),
        ]
        spec = PrepareSpec("custom", splits, target_gsd=gsd, tile_size=tile_size)
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def report(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = progress.add_task(split, total=total)
            progress.update(tasks[split], completed=done)

        manifest = prepare_dataset(spec, out, overwrite=overwrite, progress=report)
    Console(width=max(Console().width, 120)).print(_counts_table(manifest))
    Console().print(f"manifest: {out / 'manifest.json'}")


@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Option(help="Output folder for the GeoTIFF + GeoJSON demo domains.")],
    scenes: Annotated[int, typer.Option(help="Scenes (rasters) per domain.")] = 4,
    size: Annotated[int, typer.Option(help="Raster side in pixels.")] = 384,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Write the embedded demo domains (leafy_suburb -> arid_carpark) as GeoTIFF + GeoJSON."""
    from data.demo import DemoConfig, write_demo_data

    if scenes < 2:
        raise InputError("--scenes", "need at least 2 scenes per domain (one is held out)")
    write_demo_data(out, DemoConfig(scenes_per_domain=scenes, size_px=size, seed=seed), overwrite=overwrite)
    Console().print(f"demo data: {out}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, print bad input as one line, exit non-zero."""
    apply_offline_settings()
    try:
        app(args=argv, standalone_mode=False)
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 2
    except FileExistsError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 2
    except PermissionError as exc:
        console.print(f"[red]error:[/red] {exc.filename}: permission denied", soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: finished stages are kept; rerun the same command to resume")
        return 130
    except SystemExit as exc:  # typer's own exits (--help, usage errors)
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
