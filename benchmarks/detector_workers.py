"""Detectors of one adapt run on two Dask workers against one after another: wall time and identical metrics.

Four source-only detectors (seeds 0-3; 2 epochs of 640 source-train tiles, batch 32, the reference recipe,
one torch thread each) on the tiles of the ``cpu-bench`` run, submitted as the adapt flow submits them
(``train_and_evaluate_task.submit`` on the run's task runner): once with the sequential runner, once
on a Dask ``LocalCluster`` of two single-threaded workers. Writes ``benchmarks/results/detector_workers.json``.

    python benchmarks/detector_workers.py          # needs benchmarks/work/aerial-v1-cpu/tiles
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
DETECTION = {
    "epochs": int(os.environ.get("EPOCHS", 2)),
    "batch": 32,
    "max_train_images": 640,
    "recipe": "reference",
    "patience": 100,
}


def main() -> int:
    from prefect import flow

    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.offline import apply_offline_settings
    from aerosynth.flows.adapt import _resolve, train_and_evaluate_task, variants
    from aerosynth.flows.config import build_config
    from aerosynth.flows.scale import shared_api, task_runner

    apply_offline_settings()
    if not (TILES / "manifest.json").is_file():
        sys.exit(f"{TILES}: no tiles; run `aerosynth adapt --preset cpu-bench --until tiles` first")

    @flow(name="detector-workers")
    def detectors(doc: dict) -> list[str]:
        cfg = build_config(doc)
        source_only = variants(cfg, TILES, {}, {})[0]
        return [
            str(p)
            for p in _resolve(
                [train_and_evaluate_task.submit(cfg, WORK / doc["runner"], TILES, source_only, s) for s in SEEDS]
            )
        ]

    doc: dict = {"detectors": len(SEEDS), "detection": DETECTION, "runs": {}}
    metrics = {}
    runners = os.environ.get("RUNNERS", "sequential,processes").split(",")
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
    doc["machine"] = "2 CPU cores; Dask LocalCluster of 2 single-threaded workers vs one thread in process"
    atomic_write_json(REPO / "benchmarks" / "results" / "detector_workers.json", doc)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
