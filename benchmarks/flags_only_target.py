"""A user-like target without boxes: the images, ``groups.json`` and a ``flags.json`` made from the boxes.

The people aerosynth is for have no boxes for their region, only one flag per tile. This script makes
such a folder (``OUT/<domain folder name>``) from a labelled YOLO domain, outside the product: images
linked (never copied into the repository), ``groups.json`` copied, and ``flags.json`` computed from the
YOLO boxes per tile the way
``aerosynth data prepare`` cuts target tiles (resampled by ``--scale``, a grid of ``--tile-size`` tiles
from the top-left corner, a tile has a vehicle when a box of a vehicle class has at least half its area
in it). The cutting is written again here, from the rule, rather than imported, so that ``--check`` is a
test of the product::

    python benchmarks/flags_only_target.py --check     # Minsk, as preset aerial-v1-minsk cuts it

With ``--check`` it prepares the target twice with ``aerosynth data prepare`` (from its boxes, and from
the flags-only folder; a tiny source, which the target splits do not depend on) and compares the target
splits' ``tiles.json`` and content hashes; it prints the counts and writes
``benchmarks/results/flags_only_target.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AEROSYNTH_SHARED", REPO.parent / "shared"))
MINSK = SHARED / "data" / "aerial" / "minsk_drone"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: preset aerial-v1-minsk: Minsk resampled by 0.48 to 0.125 m/px; its target groups
MINSK_SCALE, MINSK_TRAIN, MINSK_TEST, MINSK_EXCLUDE = 0.48, "DJI_0005", "DJI-00760,DJI_0762,DJI_0013", "photos"


def tile_flags(
    width: int, height: int, boxes: list[tuple[float, float, float, float]], scale: float, tile_size: int
) -> dict[tuple[int, int], bool]:
    """``(x0, y0) -> has a vehicle`` for the grid tiles of one image; boxes in original pixels (x1, y1, x2, y2)."""
    nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
    sx, sy = nw / width, nh / height
    scaled = [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in boxes]
    out = {}
    for y0 in range(0, (nh // tile_size) * tile_size, tile_size):
        for x0 in range(0, (nw // tile_size) * tile_size, tile_size):
            flag = False
            for x1, y1, x2, y2 in scaled:
                area = (x2 - x1) * (y2 - y1)
                ix = max(0.0, min(x2, x0 + tile_size) - max(x1, x0))
                iy = max(0.0, min(y2, y0 + tile_size) - max(y1, y0))
                if area > 0 and ix * iy / area >= 0.5 - 1e-9:
                    flag = True
                    break
            out[(x0, y0)] = flag
    return out


def yolo_boxes(label: Path, width: int, height: int, classes: set[int]) -> list[tuple[float, float, float, float]]:
    """Boxes of the vehicle classes of a YOLO label file, in pixels (no file: no box)."""
    if not label.is_file():
        return []
    boxes = []
    for line in label.read_text(encoding="utf-8-sig").splitlines():
        parts = line.split()
        if not parts:
            continue
        cls, cx, cy, bw, bh = int(float(parts[0])), *map(float, parts[1:5])
        if cls in classes:
            boxes.append(((cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width, (cy + bh / 2) * height))
    return boxes


def flags_from_boxes(domain: Path, scale: float, tile_size: int, classes: set[int]) -> dict[str, bool]:
    """``flags.json`` of a YOLO domain: tile id ``<stem>_<x0>_<y0>`` -> has a vehicle, every grid tile."""
    flags = {}
    for image in sorted((domain / "images").iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES or image.name.startswith("."):
            continue
        with Image.open(image) as im:
            width, height = im.size
        boxes = yolo_boxes(domain / "labels" / f"{image.stem}.txt", width, height, classes)
        for (x0, y0), flag in tile_flags(width, height, boxes, scale, tile_size).items():
            flags[f"{image.stem}_{x0}_{y0}"] = flag
    return flags


def write_flags_only_target(
    domain: Path, out: Path, scale: float, tile_size: int, classes: set[int], copy: bool = False
) -> dict[str, bool]:
    """Make ``out``: ``images/`` (links to ``domain``'s, or copies), ``groups.json``, ``flags.json``; no labels."""
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    for image in sorted((domain / "images").iterdir()):
        if image.suffix.lower() in IMAGE_SUFFIXES and not image.name.startswith("."):
            dst = out / "images" / image.name
            shutil.copy(image, dst) if copy else dst.symlink_to(image.resolve())
    if (domain / "groups.json").is_file():
        shutil.copy(domain / "groups.json", out / "groups.json")
    flags = flags_from_boxes(domain, scale, tile_size, classes)
    (out / "flags.json").write_text(json.dumps(flags, indent=1, sort_keys=True) + "\n")
    return flags


def _prepare(target: Path, out: Path, target_gsd: float, tile_size: int, classes: str | None) -> dict:
    cmd = [
        sys.executable, "-m", "aerosynth.flows.cli", "data", "prepare",
        "--source", str(REPO / "tests" / "data" / "yolo_domain"), "--source-gsd", "0.125",
        "--target", str(target), "--target-gsd", str(target_gsd), "--gsd", "0.125", "--tile-size", str(tile_size),
        "--train-groups", MINSK_TRAIN, "--test-groups", MINSK_TEST, "--exclude-groups", MINSK_EXCLUDE,
        "--out", str(out), *(["--classes", classes] if classes else []),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads((out / "manifest.json").read_text())


def check(domain: Path, flags_dir: Path, scale: float, tile_size: int, classes: str) -> dict:
    """Prepare the target from its boxes and from the flags-only folder; compare the target splits."""
    work = Path(tempfile.mkdtemp(prefix="flags_only_check_"))
    target_gsd = 0.125 * scale  # a custom target's scale is its gsd / the tiles' gsd
    try:
        boxes = _prepare(domain, work / "boxes", target_gsd, tile_size, classes)
        flags = _prepare(flags_dir, work / "flags", target_gsd, tile_size, None)  # no boxes: no classes
        result = {"scale": scale, "tile_size": tile_size, "splits": {}}
        for split in ("target-train", "target-test"):
            a = json.loads((work / "boxes" / split / "tiles.json").read_text())
            b = json.loads((work / "flags" / split / "tiles.json").read_text())
            fa = {t["tile_id"]: t["has_vehicle"] for t in a["tiles"]}
            fb = {t["tile_id"]: t["has_vehicle"] for t in b["tiles"]}
            result["splits"][split] = {
                "tiles": len(fa),
                "with_vehicle_from_boxes": sum(fa.values()),
                "with_vehicle_from_flags": sum(fb.values()),
                "same_tile_ids": sorted(fa) == sorted(fb),
                "flags_differ": sum(fa[k] != fb.get(k) for k in fa),
                "same_tiles_json": a == b,
                "same_content_sha256": boxes["splits"][split]["content_sha256"]
                == flags["splits"][split]["content_sha256"],
                "flag_sources": flags["splits"][split].get("flag_sources"),
            }
        pairs = (("from boxes", boxes), ("from flags", flags))
        result["target_boxes"] = {k: m.get("target_boxes", True) for k, m in pairs}  # absent: the target has boxes
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domain", type=Path, default=MINSK, help="a YOLO domain with boxes (read in place)")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "aerosynth_flags_only",
        help="the target folder is OUT/<domain folder name> (the same domain name as the boxes' target)",
    )
    ap.add_argument("--scale", type=float, default=MINSK_SCALE, help="resampling factor to the tiles' GSD")
    ap.add_argument("--tile-size", type=int, default=128)
    ap.add_argument("--classes", default="0,1", help="vehicle classes of the YOLO labels")
    ap.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    ap.add_argument("--check", action="store_true", help="prepare from boxes and from flags, compare")
    args = ap.parse_args()
    if not (args.domain / "images").is_dir():
        sys.exit(f"{args.domain}: no images/ folder (set AEROSYNTH_SHARED or --domain)")
    if math.isclose(args.scale, 0) or args.scale < 0:
        sys.exit("--scale must be positive")
    classes = {int(c) for c in args.classes.split(",")}
    target = args.out / args.domain.resolve().name
    flags = write_flags_only_target(args.domain, target, args.scale, args.tile_size, classes, args.copy)
    print(f"{target}: {len(flags)} tiles flagged, {sum(flags.values())} with a vehicle")
    if args.check:
        result = check(args.domain, target, args.scale, args.tile_size, args.classes)
        print(json.dumps(result, indent=1))
        (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
        (REPO / "benchmarks" / "results" / "flags_only_target.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
