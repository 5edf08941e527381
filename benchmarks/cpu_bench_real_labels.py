"""The adapt flow's heat-map labels of real target-train tiles, from the ``cpu-bench`` LDM stages.

Run after ``aerosynth adapt --preset cpu-bench --until ldm`` (it reads that run's stage models and
tiles). Labels the KIT target-train tiles as the flow's ``annotation/real-heatmap`` step does, with
the default ``heatmap_models: chosen`` (every stage's model at noise 0.1, 0.3, 0.5, the best pair on
real source-val) and with each stage's model alone, then scores the labels against the true boxes
through the evaluation API (a diagnostic read afterwards: nothing is chosen on it). Writes
``benchmarks/results/cpu_bench_real_labels.json``.

    python benchmarks/cpu_bench_real_labels.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "aerial-v1-cpu"
RESULTS = HERE / "results" / "cpu_bench_real_labels.json"
LEVELS = (0.1, 0.3, 0.5)


def main() -> None:
    from aerosynth.annotation.metrics import label_quality as labels_vs_truth  # the paired benchmark's score
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.flows.adapt_annotation import label_real_split

    tiles = WORK / "tiles"
    models = [WORK / "ldm" / f"stage{s}" / "model" for s in "ABC"]
    runs = {"chosen": models, **{f"stage{s}": [m] for s, m in zip("ABC", models, strict=True)}}
    doc: dict = {"tiles": str(tiles.relative_to(HERE.parent)), "noise_levels": list(LEVELS), "runs": {}}
    for name, candidates in runs.items():
        out = WORK / "extra-real-heatmap" / name
        started = time.perf_counter()
        if not (out / "summary.json").is_file():
            label_real_split("heatmap", tiles / "target-train", tiles / "source-val", out, candidates, LEVELS)
        summary = json.loads((out / "summary.json").read_text())
        doc["runs"][name] = {
            "chosen": summary["provenance"]["chosen"],
            "map_sources": summary["provenance"]["map_sources"],
            "threshold": summary["threshold"],
            "boxes": summary["boxes"],
            "labels_vs_true_boxes": labels_vs_truth(out / "labels", tiles),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(name, json.dumps(doc["runs"][name]), flush=True)
    doc["note"] = "label quality is read through the evaluation API after labelling: a diagnostic only"
    atomic_write_json(RESULTS, doc)


if __name__ == "__main__":
    main()
