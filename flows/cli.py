"""The ``aerosynth`` command line (typer + rich).

Every command applies the offline settings first, prints progress it can measure, and turns
bad input into one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from aerosynth.data.errors import InputError
from aerosynth.data.offline import apply_offline_settings

app = typer.Typer(
    help="aerosynth: adapt aerial vehicle detectors to unseen regions with generated data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Prepare tile datasets and the embedded demo data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)


class _CurrentStream:
    """A file that writes to whatever ``sys.stdout`` or ``sys.stderr`` is at the moment of writing."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _target(self):
        return getattr(sys, self._name, None)

    def write(self, text: str) -> int:
        target = self._target()
        return len(text) if target is None else target.write(text)

    def flush(self) -> None:
        target = self._target()
        if target is not None:
            target.flush()

    def isatty(self) -> bool:
        target = self._target()
        return target is not None and target.isatty()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._target(), name)


_STDOUT = _CurrentStream("stdout")
_STDERR = _CurrentStream("stderr")


def _unbind_log_handlers(call_streams: tuple) -> None:
    """Point log handlers bound to this call's stdout/stderr at the current streams instead.

    Libraries configure logging once per process, on first import, with handlers bound to the
    ``sys.stderr``/``sys.stdout`` of that moment (Prefect's console handler on the root logger, its
    ``ext://sys.stderr`` handlers, ultralytics' logger). When ``main`` runs in-process with redirected
    streams (pytest's capsys, typer's CliRunner), those streams are closed after the call, and every later
    log line in the process would fail on them. Prefect's own stream handlers always follow ``sys.stderr``.
    """
    outs = (call_streams[0], sys.stdout)
    errs = (call_streams[1], sys.stderr)
    loggers = [logging.getLogger(), *list(logging.Logger.manager.loggerDict.values())]
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", ())):
            if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
                continue
            stream = handler.stream
            if stream is _STDOUT or stream is _STDERR:
                continue
            if any(stream is s for s in outs):
                follow = _STDOUT
            elif any(stream is s for s in errs) or type(handler).__module__.startswith("prefect."):
                follow = _STDERR
            else:
                continue
            handler.acquire()
            try:
                handler.stream = follow  # not setStream: that flushes the old stream, which may be closed
                rich_console = getattr(handler, "console", None)  # PrefectConsoleHandler prints through rich
                if isinstance(rich_console, Console):
                    rich_console.file = follow
            finally:
                handler.release()


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


