"""Detectors of one adapt run on two Dask workers against one after another: wall time and identical metrics.

Four fine-tuned detectors (the ``continued`` variant, seeds 0-3: one epoch of 1280 source-train tiles from
the ``cpu-bench`` run's source-only detector of seed 0, the reference recipe, one torch thread each),
submitted as the adapt flow submits them (``submit_detectors`` on the run's task runner):
with the sequential runner (one worker process), then on two worker processes (``runner: processes``), then on a Dask
``LocalCluster`` of two single-threaded workers. Writes ``benchmarks/results/detector_workers.json``.

    python benchmarks/detector_workers.py          # after `benchmarks/adapt_flow.py run --target kit`
    RUNNERS=sequential,processes SEEDS=0,1 python benchmarks/detector_workers.py   # a shorter check
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import use_checkout  # noqa: E402

use_checkout()

TILES = REPO / "benchmarks" / "work" / "aerial-v1-cpu" / "tiles"
WORK = REPO / "benchmarks" / "work" / "detector-workers"
SEEDS = tuple(int(s) for s in os.environ.get("SEEDS", "0,1,2,3").split(","))
BASE = REPO / "benchmarks" / "work" / "aerial-v1-cpu" / "detectors" / "source-only" / "seed0"
DETECTION = {"finetune": {"epochs": int(os.environ.get("EPOCHS", 1)), "images": 1280}}


def main() -> int:
    from prefect import flow

    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.offline import apply_offline_settings
    from aerosynth.flows.adapt import resolve, submit_detectors, variants
    from aerosynth.flows.config import build_config
    from aerosynth.flows.scale import shared_api, task_runner

    apply_offline_settings()
    if not (BASE / "stage_done.json").is_file():
        sys.exit(f"{BASE}: no source-only detector; run `benchmarks/adapt_flow.py run --target kit` first")

    @flow(name="detector-workers")
    def detectors(doc: dict) -> list[str]:
        cfg = build_config(doc)
        continued = next(v for v in variants(cfg, TILES, {}, {}) if v.name == "continued")
        work = WORK / doc["runner"]
        return [
            str(p)
            for p in resolve(submit_detectors(cfg, work, TILES, continued, list(SEEDS), dict.fromkeys(SEEDS, BASE)))
        ]

    global OTHER_JOBS
    OTHER_JOBS = _other_jobs()
    doc: dict = {"detectors": len(SEEDS), "detection": DETECTION, "runs": {}}
    metrics = {}
    runners = os.environ.get("RUNNERS", "sequential,processes,dask").split(",")
    for runner in runners:
        shutil.rmtree(WORK / runner, ignore_errors=True)
        cfg = {"preset": "cpu-bench", "work_dir": str(WORK / runner), "runner": runner, "detection": DETECTION}
        t0 = time.perf_counter()
        with shared_api(runner):
            folders = detectors.with_options(task_runner=task_runner(runner, workers=2))(cfg)
        wall = round(time.perf_counter() - t0, 1)
        metrics[runner] = [(Path(f) / "metrics.json").read_bytes() for f in folders]
        doc["runs"][runner] = {
            "wall_s": wall,
            "ap50": [round(json.loads(m)["ap50"], 4) for m in metrics[runner]],
        }
        print(runner, doc["runs"][runner], flush=True)
    for runner in runners[1:]:
        doc[f"{runner}_over_sequential"] = round(doc["runs"][runner]["wall_s"] / doc["runs"]["sequential"]["wall_s"], 3)
        doc[f"{runner}_identical_metrics"] = metrics[runner] == metrics["sequential"]
    doc["machine"] = (
        "2 CPU cores; sequential = one worker process, one detector at a time; processes = 2 worker processes; "
        "dask = a LocalCluster of 2 one-thread workers"
    )
    doc["other_jobs"] = OTHER_JOBS
    atomic_write_json(REPO / "benchmarks" / "results" / "detector_workers.json", doc)
    print(json.dumps(doc, indent=1))
    return 0


OTHER_JOBS: list[str] = []


def _other_jobs() -> list[str]:
    """Other Python jobs on the machine when the benchmark starts (a quiet machine has none)."""
    import subprocess

    ps = subprocess.run(["pgrep", "-af", "python"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if str(os.getpid()) != line.split()[0] and "pgrep" not in line]


if __name__ == "__main__":
    raise SystemExit(main())
