"""Detection over 1, 4 and 16 km² mosaics at 0.125 m/px: peak memory, wall time, windows per second.

Mosaics of the KIT Munich aerial images (read in place from ``../shared/data/aerial/kit_munich_aerial``),
packed shelf by shelf into one tiled GeoTIFF in UTM 32N at 0.125 m/px, are written under ``--work``
(default ``/tmp/aerosynth-detect-scale``, never the repository). Each size runs
``aerosynth detect MOSAIC --model M --gsd 0.125 --conf C --out cars.geojsonl`` as a child process whose
process tree's resident memory is sampled every 0.2 s. The ceiling is the detector's batched inference on windows
already in memory (``predict`` in batches of 32), measured in the same run: the median of three bursts of 1024
windows. With ``--dask`` the 1 km² mosaic also runs on two local Dask workers (one torch thread each) and its
features are compared with the single process'; the same run records the single process twice, on every core
(``single_wall_s``) and with one thread (``single_1thread_wall_s``: ``--threads 1``, and ``OMP_NUM_THREADS=1`` as
Dask gives each worker): on a machine with as many cores as workers, the default single process already uses
every core, and the one-thread run is one worker's share, the figure a scale-out is measured against.

Usage::

    python benchmarks/detect_scale.py --model /tmp/detect_smoke/detector.pt --sizes 1,4 --dask
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
KIT = REPO.parent / "shared" / "data" / "aerial" / "kit_munich_aerial" / "images"
GSD = 0.125
SIDE_PX = {1: 8000, 4: 16000, 16: 32000}


def build_mosaic(path: Path, side: int) -> Path:
    """A ``side`` x ``side`` tiled GeoTIFF of KIT images packed in shelves (written once)."""
    import rasterio
    from affine import Affine
    from PIL import Image

    if path.is_file():
        return path
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(KIT.glob("*.png"))]
    profile = {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "count": 3,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "photometric": "RGB",
        "crs": "EPSG:32632",
        "transform": Affine(GSD, 0, 690_000.0, 0, -GSD, 5_340_000.0),
        "BIGTIFF": "IF_SAFER",
    }
    tmp = path.with_suffix(".part.tif")
    k = 0
    with rasterio.open(tmp, "w", **profile) as ds:
        y = 0
        while y < side:
            shelf_h = 512
            strip = np.zeros((shelf_h, side, 3), np.uint8)
            x = 0
            while x < side:
                im = images[k % len(images)][:shelf_h]
                k += 1
                w = min(im.shape[1], side - x)
                strip[: im.shape[0], x : x + w] = im[:, :w]
                x += w
            h = min(shelf_h, side - y)
            ds.write(np.moveaxis(strip[:h], -1, 0), window=((y, y + h), (0, side)))
            y += h
    tmp.rename(path)
    return path


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Wall seconds, peak RSS of the process tree (MB) and exit code of a command.

    Args:
        cmd: the command.
        env: variables set for it on top of this process' environment.
    """
    start = time.monotonic()
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode:
        print(out[-3000:], file=sys.stderr)
    return time.monotonic() - start, peak / 2**20, proc.returncode


