"""What the weak flags could still teach beyond the real-tile labels: the tiles where only the flag put a box.

A flagged target tile keeps its proposals at or above the source-val threshold, or its best one when none
is (``annotation.real_target``: the flag says there is a vehicle). The labels then obey every flag: tiles
flagged empty have no box, every flagged tile has one. An image-level loss ("this tile holds at least one
vehicle") says nothing more on a tile that already has a confident box; it could only replace the box the
flag forced on a tile where no proposal passed the threshold. This script counts those tiles in a finished
adapt run and reads, after the fact, how many of the forced boxes are true vehicles (the truth is read here
only, never by the run)::

    python benchmarks/flag_information.py            # both targets, labels of heat maps round 3

Writes ``benchmarks/results/flag_information.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import use_checkout  # noqa: E402

use_checkout()

RUNS = {"kit": "benchmarks/work/aerial-v1-cpu", "minsk": "benchmarks/work/aerial-v1-minsk-cpu"}
LABELS = ("real-heatmap-r3", "real-self-training-r3")


def forced_boxes(work: Path, labels: str) -> dict:
    """The flag-forced boxes of one label set: how many tiles, and how many of those boxes are true vehicles."""
    import numpy as np

    from aerosynth.annotation.metrics import match_image
    from aerosynth.data.tileset import open_evaluation_split, open_split
    from aerosynth.detection.prediction import predict_split

    summary = json.loads((work / "annotation" / labels / "dataset" / "summary.json").read_text())
    previous = summary["provenance"]["relabels"]  # the round whose seed-0 detector made these labels
    detector = work / "detectors" / f"{previous}+source" / "seed0" / "train" / "detector.pt"
    weak = open_split(work / "tiles" / "target-train")
    proposals = predict_split(detector, weak)
    truth = open_evaluation_split(work / "tiles", "target-train")
    threshold = summary["threshold"]
    forced, true_forced, vehicles_there = 0, 0, 0
    for tile, dets in zip(weak.tiles, proposals, strict=True):
        if not tile.has_vehicle or len(dets) == 0 or float(dets.confidence.max()) >= threshold:
            continue
        forced += 1
        best = dets[int(np.argmax(dets.confidence))]
        gt = truth.labels(tile.tile_id)
        tp, ignored = match_image(best, gt, truth.ignore_regions(tile.tile_id))
        true_forced += int(tp[0] or ignored[0])
        vehicles_there += len(gt)
    return {
        "labels": labels,
        "made_by": str(detector.relative_to(REPO)),
        "threshold": round(threshold, 4),
        "flagged_tiles": summary["flagged_tiles"],
        "boxes": summary["boxes"],
        "tiles_where_only_the_flag_put_a_box": forced,
        "of_those_boxes_true_vehicles": true_forced,
        "true_vehicles_on_those_tiles": vehicles_there,
        "kept_below_threshold_in_summary": summary.get("kept_below_threshold"),
    }


def main() -> int:
    from aerosynth.data.atomic import atomic_write_json

    doc = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": "python benchmarks/flag_information.py",
        "targets": {t: [forced_boxes(REPO / w, name) for name in LABELS] for t, w in RUNS.items()},
    }
    out = REPO / "benchmarks" / "results" / "flag_information.json"
    atomic_write_json(out, doc)
    print(json.dumps(doc["targets"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
