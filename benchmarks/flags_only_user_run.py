"""Minsk played as a user: imagery and flags only, one `aerosynth adapt`, the detector scored afterwards.

Issue #31's cost goal. A user has the Minsk images and one flag per tile, no box. This script, outside the
product:

1. writes that user's target folder from the Minsk boxes (``benchmarks/flags_only_target.py``: images linked,
   ``groups.json``, ``flags.json``) under ``benchmarks/work/flags_only/``;
2. runs ``aerosynth adapt --config benchmarks/configs/flags_only_minsk.yaml`` (the ``cpu-bench`` preset on
   Madison -> that folder, the LDM included, the defaults a run without target boxes takes: one seed, the
   handed-over recipe's stages and rounds), timed;
3. scores what it handed over, ``WORK/detector.pt``, and its source-only detector on the Minsk target-test
   tiles *with* their boxes (``aerosynth data prepare --preset aerial-v1-minsk``, then ``aerosynth evaluate``):
   the run itself never saw a box;
4. writes ``benchmarks/results/flags_only_minsk.json`` (``user_run``: wall time, AP50, the variant handed
   over, and the full run's seed-0 figure of the same recipe from ``adapt_flow_minsk*.json``).

    python benchmarks/flags_only_user_run.py            # resumes: a finished run is only scored again
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from flags_only_target import MINSK, MINSK_SCALE, write_flags_only_target  # noqa: E402

CONFIG = REPO / "benchmarks" / "configs" / "flags_only_minsk.yaml"
TARGET = REPO / "benchmarks" / "work" / "flags_only" / "minsk_drone"
TILES_WITH_BOXES = REPO / "benchmarks" / "work" / "flags_only" / "minsk-tiles-with-boxes"
RESULTS = REPO / "benchmarks" / "results"


def _work_dir() -> Path:
    from aerosynth.flows.config import load_config

    return REPO / load_config(CONFIG).work_dir


def _ap50(model: Path) -> float:
    """AP50 of a detector on the Minsk target-test tiles with their boxes (``aerosynth evaluate``)."""
    out = TILES_WITH_BOXES.parent / f"eval-{model.parent.parent.name}-{model.parent.name}.json"
    cmd = ["aerosynth", "evaluate", "--model", str(model), "--tiles", str(TILES_WITH_BOXES), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO)
    return round(json.loads(out.read_text())["ap50"], 4)


def _full_run_seed0(variant: str) -> dict:
    """The same variant's seed-0 AP50 in the committed full runs (every seed, every comparison)."""
    found = {}
    for name in ("adapt_flow_minsk.json", "adapt_flow_minsk_flagged.json"):
        path = RESULTS / name
        if path.is_file():
            row = json.loads(path.read_text())["variants"].get(variant)
            if row and "0" in row["per_seed"]:
                found[name] = row["per_seed"]["0"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="start the run over")
    args = parser.parse_args(argv)
    if not (MINSK / "images").is_dir():
        sys.exit(f"{MINSK}: no Minsk imagery (set AEROSYNTH_SHARED)")
    if not (TARGET / "flags.json").is_file():
        flags = write_flags_only_target(MINSK, TARGET, MINSK_SCALE, 128, {0, 1})
        print(f"{TARGET}: {len(flags)} tiles flagged, {sum(flags.values())} with a vehicle", flush=True)
    work = _work_dir()
    log = REPO / "benchmarks" / "work" / "flags_only_minsk.log"
    cmd = ["aerosynth", "adapt", "--config", str(CONFIG.relative_to(REPO)), *(["--fresh"] if args.fresh else [])]
    started = time.perf_counter()
    with open(log, "a") as out:
        rc = subprocess.call(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    wall = round(time.perf_counter() - started, 1)
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    if not (TILES_WITH_BOXES / "manifest.json").is_file():
        prepare = ["aerosynth", "data", "prepare", "--preset", "aerial-v1-minsk", "--out", str(TILES_WITH_BOXES)]
        subprocess.run(prepare, check=True, cwd=REPO)
    handed = json.loads((work / "detector.json").read_text())
    report = json.loads((work / "report" / "report.json").read_text())
    previous = (
        json.loads((RESULTS / "flags_only_minsk.json").read_text())
        if (RESULTS / "flags_only_minsk.json").is_file()
        else {}
    )
    source_only = {}
    for seed_dir in sorted((work / "detectors" / "source-only").glob("seed*")):
        source_only[seed_dir.name.removeprefix("seed")] = _ap50(seed_dir / "train" / "detector.pt")
    stage_seconds = {
        str(p.parent.relative_to(work)): round(json.loads(p.read_text()).get("seconds", 0.0), 1)
        for p in sorted(work.rglob("stage_done.json"))
    }
    doc = {
        **previous,
        "what": "Minsk as a user has it (images and flags.json, no box), one `aerosynth adapt`; scored afterwards "
        "on the Minsk target-test boxes, which the run never read",
        "source_only": source_only,
        "user_run": {
            "command": " ".join(cmd),
            "machine": "2 CPU cores",
            "wall_s": wall if not previous.get("user_run") or args.fresh else previous["user_run"]["wall_s"],
            "stage_seconds": stage_seconds,
            "variant": handed["variant"],
            "seed": handed.get("seed"),
            "ap50": _ap50(work / "detector.pt"),
            "detectors_trained": sorted(
                str(p.relative_to(work / "detectors")) for p in (work / "detectors").glob("*/seed*")
            ),
            "report_first_line": (work / "report" / "report.md").read_text().splitlines()[0],
            "wall_time": report.get("wall_time"),
            "full_run_seed0": _full_run_seed0(handed["variant"]),
        },
    }
    # every detector of the run: its flag-level figures (the run's, on the held-out flags) against its AP50 on
    # the boxes (read here); a ranking probe of one seed, not the variants x seeds
    detectors = {}
    for row in report["flag_scores"]["variants"]:
        seed_dir = work / "detectors" / row["variant"] / "seed0"
        detectors[row["variant"]] = {
            "tile_ap": row["tile_ap"]["mean"],
            "auroc": row["auroc"]["mean"],
            "ap50": source_only["0"] if row["variant"] == "source-only" else _ap50(seed_dir / "train" / "detector.pt"),
        }
    doc["user_run"]["detectors"] = detectors
    if len(detectors) >= 3:
        from aerosynth.detection.flag_scores import spearman

        doc["user_run"]["rank_probe_spearman"] = round(
            spearman({k: v["tile_ap"] for k, v in detectors.items()}, {k: v["ap50"] for k, v in detectors.items()}), 3
        )
    if re.search(r"-r\d+\+source$", handed["variant"]) is None:
        doc["user_run"]["note"] = "the run handed over no relabelling round"
    (RESULTS / "flags_only_minsk.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["user_run"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
