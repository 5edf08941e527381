"""The commands that run a flow: ``demo``, ``adapt``, ``request``, ``retrain``, ``serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from aerosynth.data.errors import InputError

#: ``--verbose`` of the commands that run a flow.
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        help="Print ultralytics', Prefect's and other libraries' output on the terminal, not into a logs/ folder.",
    ),
]


def _print_ap50_table(report_md: Path) -> None:
    import json

    doc = json.loads((report_md.parent / "report.json").read_text())
    if not doc.get("variants") and doc.get("flag_scores"):  # a target without boxes: the flag-level figures
        _print_flag_table(doc["flag_scores"])
        return
    if not doc.get("variants"):  # no boxes, no flags (data.flags: none): nothing scored
        Console().print("no target boxes and no flags: the detectors are not scored (see the report)")
        return
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
            "" if not gap or gap.get("ratio_of_means") is None else _closure_text(gap),
        )
    Console(width=max(Console().width, 100)).print(table)


def _closure_text(gap: dict) -> str:
    """A report row's gap closure (:mod:`aerosynth.detection.closure`): ``1.06 (1.00..1.16)``, or ``1.06``."""
    ci = gap.get("ci95")
    return f"{gap['ratio_of_means']:.2f}" + (f" ({ci[0]:.2f}..{ci[1]:.2f})" if ci else "")


def _print_flag_table(scores: dict) -> None:
    """The flag-level table of a run whose target has no boxes (tile-level AP and AUROC on held-out flags)."""
    split = scores.get("split") or {}
    table = Table(title=f"flag-level figures on {split.get('tiles', '?')} held-out tiles (no target boxes: no AP50)")
    for col in ("variant", "role", "seeds", "tile AP", "AUROC", "vehicles/tile"):
        table.add_column(col, justify="left" if col in ("variant", "role") else "right")

    def fmt(stat: dict | None, digits: int = 3) -> str:
        return "" if not stat or stat.get("mean") is None else f"{stat['mean']:.{digits}f}"

    for row in scores.get("variants", []):
        table.add_row(
            row["variant"],
            row["role"],
            str(row["seeds"]),
            fmt(row.get("tile_ap")),
            fmt(row.get("auroc")),
            fmt(row.get("vehicles_per_tile"), 2),
        )
    Console(width=max(Console().width, 100)).print(table)


def _run_adapt(
    config_path: Path | None,
    preset: str | None,
    work_dir: Path | None,
    fresh: bool,
    runner: str | None = None,
    dask_address: str | None = None,
    until: str | None = None,
    wait: bool = False,
    verbose: bool = False,
) -> Path:
    from aerosynth.flows.adapt import check_until, run_adapt
    from aerosynth.flows.config import load_config
    from aerosynth.flows.progress import terminal_output
    from aerosynth.flows.run_lock import clear_work_folder, work_lock

    check_until(until, "--until")  # before the config is read or the flow starts

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
    with work_lock(cfg.work_dir, wait=wait):  # before --fresh empties the folder: one run per work folder
        if fresh:
            clear_work_folder(cfg.work_dir)
        with terminal_output(Path(cfg.work_dir) / "logs", verbose):
            report = run_adapt(cfg, until)
    if until is not None:
        Console().print(f"stopped after {until}: {report}")
        return report
    _print_ap50_table(report)
    Console().print(f"report: {report}")
    return report


