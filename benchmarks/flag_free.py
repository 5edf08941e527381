"""Flags without an analyst (issue #31 item 3): F_S's derived flags against the true flags, per seed.

For each source-only detector of a finished run folder, :func:`aerosynth.annotation.tile_flags.derive_target_flags`
flags the run's target-train tiles at the threshold chosen on source-val (``--precision``, the default of
``data.flag_precision``), exactly as ``data.flags: none`` does in the flow; the flags are then compared with the
true ones (a tile holds a vehicle when its boxes say so, read here through the evaluation API, never by the
derivation). Writes ``flag_free_flags`` into ``benchmarks/results/flags_only_<target>.json``::

    {"flag_free_flags": {"precision_asked": 0.9, "per_seed": {"5": {"threshold", "source_val": {...},
     "target_train": {"precision", "recall", "f1", "accuracy", "flagged", "tiles", "with_vehicle"}}}, ...}}

    python benchmarks/flag_free.py --run benchmarks/work/scoreboard-minsk --target minsk
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import use_checkout  # noqa: E402

use_checkout()

RESULTS = REPO / "benchmarks" / "results"


def compare(derived: dict[str, bool], truth: dict[str, bool]) -> dict:
    """Tile-level precision, recall, F1 and accuracy of ``derived`` flags against ``truth``."""
    tp = sum(derived[t] and truth[t] for t in truth)
    fp = sum(derived[t] and not truth[t] for t in truth)
    fn = sum(truth[t] and not derived[t] for t in truth)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
        "accuracy": round(sum(derived[t] == truth[t] for t in truth) / len(truth), 4),
        "flagged": sum(derived.values()),
        "tiles": len(truth),
        "with_vehicle": sum(truth.values()),
    }


def main(argv: list[str] | None = None) -> int:
    from aerosynth.annotation.tile_flags import DERIVED_FLAGS_FILE, derive_target_flags
    from aerosynth.data.tileset import open_evaluation_split, read_tiles_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder (tiles/, detectors/)")
    parser.add_argument("--target", required=True, help="names the results file flags_only_<target>.json")
    parser.add_argument("--precision", type=float, default=0.9)
    parser.add_argument("--imgsz", type=int, default=128)
    args = parser.parse_args(argv)
    tiles = args.run / "tiles"
    evaluation = open_evaluation_split(tiles, "target-train")
    truth = {t.tile_id: len(evaluation.labels(t.tile_id)) > 0 for t in evaluation}
    per_seed = {}
    for folder in sorted((args.run / "detectors" / "source-only").glob("seed*"), key=lambda p: int(p.name[4:])):
        weights = folder / "train" / "detector.pt"
        if not weights.is_file():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = derive_target_flags(weights, tiles, Path(tmp) / "tiles", args.precision, imgsz=args.imgsz)
            record = json.loads((out / DERIVED_FLAGS_FILE).read_text())
            derived = {t.tile_id: t.has_vehicle for t in read_tiles_file(out / "target-train")[1]}
        per_seed[folder.name.removeprefix("seed")] = {
            "threshold": record["source_val"]["threshold"],
            "source_val": record["source_val"],
            "target_train": compare(derived, truth),
        }
        print(folder.name, json.dumps(per_seed[folder.name.removeprefix("seed")]["target_train"]), flush=True)
    path = RESULTS / f"flags_only_{args.target}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["flag_free_flags"] = {
        "what": "target-train flags derived from each seed's source-only detector (data.flags: none), against "
        "the true flags; threshold chosen on source-val for tile-level precision",
        "command": f"python benchmarks/flag_free.py --run {args.run} --target {args.target}",
        "run": str(args.run),
        "precision_asked": args.precision,
        "per_seed": per_seed,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