@data_app.command("prepare")
def data_prepare(
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    preset: Annotated[
        str | None, typer.Option(help="aerial-v1 (Madison -> KIT), aerial-v1-minsk (Madison -> Minsk) or demo.")
    ] = None,
    aerial_root: Annotated[Path | None, typer.Option(help="Folder with the aerial-v1 domains.")] = None,
    source: Annotated[
        Path | None, typer.Option(help="Source domain: YOLO folder, GeoTIFF folder or COCO json.")
    ] = None,
    target: Annotated[Path | None, typer.Option(help="Target domain (its boxes become weak flags).")] = None,
    source_gsd: Annotated[float | None, typer.Option(help="Source m/px (plain images).")] = None,
    target_gsd: Annotated[float | None, typer.Option(help="Target m/px (plain images).")] = None,
    val_groups: Annotated[str, typer.Option(help="Comma-separated source groups for source-val.")] = "",
    test_groups: Annotated[str, typer.Option(help="Comma-separated target groups for target-test.")] = "",
    train_groups: Annotated[
        str, typer.Option(help="Comma-separated target groups for target-train (default: all but the test groups).")
    ] = "",
    exclude_groups: Annotated[str, typer.Option(help="Comma-separated target groups used by neither split.")] = "",
    bands: Annotated[str, typer.Option(help="Band selection for rasters, e.g. 3,2,1.")] = "",
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 128,
    gsd: Annotated[float, typer.Option(help="Target ground sample distance, m/px.")] = 0.125,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Resample, tile and split domains into the normalised tile dataset (prints counts, writes manifest.json)."""
    from aerosynth.data.prepare import prepare_dataset
    from aerosynth.data.presets import AERIAL_V1_PRESETS

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
    from aerosynth.data.demo import DemoConfig, write_demo_data

    if scenes < 2:
        raise InputError("--scenes", "need at least 2 scenes per domain (one is held out)")
    write_demo_data(out, DemoConfig(scenes_per_domain=scenes, size_px=size, seed=seed), overwrite=overwrite)
    Console().print(f"demo data: {out}")


def _print_ap50_table(report_md: Path) -> None:
    import json

    doc = json.loads((report_md.parent / "report.json").read_text())
    table = Table(title="AP50 on target-test (COCO, IoU 0.5)")
    for col in ("variant", "role", "seeds", "AP50", "gap closure"):
        table.add_column(col, justify="left" if col in ("variant", "role") else "right")
    for row in doc.get("variants", []):
        ap = row["ap50"]
        gap = row.get("gap_closure")
        table.add_row(
            row["variant"],
            row["role"],
            str(row["seeds"]),
            f"{ap['mean']:.3f}" + (f" ± {ap['std']:.3f}" if row["seeds"] > 1 else ""),
            "" if not gap or gap.get("mean") is None else f"{gap['mean']:.2f}",
        )
    Console(width=max(Console().width, 100)).print(table)


def _run_adapt(
    config_path: Path | None,
    preset: str | None,
    work_dir: Path | None,
    fresh: bool,
    runner: str | None = None,
    dask_address: str | None = None,
) -> Path:
    import shutil

    from aerosynth.flows.adapt import run_adapt
    from aerosynth.flows.config import load_config

    overrides: dict = {"work_dir": str(work_dir)} if work_dir is not None else {}
    if runner is not None:
        overrides["runner"] = runner
    if dask_address is not None:
        overrides["runner"] = "dask"
        overrides["dask_address"] = dask_address
    cfg = load_config(config_path, preset=preset, overrides=overrides)
    if cfg.torch_threads:  # also for this process's own training (on a busy machine one thread beats two)
        import torch

        torch.set_num_threads(cfg.torch_threads)
    if fresh and cfg.work_dir.exists():
        shutil.rmtree(cfg.work_dir)
    report = run_adapt(cfg)
    _print_ap50_table(report)
    Console().print(f"report: {report}")
    return report


@app.command("demo")
def demo(
    work_dir: Annotated[Path, typer.Option(help="Run folder (kept: a rerun skips finished stages).")] = Path(
        "runs/demo"
    ),
    fresh: Annotated[bool, typer.Option(help="Delete the run folder first.")] = False,
    quick: Annotated[
        bool, typer.Option(help="The smallest run (smoke preset): checks an install in a minute.")
    ] = False,
) -> None:
    """The main job: the whole adapt flow on the embedded demo domains (CPU, a few minutes)."""
    if quick and work_dir == Path("runs/demo"):
        work_dir = Path("runs/smoke")
    report = _run_adapt(None, "smoke" if quick else "demo", work_dir, fresh)
    Console(soft_wrap=True).print(_demo_note(report, quick), highlight=False, markup=False)


def _demo_note(report_md: Path, quick: bool = False) -> str:
    """What the demo's AP50 table means, in a few lines, and where the report is."""
    import json

    doc = json.loads((report_md.parent / "report.json").read_text())
    split = doc.get("split", {})
    ap = {row["variant"]: row["ap50"]["mean"] for row in doc.get("variants", [])}
    lines = [
        f"What the table means: AP50 of each detector on the {split.get('tiles', '?')} {split.get('name', 'test')} "
        f"tiles of {split.get('domain', 'the target domain')}, whose boxes no detector trained on. source-only learnt "
        f"the source domain only (AP50 {ap.get('source-only', 0.0):.3f}); the oracle learnt the target-train boxes, "
        f"the ceiling (AP50 {ap.get('oracle', 0.0):.3f}); the other rows learnt from synthetic images of the demo's "
        "tiny diffusion model, trained for seconds on a CPU, so they show that each route runs, not what AGenDA "
        "gains (README: aerial-v1).",
    ]
    if quick:
        lines.append("--quick trains every model for a step or two: its figures are near zero by design.")
    lines.append(f"Report (AP50 table, PR curves, prediction grid, synthetic samples): {report_md}")
    return "\n".join(lines)


@app.command("adapt")
def adapt(
    config: Annotated[Path | None, typer.Option(help="YAML config (see flows/config.py and configs/).")] = None,
    preset: Annotated[str | None, typer.Option(help="demo, cpu-bench or gpu (a config file may name one).")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Override the config's work_dir.")] = None,
    fresh: Annotated[bool, typer.Option(help="Delete the run folder first.")] = False,
    runner: Annotated[
        str | None, typer.Option(help="sequential or dask (a LocalCluster unless --dask-address).")
    ] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="Scheduler of an existing Dask cluster, tcp://host:8786.")
    ] = None,
) -> None:
    """Run the adapt flow: tiles -> LDM stages -> synthesis -> annotation -> detectors -> report."""
    if config is None and preset is None:
        raise InputError("--config", "give a config file or --preset")
    if runner not in (None, "sequential", "dask"):
        raise InputError("--runner", f"unknown runner {runner!r} (sequential or dask)")
    _run_adapt(config, preset, work_dir, fresh, runner, dask_address)


@app.command("generate")
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


@app.command("annotate")
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