def demo(
    work_dir: Annotated[
        Path | None,
        typer.Option(help="Run folder, kept: a rerun skips finished stages (runs/demo; runs/smoke with --quick)."),
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Delete the run folder first.")] = False,
    quick: Annotated[
        bool, typer.Option(help="The smallest run (smoke preset): checks an install in a minute.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="If another run uses the run folder, wait for it to end.")] = False,
    verbose: Verbose = False,
) -> None:
    """The main job: the whole adapt flow on the embedded demo domains (CPU, a few minutes)."""
    if work_dir is None:  # a folder typed by the user is kept, even runs/demo with --quick
        work_dir = Path("runs/smoke" if quick else "runs/demo")
    report = _run_adapt(None, "smoke" if quick else "demo", work_dir, fresh, wait=wait, verbose=verbose)
    Console(soft_wrap=True).print(_demo_note(report, quick), highlight=False, markup=False)


def _demo_note(report_md: Path, quick: bool = False) -> str:
    """The demo's AP50 table read in one line (computed from the run's figures), and where the report is."""
    import json

    doc = json.loads((report_md.parent / "report.json").read_text())
    split = doc.get("split") or {}
    ap = {row["variant"]: row["ap50"]["mean"] for row in doc.get("variants", [])}
    closures = {row["variant"]: row.get("gap_closure") for row in doc.get("variants", [])}
    source, oracle = ap.get("source-only", 0.0), ap.get("oracle", 0.0)
    where = (
        f"on the {split.get('tiles', '?')} {split.get('name', 'test')} tiles of "
        f"{split.get('domain', 'the target domain')}, whose boxes no detector trained on"
    )
    plain = ("source-only", "continued", "oracle", "oracle-paired")
    adapted = [v for v in ap if v.startswith("real-")] or [v for v in ap if v not in plain]
    if not adapted:
        reading = f"Reading: {where}, source-only reaches AP50 {source:.3f} and the oracle {oracle:.3f}."
    else:
        name = adapted[0]
        gain = ap[name] - source
        gap = closures.get(name) or {}  # the report's closure (aerosynth.detection.closure)
        closure = (
            f", {gap['ratio_of_means']:.0%} of the way to the oracle"
            if oracle - source > 0.05 and gap.get("ratio_of_means") is not None
            else ""
        )
        verdict = (
            f"adaptation lifts it to {ap[name]:.3f} ({gain:+.3f}{closure})"
            if gain >= 0.05
            else f"adaptation does not clearly help on this run ({ap[name]:.3f}, {gain:+.3f})"
        )
        labels = (
            "the real target tiles labelled by F_S's boxes and their weak vehicle/no-vehicle flags"
            if name == "real-self-training+source"
            else "target data labelled without target boxes"
        )
        reading = (
            f"Reading: {where}, the source-only detector F_S reaches AP50 {source:.3f}; fine-tuned on {labels} "
            f"({name}), {verdict}; the oracle, fine-tuned on the true target boxes, shows the ceiling ({oracle:.3f})."
        )
    lines = [reading]
    if quick:
        lines.append("--quick trains every model for a step or two: its figures are near zero by design.")
    lines.append(f"Report (AP50 table, PR curves, prediction grid, synthetic samples): {report_md}")
    return "\n".join(lines)


def adapt(
    config: Annotated[Path | None, typer.Option(help="YAML config (see flows/config.py and configs/).")] = None,
    preset: Annotated[
        str | None, typer.Option(help="demo, cpu-bench, cpu-bench-minsk or gpu (a config file may name one).")
    ] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Override the config's work_dir.")] = None,
    fresh: Annotated[bool, typer.Option(help="Delete the run folder first.")] = False,
    runner: Annotated[
        str | None,
        typer.Option(
            help="sequential, processes (local worker processes) or dask (a LocalCluster unless --dask-address)."
        ),
    ] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="Scheduler of an existing Dask cluster, tcp://host:8786.")
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="Stop after this step: tiles, ldm, synthetic or annotation (a later run resumes)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="If another run uses the work folder, wait for it to end.")] = False,
    verbose: Verbose = False,
) -> None:
    """Run the adapt flow: tiles -> LDM stages -> synthesis -> annotation -> detectors -> report."""
    if config is None and preset is None:
        raise InputError("--config", "give a config file or --preset")
    if runner not in (None, "sequential", "processes", "dask"):
        raise InputError("--runner", f"unknown runner {runner!r} (sequential, processes or dask)")
    _run_adapt(config, preset, work_dir, fresh, runner, dask_address, until, wait, verbose)


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
            help="detector|self-training|heatmap|fused: export the run's real target-train tiles instead of synthetic "
            "tiles, labelled by the run's detector.pt (detector, recommended) or as adapt labelled them; "
            "COUNT drawn with SEED."
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """N labelled tiles in a domain's style (or the run's real tiles): GeoTIFF, GeoJSON, COCO, YOLO, STAC, preview."""
    if detector is not None:  # before the flow (and Prefect) is imported
        from aerosynth.detection.prediction import check_detector_file

        check_detector_file(detector)
    if real is not None:  # a run without these labels: one error line, before Prefect starts
        from aerosynth.data.real_tiles import real_dataset_dir, run_detector

        run_detector(run) if real == "detector" else real_dataset_dir(run, real)
    from aerosynth.flows.progress import stage, terminal_output
    from aerosynth.flows.request import request_flow
    from aerosynth.flows.scale import shared_api

    # shared_api: the temporary Prefect server in a session of its own, so Ctrl-C stops the request in order
    with shared_api("sequential"), terminal_output(out / ".logs", verbose), stage(f"request/{name}"):
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


def retrain(
    registry: Annotated[Path, typer.Option(help="Model registry folder (made on first use with --tiles).")],
    watch: Annotated[
        Path, typer.Option(help="Watched folder: new GeoTIFFs (+ <stem>.geojson labels, flags.json / flags.csv).")
    ],
    config: Annotated[Path | None, typer.Option(help="YAML adapt config of the re-adaptation.")] = None,
    preset: Annotated[str | None, typer.Option(help="demo, cpu-bench or gpu (default demo without --config).")] = None,
    tiles: Annotated[
        Path | None, typer.Option(help="Prepared tiles: source splits + evaluation split (new registry).")
    ] = None,
    eval_split: Annotated[
        str, typer.Option(help="Evaluation split of --tiles (boxes; never trained on).")
    ] = "target-test",
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="Detector .pt made production when the registry has none, or an adapt run folder (its detector.pt)."
        ),
    ] = None,
    flags: Annotated[str, typer.Option(help="auto (given, else production detector), given or detector.")] = "auto",
    flag_threshold: Annotated[
        float, typer.Option(help="Detector confidence that flags a tile as a vehicle tile.")
    ] = 0.25,
    variant: Annotated[
        str | None,
        typer.Option(
            help="Candidate variant (default: the first of real-self-training+source, relay+source, "
            "threshold+source, translation+source that the config makes)."
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="If another retrain uses the registry, wait for it to end.")] = False,
    verbose: Verbose = False,
) -> None:
    """Retrain on new imagery of a watched folder; promote the candidate only if its AP50 is not worse."""
    if baseline is not None:  # before the flows (and Prefect) are imported
        from aerosynth.detection.prediction import check_detector_file

        if baseline.is_dir():  # an adapt run: the detector it handed over
            baseline = baseline / "detector.pt"

        check_detector_file(baseline)
    from aerosynth.detection.promotion import ensure_registry
    from aerosynth.detection.registry import version_rows
    from aerosynth.flows.config import load_config
    from aerosynth.flows.retrain import run_retrain

    cfg = load_config(config, preset=preset or (None if config else "demo"))
    reg = ensure_registry(registry, tiles, eval_split, baseline, cfg.detection.imgsz, cfg.device)
    from aerosynth.flows.progress import terminal_output

    with terminal_output(reg.root / "logs", verbose):
        result = run_retrain(reg.root, watch, cfg, flags, flag_threshold, variant, wait=wait)
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
