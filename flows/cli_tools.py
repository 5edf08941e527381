"""Single-stage commands: ``generate``, ``annotate``, ``map-quality``, ``train``, ``evaluate``, ``detect``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from aerosynth.data.errors import InputError


def generate(
    model: Annotated[Path, typer.Option(help="A trained model folder (ldm/stageC/model).")],
    out: Annotated[Path, typer.Option(help="The synthetic set folder.")],
    set_name: Annotated[str, typer.Option("--set", help="source_cars, target_cars or target_empty.")],
    domain: Annotated[str, typer.Option(help="Domain named in the prompt.")],
    count: Annotated[int, typer.Option(help="Number of images.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of image 0 (image i uses seed + i).")] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.0,
    scheduler: Annotated[str, typer.Option(help="ddim, dpm, euler or pndm.")] = "ddim",
    shard_size: Annotated[int, typer.Option(help="Images per shard.")] = 32,
    shards: Annotated[str, typer.Option(help="Comma-separated shard numbers to produce (default: all).")] = "",
    raw_maps: Annotated[bool, typer.Option(help="Also save float maps (maps/*.npy).")] = False,
) -> None:
    """Synthesise a set with its cross-attention heat maps (resumable, in shards)."""
    from aerosynth.generation.models import check_ldm_folder
    from aerosynth.generation.sampling import SamplingConfig, generate_set

    check_ldm_folder(model)

    cfg = SamplingConfig(
        steps=steps, guidance_scale=guidance, scheduler=scheduler, shard_size=shard_size, save_raw_maps=raw_maps
    )
    shard_list = [int(s) for s in shards.split(",") if s] or None
    path = generate_set(model, out, set_name, domain, count, base_seed=seed, config=cfg, shards=shard_list)
    Console().print(f"synthetic set: {path}")


def annotate(
    out: Annotated[Path, typer.Option(help="Output folder of the labelled dataset.")],
    target_sets: Annotated[list[Path], typer.Option("--target-set", help="Synthetic target set(s) to label.")],
    method: Annotated[
        str, typer.Option(help="threshold (heat maps -> boxes) or relay (AGenDA detector relay).")
    ] = "threshold",
    source_set: Annotated[Path | None, typer.Option(help="Synthetic source set with vehicles (relay).")] = None,
    tiles: Annotated[Path | None, typer.Option(help="Prepared tiles with source-train/source-val (relay).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of each relay detector.")] = 30,
) -> None:
    """Turn synthetic images and heat maps into a labelled dataset (YOLO, COCO, GeoJSON, preview)."""
    if method == "threshold":
        from aerosynth.annotation.heatmap_boxes import annotate_direct

        path = annotate_direct(target_sets, out)
    elif method == "relay":
        from aerosynth.annotation.relay import RelayConfig, run_relay

        if source_set is None or tiles is None:
            raise InputError("--source-set/--tiles", "the relay needs a synthetic source set and the prepared tiles")
        path = run_relay(
            tiles / "source-train",
            tiles / "source-val",
            source_set,
            target_sets,
            out,
            RelayConfig(source_epochs=epochs, heatmap_epochs=epochs),
        )
    else:
        raise InputError("--method", f"unknown method {method!r} (threshold or relay)")
    Console().print(f"labelled dataset: {path}")


def map_quality(
    model: Annotated[Path, typer.Option(help="Trained LDM folder (ldm/stageC/model).")],
    tiles: Annotated[Path, typer.Option(help="Prepared tiles folder.")],
    out: Annotated[Path, typer.Option(help="Report JSON.")],
    split: Annotated[
        str, typer.Option(help="A split of TILES: source-val, or target-test (labels via the evaluation API).")
    ] = "source-val",
    noise: Annotated[
        str, typer.Option(help="Timestep(s) of the single pass as fractions of the schedule, e.g. 0.3 or 0.1,0.3,0.5.")
    ] = "0.3",
    limit: Annotated[int | None, typer.Option(help="Score only the first N tiles.")] = None,
    choose_readout: Annotated[
        bool,
        typer.Option(
            "--choose-readout",
            help="Also choose the readout (normalisation, resampling, threshold) with the best AP50 (source only).",
        ),
    ] = False,
    readout: Annotated[
        Path | None,
        typer.Option(help="Also score the readout chosen in this earlier report (made with --choose-readout)."),
    ] = None,
) -> None:
    """Precision, recall and AP50 of heat-map boxes on real labelled tiles (the direct method's quality).

    A target split's boxes are read through the evaluation API only: the scores are a diagnostic. A
    readout is chosen on source-val (``--choose-readout``) and applied to target-test (``--readout``).
    """
    from aerosynth.annotation.map_quality import choose_readout as choose_readout_on
    from aerosynth.annotation.map_quality import evaluate_map_quality, evaluate_map_quality_levels, memoised
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.generation.models import load_ldm
    from aerosynth.generation.real_maps import cars_map_function

    levels = _noise_levels(noise)
    if not (tiles / split / "tiles.json").is_file():
        known = sorted(p.parent.name for p in tiles.glob("*/tiles.json"))
        raise InputError("--split", f"no split {split!r} in {tiles} (there: {', '.join(known) or 'none'})")
    labelled = open_evaluation_split(tiles, split)  # opened once; weak splits get their boxes from evaluation/
    if choose_readout and labelled.info.weak:
        raise InputError("--choose-readout", f"{split} is a target split: readouts are chosen on source tiles only")
    given = _readouts_from_report(readout, levels) if readout is not None else None
    ldm = load_ldm(model)
    fns = {level: memoised(cars_map_function(ldm, labelled.info.domain, noise_fraction=level)) for level in levels}
    report = evaluate_map_quality_levels(labelled, fns, None, limit=limit, only_with_vehicles=False)
    readouts = {}
    for level, fn in fns.items():
        if choose_readout:
            chosen, _ = choose_readout_on(labelled, fn, limit=limit)
            readouts[level] = chosen
        elif given is not None:
            readouts[level] = given[level]
    if readouts:
        report["readout"] = {}
        for level, r in readouts.items():
            scored = evaluate_map_quality(labelled, fns[level], config=r.config, normalise=r.normalise, limit=limit)
            report["readout"][f"{level:g}"] = {
                **r.to_dict(),
                **{k: scored["scores"][k] for k in ("ap50", "precision", "recall")},
                "chosen_on": split if choose_readout else str(readout),
            }
    atomic_write_json(out, report)
    entries = report["by_noise"] if "by_noise" in report else [report]
    for e in entries:
        sc = e["scores"]
        best = e["best_sweep"]
        Console().print(
            f"noise {e['noise']:g}: {report['tiles']} tiles, {report['ground_truth_boxes']} boxes: precision "
            f"{sc['precision']:.3f}  recall {sc['recall']:.3f}  AP50 {sc['ap50']:.3f}  (best fixed threshold "
            f"{best.get('fixed_threshold')}: F1 {best['f1']:.3f})"
        )
    for level, e in (report.get("readout") or {}).items():
        cfg = e["config"]
        Console().print(
            f"noise {level} readout chosen on {e['chosen_on']} ({e['normalise']} maps, x{cfg['upsample']}, threshold "
            f"{cfg['threshold']:g}{', split peaks' if cfg['split_peaks'] else ''}): precision {e['precision']:.3f}  "
            f"recall {e['recall']:.3f}  AP50 {e['ap50']:.3f}"
        )
    if report.get("note"):
        Console().print(report["note"])
    Console().print(f"report: {out}")


def _readouts_from_report(path: Path, levels: list[float]) -> dict:
    """The readouts of an earlier ``map-quality --choose-readout`` report, one per noise level asked for."""
    from aerosynth.annotation.map_quality import MapReadout

    try:
        entries = json.loads(path.read_text()).get("readout") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(path, f"not a map-quality report ({exc})") from None
    if not entries:
        raise InputError(path, "holds no chosen readout (make it with --choose-readout on source-val)")
    out = {}
    for level in levels:
        entry = entries.get(f"{level:g}") or (next(iter(entries.values())) if len(entries) == 1 else None)
        if entry is None:
            raise InputError(path, f"no readout for noise {level:g} (there: {', '.join(entries)})")
        out[level] = MapReadout.from_dict(entry)
    return out


def _noise_levels(text: str) -> list[float]:
    """``--noise`` values: comma-separated fractions of the schedule in (0, 1], no duplicates."""
    levels: list[float] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InputError("--noise", f"{part.strip()!r} is not a number (e.g. 0.3 or 0.1,0.3,0.5)") from None
        if not 0 < value <= 1:
            raise InputError("--noise", f"{value:g} is not in (0, 1]")
        if value in levels:
            raise InputError("--noise", f"{value:g} given twice")
        levels.append(value)
    return levels


def train(
    data: Annotated[
        list[Path], typer.Option("--data", help="Training folder(s): tile split, YOLO folder or synthetic set.")
    ],
    val: Annotated[Path, typer.Option(help="Validation folder for early stopping (never target labels).")],
    out: Annotated[Path, typer.Option(help="Output folder (weights: OUT/detector.pt).")],
    model: Annotated[str, typer.Option(help="Ultralytics model yaml or a local .pt.")] = "yolov8n.yaml",
    epochs: Annotated[int, typer.Option(help="Most epochs.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    imgsz: Annotated[int, typer.Option(help="Image size.")] = 128,
    device: Annotated[str, typer.Option(help="cpu or a CUDA device such as 0.")] = "cpu",
) -> None:
    """Train a detector on one or more labelled folders."""
    from aerosynth.detection.datasets import DatasetSpec
    from aerosynth.detection.prediction import check_detector_file
    from aerosynth.detection.training import DetectorTrainConfig, resolve_model, train_detector

    if Path(model).suffix == ".pt":
        check_detector_file(model)
    resolve_model(model)  # before the output folder is made
    cfg = DetectorTrainConfig(model=model, epochs=epochs, seed=seed, imgsz=imgsz, device=device)
    weights = train_detector(cfg, [DatasetSpec(p) for p in data], DatasetSpec(val), out)
    Console().print(f"detector: {weights}")


def evaluate(
    model: Annotated[Path, typer.Option(help="Trained detector .pt.")],
    tiles: Annotated[Path, typer.Option(help="Prepared tiles folder.")],
    split: Annotated[str, typer.Option(help="Split to evaluate on.")] = "target-test",
    out: Annotated[Path | None, typer.Option(help="Write the metrics JSON here.")] = None,
    imgsz: Annotated[int, typer.Option(help="Image size.")] = 128,
) -> None:
    """COCO AP50, AP50:95 and P/R at the F1-optimal threshold of a detector on a split."""
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.detection.evaluation import evaluate_split
    from aerosynth.detection.prediction import check_detector_file, predict

    check_detector_file(model)
    test = open_evaluation_split(tiles, split)
    result = evaluate_split(test, predict(model, [test.image_path(t.tile_id) for t in test], imgsz=imgsz))
    Console().print(
        f"AP50 {result.ap50:.4f}  AP50:95 {result.ap50_95:.4f}  P {result.precision:.3f}  "
        f"R {result.recall:.3f}  F1 {result.f1:.3f} at conf {result.threshold:.3f}  ({result.n_images} tiles)"
    )
    if out is not None:
        atomic_write_json(out, result.to_dict())


def run_detector(model: Path | None, run: Path | None) -> Path:
    """``--model``, else the detector an adapt run handed over (``RUN/detector.pt``)."""
    if model is not None and run is not None:
        raise InputError("--model", "give --model or --run, not both")
    if model is not None:
        return model
    if run is None:
        raise InputError("--model", "give a detector .pt with --model, or an adapt run folder with --run")
    if not (run / "detector.pt").is_file():
        raise InputError(run, "no detector.pt: not an adapt run folder, or the run has not finished its detectors")
    return run / "detector.pt"


def _windows_progress():
    """A ``progress(done, total)`` callback reporting windows per second and the time left to the stage display."""
    import time

    from aerosynth.flows.progress import advance, format_seconds

    start: list[float] = []

    def report(done: int, total: int) -> None:
        if not start:
            start.extend([time.monotonic(), done])
            return
        rate = (done - start[1]) / max(time.monotonic() - start[0], 1e-9)
        left = format_seconds((total - done) / rate) if rate > 0 else "?"
        advance(done, total, figure=f"{rate:.0f} windows/s, {left} left", unit="windows")

    return report


def detect(
    raster: Annotated[
        list[Path], typer.Argument(help="GeoTIFF/COG, .vrt, a folder of tiles, or several tiles on one pixel grid.")
    ],
    out: Annotated[Path, typer.Option(help="Output .geojson, .geojsonl, .gpkg or .fgb (the raster's CRS); resumable.")],
    model: Annotated[Path | None, typer.Option(help="Trained detector .pt (default: --run's detector.pt).")] = None,
    run: Annotated[
        Path | None, typer.Option(help="An adapt run folder: its recommended detector, RUN/detector.pt.")
    ] = None,
    conf: Annotated[float, typer.Option(help="Lowest confidence kept.")] = 0.25,
    gsd: Annotated[float | None, typer.Option(help="Detector GSD in m/px (default: recorded with the model).")] = None,
    overlap: Annotated[int, typer.Option(help="Overlap of the sliding windows in pixels.")] = 32,
    wgs84: Annotated[bool, typer.Option(help="Write longitude/latitude instead of the raster's CRS.")] = False,
    bands: Annotated[str, typer.Option(help="Band selection, e.g. 3,2,1.")] = "",
    verbose: Annotated[
        bool,
        typer.Option(help="Print ultralytics' and other libraries' output on the terminal, not in .logs/ beside OUT."),
    ] = False,
    workers: Annotated[int, typer.Option(help="Run blocks on N local Dask worker processes (0: this process).")] = 0,
    dask_address: Annotated[str | None, typer.Option(help="Run blocks on the Dask scheduler at this address.")] = None,
    block: Annotated[int, typer.Option(help="Windows per block side (a block is read and detected at once).")] = 8,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads of the detector in this process (default: every core).", min=1)
    ] = None,
) -> None:
    """Sliced detection over a raster of any size, block by block, merged by NMS, streamed to a vector file.

    A killed run resumes from its last finished block row when run again with the same arguments.
    """
    import torch

    from aerosynth.detection.prediction import check_detector_file
    from aerosynth.detection.slicing import detect_raster
    from aerosynth.flows.progress import stage, terminal_output

    model = run_detector(model, run)
    check_detector_file(model)
    band_list = [int(b) for b in bands.split(",")] if bands else None
    # every core by default: torch's own default follows OMP_NUM_THREADS, which importing ultralytics sets to
    # one fewer than the cores (one thread on 2 cores)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or cores)
    logs = out.parent / ".logs"  # hidden: the folder of OUT is the user's own
    with terminal_output(logs, verbose, announce=False), stage(f"detect {raster[0].name}"):
        n = detect_raster(
            raster,
            model,
            out,
            conf=conf,
            target_gsd=gsd,
            overlap=overlap,
            to_wgs84=wgs84,
            bands=band_list,
            block=block,
            workers=workers,
            dask_address=dask_address,
            progress=_windows_progress(),
        )
    Console().print(f"{n} vehicles -> {out}")
