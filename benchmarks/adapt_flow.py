"""The adapt flow as a user runs it, on aerial-v1 (Munich) and its Minsk item: wall time and every detector's AP50.

One code path: this script only runs ``aerosynth adapt`` (a subprocess, the console script) and reads what
the run wrote. Figures go to ``benchmarks/results/adapt_flow_<target>.json``::

    {"target", "command", "wall_s", "recommended", "variants": {NAME: {"kind", "per_seed", ...}}, ...}

Real-tile variants carry the precision/recall/F1 of their labels against the true target-train boxes
(``labels``), read here after the run through the evaluation API: nothing in the run reads them.

    python benchmarks/adapt_flow.py run --target kit            # aerosynth adapt --preset cpu-bench
    python benchmarks/adapt_flow.py run --target minsk          # aerosynth adapt --preset cpu-bench-minsk
    python benchmarks/adapt_flow.py collect --target kit        # the JSON again from a finished run
    python benchmarks/adapt_flow.py run --target kit --config benchmarks/configs/X.yaml   # an experiment

A rerun resumes: every finished stage of the run folder is skipped (the wall time is then that of the
rerun; ``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import use_checkout  # noqa: E402

use_checkout()

PRESETS = {"kit": "cpu-bench", "minsk": "cpu-bench-minsk"}
RESULTS = REPO / "benchmarks" / "results"


def run_dir(config_path: Path | None, target: str, work_dir: str | None) -> Path:
    from aerosynth.flows.config import load_config

    cfg = load_config(config_path, preset=None if config_path else PRESETS[target])
    return REPO / (work_dir or cfg.work_dir)


def run(args: argparse.Namespace) -> dict:
    """``aerosynth adapt`` for one target, timed; then :func:`collect`."""
    cmd = ["aerosynth", "adapt"]
    cmd += ["--config", str(args.config)] if args.config else ["--preset", PRESETS[args.target]]
    if args.work_dir:
        cmd += ["--work-dir", args.work_dir]
    if args.runner:
        cmd += ["--runner", args.runner]
    if args.fresh:
        cmd.append("--fresh")
    wall = run_logged(cmd, REPO / "benchmarks" / "work" / f"adapt_flow_{args.target}.log", "adapt_flow")
    return collect(args, command=shlex.join(cmd), wall_s=wall)


def run_logged(cmd: list[str], log: Path, script: str) -> float:
    """Run ``cmd`` from the repository root, its output appended to ``log``; its wall time in seconds.

    Exits with one line naming ``script``, the command and the log when it fails.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(cmd), f"> {log.relative_to(REPO)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as out:
        rc = subprocess.call(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    if rc != 0:
        sys.exit(f"{script}: `{shlex.join(cmd)}` failed ({rc}); see {log}")
    return round(time.perf_counter() - t0, 1)


def collect(args: argparse.Namespace, command: str | None = None, wall_s: float | None = None) -> dict:
    """The run folder's detectors, per variant and seed, with paired statistics; written as JSON."""
    import numpy as np

    from aerosynth.annotation.metrics import label_quality
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.detection.closure import gap_closure
    from aerosynth.flows.adapt_detection import MIX_BUDGET_SUFFIX, variant_kind

    work = run_dir(args.config, args.target, args.work_dir)
    out = Path(args.out) if args.out else RESULTS / f"adapt_flow_{args.target}.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    table: dict = {}
    for folder in sorted((work / "detectors").iterdir()):
        per_seed = {}
        for seed_dir in sorted(folder.glob("seed*")):
            metrics = seed_dir / "metrics.json"
            if metrics.is_file():
                per_seed[seed_dir.name.removeprefix("seed")] = round(json.loads(metrics.read_text())["ap50"], 4)
        if per_seed:
            table[folder.name] = {"kind": variant_kind(folder.name), "per_seed": per_seed}
    base = table.get("source-only", {}).get("per_seed", {})
    oracle = table.get("oracle", {}).get("per_seed", {})
    for name, row in table.items():
        vals = np.array(list(row["per_seed"].values()))
        row["mean"] = round(float(vals.mean()), 4)
        row["std"] = round(float(vals.std(ddof=1)), 4) if len(vals) > 1 else 0.0
        if name != "source-only" and base:
            diffs = {s: v - base[s] for s, v in row["per_seed"].items() if s in base}
            row["above_source_only_on_every_seed"] = bool(diffs) and all(d > 0 for d in diffs.values())
            if name != "oracle" and oracle:
                row["closure"] = gap_closure(row["per_seed"], base, oracle).to_dict()
        dataset = work / "annotation" / name.removesuffix("+source") / "dataset"
        if row["kind"] == "real" and (dataset / "labels").is_dir():
            row["labels"] = label_quality(dataset / "labels", work / "tiles")
            agreement = dataset.parent / "agreement.json"
            if agreement.is_file():  # a self-training round: how far its labels moved from the round before
                row["agreement_with_previous_round"] = json.loads(agreement.read_text())
        if row["kind"] in ("synthetic", "baseline"):
            row["two_sample_accuracy"] = _two_sample(work, name.removesuffix("+source"), previous, row)
    handed = json.loads((work / "detector.json").read_text()) if (work / "detector.json").is_file() else {}
    recommended = handed.get("variant")
    references = ["continued", "oracle", "copy-paste+source", recommended]
    for name, row in table.items():
        budget = MIX_BUDGET_SUFFIX.search(name)  # a mix of its own budget: also against the others of that budget
        same_budget = [n for n in table if budget and n.endswith(budget.group())]
        row["paired"] = {
            ref: stats
            for ref in [*references, *same_budget]
            if ref and ref != name and ref in table and (stats := _paired(row["per_seed"], table[ref]["per_seed"]))
        }
    against = getattr(args, "against", None)
    if against:  # the same variants of another run (e.g. made with another option): paired by seed
        other = json.loads(Path(against).read_text())["variants"]
        for name, row in table.items():
            if name in other and (stats := _paired(row["per_seed"], other[name]["per_seed"])):
                row["paired"][f"{name} in {Path(against).name}"] = stats
    adapted = [n for n, r in table.items() if r["kind"] not in ("source-only", "oracle", "control")]
    picked_best = {}
    for seed in base:
        scores = {n: table[n]["per_seed"][seed] for n in adapted if seed in table[n]["per_seed"]}
        if scores and recommended in scores:
            picked_best[seed] = scores[recommended] == max(scores.values())
    config = json.loads(json.dumps(__import__("yaml").safe_load((work / "config.yaml").read_text())))
    parts = previous.get("wall_s_parts") or ([previous["wall_s"]] if previous.get("wall_s") else [])
    if wall_s is not None:
        parts = [wall_s] if getattr(args, "fresh", False) else [*parts, wall_s]
    doc = {
        "target": args.target,
        "command": command or previous.get("command"),
        "wall_s": round(sum(parts), 1) if parts else None,
        "wall_s_parts": parts,
        "machine": f"{os.cpu_count()} CPU cores",
        "recommended": recommended,
        "recommended_how": handed.get("how_chosen"),
        "recommended_was_best_adapted_per_seed": picked_best,
        "variants": table,
        "stage_seconds": _stage_seconds(work),
        "two_sample_floor": _two_sample_floor(work),
        "detection": config.get("detection"),
        "ldm": {k: config["generation"].get(k) for k in ("model", "init_model")},
    }
    atomic_write_json(out, doc)
    print(json.dumps({n: (r["kind"], r["mean"], r["per_seed"]) for n, r in table.items()}, indent=1))
    return doc


def _paired(values: dict, reference: dict) -> dict | None:
    """Per-seed differences ``values - reference`` on their common seeds: mean, 95 % t-interval, seeds above."""
    from scipy import stats

    diffs = [values[s] - reference[s] for s in values if s in reference]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    sem = stats.sem(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * sem) if sem > 0 else 0.0
    return {
        "seeds": len(diffs),
        "mean_diff": round(mean, 4),
        "ci95": [round(mean - half, 4), round(mean + half, 4)],
        "seeds_above": sum(d > 0 for d in diffs),
        "seeds_at_or_above": sum(d >= 0 for d in diffs),
    }


#: Seeds of the two-sample classifier: its held-out part is ~100 images a class, so one seed moves by ~0.04.
TWO_SAMPLE_SEEDS = (0, 1, 2)


def _two_sample(work: Path, name: str, previous: dict, row: dict) -> float | None:
    """Two-sample accuracy of a synthetic or baseline set against the real target-train tiles flagged with
    vehicles (0.5: indistinguishable): from the run's diagnostics for the sets it checks, else measured here
    (classifier seed 0; every seed of :data:`TWO_SAMPLE_SEEDS` goes to ``row["two_sample_accuracy_seeds"]``)."""
    diagnostics = work / "diagnostics" / "diagnostics.json"
    sets = json.loads(diagnostics.read_text())["sets"] if diagnostics.is_file() else {}
    source = {"threshold": "target_cars", "relay": "target_cars"}.get(name, name)
    if source in sets and sets[source].get("two_sample") is not None:
        return sets[source]["two_sample"]["accuracy"]
    folder = work / "annotation" / name / "dataset"
    if not (folder / "images").is_dir():
        return previous.get("variants", {}).get(f"{name}+source", {}).get("two_sample_accuracy")
    per_seed = _two_sample_seeds(work, sorted((folder / "images").glob("*.png")))
    row["two_sample_accuracy_seeds"] = per_seed
    return per_seed[0]


def _two_sample_seeds(work: Path, images: list[Path]) -> list[float]:
    """Held-out accuracy of the two-sample classifier, ``images`` against the target-train tiles flagged
    with a vehicle, for each seed of :data:`TWO_SAMPLE_SEEDS`."""
    from aerosynth.data.tileset import open_split
    from aerosynth.detection.two_sample import two_sample_accuracy

    target = open_split(work / "tiles" / "target-train")
    real = [target.image_path(t.tile_id) for t in target if t.has_vehicle]
    return [round(two_sample_accuracy(real, images, seed=s)["accuracy"], 4) for s in TWO_SAMPLE_SEEDS]


def _two_sample_floor(work: Path) -> dict:
    """The two-sample test's floor for sets drawn on empty tiles: *real* target-train tiles flagged empty
    against those flagged with a vehicle (the scenes differ, not the rendering)."""
    from aerosynth.data.tileset import open_split

    target = open_split(work / "tiles" / "target-train")
    empty = [target.image_path(t.tile_id) for t in target if not t.has_vehicle]
    if len(empty) < 8:
        return {}
    seeds = _two_sample_seeds(work, empty)
    return {"what": "real target-train tiles flagged empty vs flagged with a vehicle", "seeds": seeds}


def _stage_seconds(work: Path) -> dict:
    """Seconds each stage of the run took (from its stage records), the detectors summed per variant."""
    out: dict = {}
    for rec in sorted(work.rglob("stage_done.json")):
        name = str(rec.parent.relative_to(work))
        key = name.rsplit("/seed", 1)[0] if name.startswith("detectors/") else name
        out[key] = round(out.get(key, 0.0) + json.loads(rec.read_text()).get("seconds", 0.0), 1)
    return out


def _closure_text(closure: dict) -> str:
    from aerosynth.detection.closure import GapClosure

    ci = closure.get("ci95")
    return GapClosure(closure["ratio_of_means"], tuple(ci) if ci else None, tuple(closure["seeds"])).fmt()


def recompute_closure(paths: list[Path]) -> None:
    """Rewrite the closure of every variant of committed results JSON from their per-seed figures.

    The one closure (:mod:`aerosynth.detection.closure`) replaces the mean of per-seed ratios
    (``gap_closure_mean``) that files written before it carry; nothing else in the files changes.
    """
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.detection.closure import gap_closure

    for path in paths:
        doc = json.loads(path.read_text())
        variants = doc["variants"]
        base = variants.get("source-only", {}).get("per_seed", {})
        oracle = variants.get("oracle", {}).get("per_seed", {})
        for name, row in variants.items():
            row.pop("gap_closure_mean", None)
            if name not in ("source-only", "oracle") and base and oracle:
                row["closure"] = gap_closure(row["per_seed"], base, oracle).to_dict()
        atomic_write_json(path, doc)
        print(path.name, {n: r["closure"]["ratio_of_means"] for n, r in variants.items() if "closure" in r})


def table() -> str:
    """Markdown: one row per variant, one column per target, from the committed JSON files."""
    docs = {t: json.loads(p.read_text()) for t in PRESETS if (p := RESULTS / f"adapt_flow_{t}.json").is_file()}
    names: list[str] = []
    for doc in docs.values():
        names += [n for n in doc["variants"] if n not in names]
    lines = [
        "| variant (kind) | " + " | ".join(f"{t}: AP50 mean (per seed)" for t in docs) + " |",
        "|---" * (len(docs) + 1) + "|",
    ]
    for name in names:
        cells = []
        for doc in docs.values():
            row = doc["variants"].get(name)
            if row is None:
                cells.append("")
                continue
            per = ", ".join(f"{v:.3f}" for v in row["per_seed"].values())
            extra = f"; closure {_closure_text(row['closure'])}" if row.get("closure") else ""
            if "labels" in row:
                extra += f"; labels P {row['labels']['precision']:.2f} R {row['labels']['recall']:.2f}"
            cells.append(f"{row['mean']:.3f} ({per}){extra}")
        kind = next(d["variants"][name]["kind"] for d in docs.values() if name in d["variants"])
        lines.append(f"| `{name}` ({kind}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "collect"):
        p = sub.add_parser(name)
        p.add_argument("--target", choices=sorted(PRESETS), required=True)
        p.add_argument("--config", type=Path, help="a config file instead of the target's preset")
        p.add_argument("--work-dir", help="the run folder (default: the preset's)")
        p.add_argument("--out", help="the JSON written (default benchmarks/results/adapt_flow_<target>.json)")
        p.add_argument("--against", help="another run's JSON: each variant also paired with its namesake there")
        if name == "run":
            p.add_argument("--runner", choices=["sequential", "dask"])
            p.add_argument("--fresh", action="store_true")
    sub.add_parser("table", help="markdown table of the committed JSON files")
    p = sub.add_parser("closure", help="rewrite the closure of results JSON files from their per-seed figures")
    p.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "table":
        print(table())
    elif args.cmd == "closure":
        recompute_closure(args.results)
    else:
        run(args) if args.cmd == "run" else collect(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