def ceiling(model: str, mosaic: Path, conf: float, n: int = 1024, bursts: int = 3) -> list[float]:
    """Windows per second of batched inference on windows already in memory, one figure per burst of ``n``."""
    code = f"""
import time, numpy as np, torch
from aerosynth.data.rasters import RasterSource
from aerosynth.detection.prediction import predict
src = RasterSource({str(mosaic)!r})
rgb, _ = src.read(0, 0, 96 * 32 + 32, 96 * {n // 32 - 1} + 128)
wins = [np.ascontiguousarray(rgb[y:y + 128, x:x + 128]) for y in range(0, rgb.shape[0] - 127, 96)
        for x in range(0, rgb.shape[1] - 127, 96)][:{n}]
predict({model!r}, wins[:64], conf={conf}, imgsz=128, max_det=300)
for _ in range({bursts}):
    t = time.monotonic(); predict({model!r}, wins, conf={conf}, imgsz=128, max_det=300)
    print(len(wins) / (time.monotonic() - t))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [round(float(line), 1) for line in out.stdout.strip().splitlines()[-bursts:]]


def features(path: Path) -> list[tuple]:
    rows = []
    with open(path) as f:
        for line in f:
            ring = json.loads(line)["geometry"]["coordinates"][0]
            xs, ys = [p[0] for p in ring], [p[1] for p in ring]
            rows.append((round(min(xs), 4), round(min(ys), 4), round(max(xs), 4), round(max(ys), 4)))
    return sorted(rows)


def detect_cmd(mosaic: Path, model: str, conf: float, out: Path, extra: list[str] | None = None) -> list[str]:
    out.unlink(missing_ok=True)
    for side in (".state.json", ".stream.geojsonl"):
        out.with_name(out.name + side).unlink(missing_ok=True)
    return [
        sys.executable,
        "-m",
        "aerosynth.flows.cli",
        "detect",
        str(mosaic),
        "--model",
        model,
        "--gsd",
        str(GSD),
        "--conf",
        str(conf),
        "--out",
        str(out),
        *(extra or []),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--conf", type=float, default=0.05)
    ap.add_argument("--sizes", default="1,4,16", help="km² sizes: 1, 4, 16")
    ap.add_argument("--dask", action="store_true", help="also time two local Dask workers on 1 km²")
    ap.add_argument("--work", type=Path, default=Path("/tmp/aerosynth-detect-scale"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "detect_scale.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rasters = {r["km2"]: r for r in result.get("rasters", [])}
    result.update({"model": args.model, "conf": args.conf, "cores": psutil.cpu_count(), "tile": 128, "overlap": 32})
    from aerosynth.detection.slicing import BlockGrid

    sizes = [int(s) for s in args.sizes.split(",")]
    for km2 in sizes:
        side = SIDE_PX[km2]
        mosaic = build_mosaic(args.work / f"mosaic_{km2}km2.tif", side)
        out = args.work / f"cars_{km2}km2.geojsonl"
        wall, peak, code = run_measured(detect_cmd(mosaic, args.model, args.conf, out))
        if code:
            raise SystemExit(f"detect failed on {km2} km²")
        windows = BlockGrid(side, side, 128, 32, 8).windows
        rasters[km2] = {
            "km2": km2,
            "pixels": side * side,
            "wall_s": round(wall, 1),
            "peak_rss_mb": round(peak),
            "windows": windows,
            "windows_per_s": round(windows / wall, 1),
            "vehicles": sum(1 for _ in open(out)),
        }
        print(rasters[km2], flush=True)
        result["rasters"] = [rasters[k] for k in sorted(rasters)]
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    first = args.work / "mosaic_1km2.tif"
    bursts = ceiling(args.model, build_mosaic(first, SIDE_PX[1]), args.conf)
    result["ceiling_bursts_windows_per_s"] = bursts
    result["ceiling_windows_per_s"] = float(np.median(bursts))  # one burst's figure moves by a fifth between runs
    print("ceiling", bursts, flush=True)
    if args.dask:
        single_out, dask_out = args.work / "cars_1km2.geojsonl", args.work / "cars_1km2_dask.geojsonl"
        one_thread_out = args.work / "cars_1km2_1thread.geojsonl"
        if 1 in sizes:  # measured above, in this run
            single = rasters[1]["wall_s"]
        else:
            single, _, code = run_measured(detect_cmd(first, args.model, args.conf, single_out))
            if code:
                raise SystemExit("detect failed on 1 km²")
        one_thread_env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # what Dask's nanny gives a worker
        one_thread_cmd = detect_cmd(first, args.model, args.conf, one_thread_out, ["--threads", "1"])
        one_thread, _, code = run_measured(one_thread_cmd, one_thread_env)
        if code:
            raise SystemExit("detect failed on 1 km² with one thread")
        wall, peak, code = run_measured(detect_cmd(first, args.model, args.conf, dask_out, ["--workers", "2"]))
        if code:
            raise SystemExit("detect failed on 1 km² with two Dask workers")
        result["dask"] = {
            "workers": 2,
            "km2": 1,
            "wall_s": round(wall, 1),
            "single_wall_s": round(single, 1),
            "single_1thread_wall_s": round(one_thread, 1),
            "over_single": round(wall / single, 2),
            "over_single_1thread": round(wall / one_thread, 2),
            "peak_rss_mb": round(peak),
            "same_features": features(dask_out) == features(single_out),
            "same_features_1thread": features(one_thread_out) == features(single_out),
        }
        print(result["dask"], flush=True)
    result.update(derived(result))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


def derived(result: dict) -> dict:
    """The goal's ratios from the measured figures: each size's windows per second over the ceiling, 16 over 1 km²."""
    by_km2 = {r["km2"]: r for r in result.get("rasters", [])}
    ceiling_rate = result.get("ceiling_windows_per_s")
    out = {}
    if ceiling_rate:
        out["throughput_over_ceiling"] = {
            str(k): round(r["windows_per_s"] / ceiling_rate, 3) for k, r in sorted(by_km2.items())
        }
    if 1 in by_km2 and 16 in by_km2:
        out["time_16_over_1"] = round(by_km2[16]["wall_s"] / by_km2[1]["wall_s"], 2)
    return out


if __name__ == "__main__":
    main()