@app.command("map-quality")
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
) -> None:
    """Precision, recall and AP50 of heat-map boxes on real labelled tiles (the direct method's quality).

    A target split's boxes are read through the evaluation API only: the scores are a diagnostic.
    """
    from aerosynth.annotation.map_quality import evaluate_map_quality_levels
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.generation.models import load_ldm
    from aerosynth.generation.real_maps import cars_map_function

    levels = _noise_levels(noise)
    if not (tiles / split / "tiles.json").is_file():
        known = sorted(p.parent.name for p in tiles.glob("*/tiles.json"))
        raise InputError("--split", f"no split {split!r} in {tiles} (there: {', '.join(known) or 'none'})")
    labelled = open_evaluation_split(tiles, split)  # opened once; weak splits get their boxes from evaluation/
    ldm = load_ldm(model)
    fns = {level: cars_map_function(ldm, labelled.info.domain, noise_fraction=level) for level in levels}
    report = evaluate_map_quality_levels(labelled, fns, out, limit=limit, only_with_vehicles=False)
    entries = report["by_noise"] if "by_noise" in report else [report]
    for e in entries:
        sc = e["scores"]
        best = e["best_sweep"]
        Console().print(
            f"noise {e['noise']:g}: {report['tiles']} tiles, {report['ground_truth_boxes']} boxes: precision "
            f"{sc['precision']:.3f}  recall {sc['recall']:.3f}  AP50 {sc['ap50']:.3f}  (best fixed threshold "
            f"{best.get('fixed_threshold')}: F1 {best['f1']:.3f})"
        )
    if report.get("note"):
        Console().print(report["note"])
    Console().print(f"report: {out}")


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


@app.command("train")
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


@app.command("evaluate")
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


@app.command("detect")
def detect(
    raster: Annotated[Path, typer.Argument(help="GeoTIFF to search.")],
    model: Annotated[Path, typer.Option(help="Trained detector .pt.")],
    out: Annotated[Path, typer.Option(help="Output GeoJSON (the raster's CRS).")],
    conf: Annotated[float, typer.Option(help="Lowest confidence kept.")] = 0.25,
    gsd: Annotated[float | None, typer.Option(help="Detector GSD in m/px (default: recorded with the model).")] = None,
    overlap: Annotated[int, typer.Option(help="Overlap of the sliding windows in pixels.")] = 32,
    wgs84: Annotated[bool, typer.Option(help="Write longitude/latitude instead of the raster's CRS.")] = False,
    bands: Annotated[str, typer.Option(help="Band selection, e.g. 3,2,1.")] = "",
) -> None:
    """Sliced detection over a whole GeoTIFF, merged by NMS, written as GeoJSON."""
    from aerosynth.detection.prediction import check_detector_file
    from aerosynth.detection.slicing import detect_raster

    check_detector_file(model)
    band_list = [int(b) for b in bands.split(",")] if bands else None
    n = detect_raster(raster, model, out, conf=conf, target_gsd=gsd, overlap=overlap, to_wgs84=wgs84, bands=band_list)
    Console().print(f"{n} vehicles -> {out}")


@app.command("request")
def request(
    run: Annotated[Path, typer.Option(help="Adapted run folder (WORK of adapt) or a model folder.")],
    domain: Annotated[str, typer.Option(help="Domain style: one the model knows ('source'/'target' with a run).")],
    count: Annotated[int, typer.Option(help="Number of tiles.")],
    name: Annotated[str, typer.Option(help="Request name (letters, digits, _ -); export is OUT/<date>_<name>.")],
    out: Annotated[Path, typer.Option(help="Folder receiving the dated export.")] = Path("exports"),
    vehicles: Annotated[
        bool | None,
        typer.Option(
            "--vehicles/--no-vehicles",
            help="Tiles with vehicles, or empty tiles (default: with; with --real: all tiles).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of tile 0 (tile i uses seed + i); with --real, of the draw.")] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.0,
    detector: Annotated[
        Path | None, typer.Option(help="Label with this detector .pt (conf >= 0.25) instead of heat maps.")
    ] = None,
    real: Annotated[
        str | None,
        typer.Option(
            help="self-training|heatmap: export the run's real target-train tiles with the labels adapt gave "
            "them (annotation/real-<method>/dataset) instead of synthetic tiles; COUNT drawn with SEED."
        ),
    ] = None,
) -> None:
    """N labelled tiles in a domain's style (or the run's real tiles): GeoTIFF, GeoJSON, COCO, YOLO, STAC, preview."""
    if detector is not None:  # before the flow (and Prefect) is imported
        from aerosynth.detection.prediction import check_detector_file

        check_detector_file(detector)
    if real is not None:  # a run without these labels: one error line, before Prefect starts
        from aerosynth.data.real_tiles import real_dataset_dir

        real_dataset_dir(run, real)
    from aerosynth.flows.request import request_flow

    path = request_flow(
        run,
        out,
        name,
        domain,
        count,
        with_vehicles=vehicles,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        detector=detector,
        real=real,
    )
    Console().print(f"export: {path}")


