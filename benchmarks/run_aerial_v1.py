"""Protocol aerial-v1 end to end on this machine, and its figures as JSON.

Run from the repository root (in the background; rerunning resumes where it stopped):

    nohup python benchmarks/run_aerial_v1.py > benchmarks/work/aerial-v1.log 2>&1 &

It runs the adapt flow with the ``cpu-bench`` preset on ``../shared/data/aerial`` (work folder
``benchmarks/work/aerial-v1-cpu``, git-ignored), then writes
``benchmarks/results/aerial-v1-independent/aerial-v1.json`` (AP50 per variant and seed, gap closure,
mean ± std, per-stage wall time and peak memory, the commit) and copies the run's report (markdown and
PNGs) to ``benchmarks/results/aerial-v1-independent/aerial-v1-report/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(work: Path, config: dict, wall_seconds: float | None) -> dict:
    """The figures of a finished run folder."""
    report = json.loads((work / "report" / "report.json").read_text())
    stages = {}
    for rec in sorted(work.rglob("stage_done.json")):
        doc = json.loads(rec.read_text())
        stages[str(rec.parent.relative_to(work))] = {
            "seconds": doc.get("seconds"),
            "peak_rss_mb": doc.get("peak_rss_mb"),
        }
    variants = {}
    for row in report["variants"]:
        variants[row["variant"]] = {
            "role": row["role"],
            "ap50_mean": row["ap50"]["mean"],
            "ap50_std": row["ap50"]["std"],
            "ap50_per_seed": [s["ap50"] for s in row.get("per_seed", [])],
            "ap50_95_mean": row["ap50_95"]["mean"],
            "gap_closure": (row.get("gap_closure") or {}).get("mean") if row.get("gap_closure") else None,
            "seeds": row.get("seeds"),
        }
    return {
        "protocol": "aerial-v1",
        "preset": "cpu-bench",
        "commit": commit(),
        "machine": "2 CPU cores, no GPU",
        "variants": variants,
        "stages": stages,
        "stage_seconds_total": round(sum(s["seconds"] or 0 for s in stages.values()), 1),
        "wall_seconds_this_invocation": wall_seconds,
        "config": config,
    }


def copy_report(src: Path, dest: Path) -> None:
    """Copy a run's report for committing: PNG figures stored with a 256-colour palette (about 1/4 the bytes)."""
    from aerosynth.data.imageio import read_rgb, write_png

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    for png in sorted(dest.glob("*.png")):
        write_png(png, read_rgb(png), palette=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / "work" / "aerial-v1-cpu")
    parser.add_argument("--collect-only", action="store_true", help="only rewrite the JSON from a finished run")
    args = parser.parse_args(argv)

    from aerosynth.data.offline import apply_offline_settings

    apply_offline_settings()
    from aerosynth.flows.config import load_config

    cfg = load_config(preset="cpu-bench", overrides={"work_dir": str(args.work_dir)})
    doc = cfg.model_dump(mode="json")
    wall = None
    if not args.collect_only:
        from aerosynth.flows.adapt import adapt_flow

        t0 = time.perf_counter()
        adapt_flow(doc)
        wall = round(time.perf_counter() - t0, 1)
    results = collect(args.work_dir, doc, wall)
    out = REPO / "benchmarks" / "results" / "aerial-v1-independent"
    out.mkdir(parents=True, exist_ok=True)
    (out / "aerial-v1.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    copy_report(args.work_dir / "report", out / "aerial-v1-report")
    print(json.dumps({k: v["ap50_mean"] for k, v in results["variants"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
