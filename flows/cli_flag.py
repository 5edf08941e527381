"""``aerosynth flag``: the local flagging page where analysts mark target tiles "vehicle" or "empty"."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from aerosynth.data.errors import InputError

console = Console(stderr=True)


def flag(
    target: Annotated[
        Path, typer.Argument(help="Target folder (images/ or GeoTIFFs) or COCO json, as given to data prepare.")
    ],
    gsd: Annotated[float, typer.Option(help="Tile ground sample distance, m/px (as data prepare --gsd).")] = 0.125,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels (as data prepare --tile-size).")] = 128,
    target_gsd: Annotated[
        float | None, typer.Option(help="m/px of plain target images (as data prepare --target-gsd).")
    ] = None,
    bands: Annotated[str, typer.Option(help="Band selection for rasters, e.g. 3,2,1.")] = "",
    port: Annotated[int, typer.Option(help="Port of the page (0: a free one).")] = 0,
    host: Annotated[str, typer.Option(help="Address to listen on (the local machine by default).")] = "127.0.0.1",
    sample: Annotated[
        float,
        typer.Option(
            help="Show a seeded random share of the tiles, e.g. 0.25; data.unflagged: derived in the adapt config "
            "lets the source-only detector flag the rest (skip: leaves them out)."
        ),
    ] = 1.0,
) -> None:
    """A local page to flag the target's tiles as vehicle or empty, saved to flags.json after every change."""
    # The tiles are the ones `data prepare` cuts with the same --gsd and --tile-size, and what the page writes is
    # what `data prepare` and `adapt` read. Flagging resumes where it stopped; one page per folder at a time.
    from aerosynth.flows.flag_page import FlagSession, FolderLock, flags_folder, make_server, serve_flag_page

    if not target.exists():
        raise InputError(target, "target not found (a folder with images/, a folder of GeoTIFFs, or a COCO json)")
    if gsd <= 0 or tile_size < 8:
        raise InputError("--gsd/--tile-size", "need a positive --gsd and a --tile-size of at least 8 px")
    if not 0 < sample <= 1:
        raise InputError("--sample", f"a share of the tiles in (0, 1], got {sample}")
    band_list = [int(b) for b in bands.split(",")] if bands else None
    with FolderLock(flags_folder(target)):
        console.print(f"listing the tiles of {target} ({tile_size} px at {gsd} m/px) ...", highlight=False)
        session = FlagSession(target, gsd, tile_size, target_gsd, band_list, sample)
        server = make_server(session, host, port)
        address, bound = server.server_address[:2]
        counts = session.counts()
        shown = f" (a random {sample:.0%} of {session.all_tiles})" if sample < 1 else ""
        console.print(
            f"{counts['total']} tiles{shown}, {counts['done']} flagged; saving to {session.flags_path}",
            highlight=False,
        )
        # stdout, flushed: scripts (and tests) read the address from this line
        print(f"flagging page: http://{address}:{bound}/ (Ctrl-C stops)", flush=True)
        serve_flag_page(server)
    counts = session.counts()
    console.print(f"stopped: {counts['done']} of {counts['total']} tiles flagged in {session.flags_path}")
    if sample < 1:
        console.print(
            f"the other {session.all_tiles - counts['total']} tiles are unflagged: `data: {{unflagged: derived}}` in "
            "the adapt config lets the source-only detector flag them, `{unflagged: skip}` leaves them out"
        )