@app.command("retrain")
def retrain(
    registry: Annotated[Path, typer.Option(help="Model registry folder (made on first use with --tiles).")],
    watch: Annotated[Path, typer.Option(help="Watched folder: new GeoTIFFs (+ <stem>.geojson labels, flags.json).")],
    config: Annotated[Path | None, typer.Option(help="YAML adapt config of the re-adaptation.")] = None,
    preset: Annotated[str | None, typer.Option(help="demo, cpu-bench or gpu (default demo without --config).")] = None,
    tiles: Annotated[
        Path | None, typer.Option(help="Prepared tiles: source splits + evaluation split (new registry).")
    ] = None,
    eval_split: Annotated[
        str, typer.Option(help="Evaluation split of --tiles (boxes; never trained on).")
    ] = "target-test",
    baseline: Annotated[
        Path | None, typer.Option(help="Detector .pt made production when the registry has none.")
    ] = None,
    flags: Annotated[str, typer.Option(help="auto (given, else production detector), given or detector.")] = "auto",
    flag_threshold: Annotated[
        float, typer.Option(help="Detector confidence that flags a tile as a vehicle tile.")
    ] = 0.25,
    variant: Annotated[
        str | None, typer.Option(help="Candidate variant (default relay+source, relay, threshold).")
    ] = None,
) -> None:
    """Retrain on new imagery of a watched folder; promote the candidate only if its AP50 is not worse."""
    if baseline is not None:  # before the flows (and Prefect) are imported
        from aerosynth.detection.prediction import check_detector_file

        check_detector_file(baseline)
    from aerosynth.flows.config import load_config
    from aerosynth.flows.registry import version_rows
    from aerosynth.flows.retrain import ensure_registry, run_retrain

    cfg = load_config(config, preset=preset or (None if config else "demo"))
    reg = ensure_registry(registry, tiles, eval_split, baseline, cfg.detection.imgsz, cfg.device)
    result = run_retrain(reg.root, watch, cfg, flags, flag_threshold, variant)
    table = Table(title=f"registry {reg.root} (AP50 on {reg.evaluation.split})")
    for col in ("version", "AP50", "vs production", "promoted", "parent", "run", ""):
        table.add_column(col)

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    for r in version_rows(reg):
        table.add_row(
            r["version"],
            fmt(r["ap50"]),
            fmt(r["production_ap50"]),
            str(r["promoted"]),
            r["parent"] or "",
            r["run"] or "",
            "production" if r["production"] else "",
        )
    Console(width=max(Console().width, 100)).print(table)
    Console().print(result["message"])


@app.command("serve")
def serve(
    config: Annotated[Path | None, typer.Option(help="YAML adapt config the scheduled runs use.")] = None,
    preset: Annotated[str | None, typer.Option(help="Preset when no config is given.")] = "demo",
    watch: Annotated[Path | None, typer.Option(help="Watched folder of the retrain deployment.")] = None,
    registry: Annotated[Path | None, typer.Option(help="Model registry of the retrain deployment.")] = None,
    adapt_cron: Annotated[str, typer.Option(help="Cron schedule of adapt.")] = "0 2 * * 0",
    retrain_cron: Annotated[str, typer.Option(help="Cron schedule of retrain.")] = "0 3 * * *",
) -> None:
    """Register adapt, request and retrain as scheduled deployments on a Prefect server and serve them."""
    from aerosynth.flows.config import load_config
    from aerosynth.flows.deployments import build_deployments, serve_deployments

    if (watch is None) != (registry is None):
        raise InputError("--watch/--registry", "the retrain deployment needs both")
    cfg = load_config(config, preset=None if config else preset)
    deployments = build_deployments(cfg, watch, registry, adapt_cron, retrain_cron)
    Console().print(f"serving {', '.join(d.name for d in deployments)} (Ctrl-C stops)")
    serve_deployments(deployments)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, print bad input as one line, exit non-zero."""
    apply_offline_settings()
    from aerosynth.flows.server_cleanup import mark_owner, stop_orphan_servers

    stop_orphan_servers()  # temporary Prefect servers of earlier runs that were killed
    mark_owner()
    call_streams = (sys.stdout, sys.stderr)
    try:
        app(args=argv, standalone_mode=False)
    except InputError as exc:
        console.print(f"error: {exc}", soft_wrap=True, highlight=False, markup=False, style="red")
        return 2
    except OSError as exc:  # read-only or missing output folder, disk full, existing output ...
        where = exc.filename if exc.filename else None
        text = f"{where}: {(exc.strerror or str(exc)).lower()}" if where else str(exc)
        console.print(f"error: {text}", soft_wrap=True, highlight=False, markup=False, style="red")
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
    finally:
        _unbind_log_handlers(call_streams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
