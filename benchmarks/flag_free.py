"""Flags without an analyst (issue #31 item 3): F_S's derived flags against the true flags, per seed.

For each source-only detector of a finished run folder, :func:`aerosynth.annotation.tile_flags.derive_target_flags`
flags the run's target-train tiles at the threshold chosen on source-val (``--precision``, the default of
``data.flag_precision``), exactly as ``data.flags: none`` does in the flow; the flags are then compared with the
true ones (a tile holds a vehicle when its boxes say so, read here through the evaluation API, never by the
derivation). Writes ``flag_free_flags`` into ``benchmarks/results/flags_only_<target>.json``::

    {"flag_free_flags": {"precision_asked": 0.9, "per_seed": {"5": {"threshold", "source_val": {...},
     "target_train": {"precision", "recall", "f1", "accuracy", "flagged", "tiles", "with_vehicle"}}}, ...}}

    python benchmarks/flag_free.py --run benchmarks/work/scoreboard-minsk --target minsk

``--collect RUN`` reads a finished ``data.flags: none`` adapt run instead (``configs/flag_free_<target>.yaml``): the
handed-over variant's AP50 per seed, against the flagged scoreboard run's (``results/scoreboard_<target>.json``,
same seeds, same recipe, the true flags) and source-only, and the share of the flagged recipe's gain kept, as a
ratio of means over the shared seeds (the goal: at least 0.5). Writes ``flag_free`` (seed -> AP50) and
``flag_free_gain``::

    python benchmarks/flag_free.py --collect benchmarks/work/flag-free-minsk --target minsk
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import fmean

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


def true_flags(tiles: Path, split: str) -> dict[str, bool]:
    """Tile id -> "holds a vehicle" from the split's boxes (ignore regions left out), through the evaluation API."""
    from aerosynth.data.tileset import open_evaluation_split

    boxes = open_evaluation_split(tiles, split)
    return {t.tile_id: len(boxes.labels(t.tile_id)) > 0 for t in boxes}


def collect(run: Path, target: str) -> dict:
    """The flag-free run's handed-over AP50 per seed against the flagged scoreboard's, and the gain kept."""
    from aerosynth.annotation.tile_flags import DERIVED_FLAGS_FILE
    from aerosynth.data.tileset import read_tiles_file

    board = json.loads((RESULTS / f"scoreboard_{target}.json").read_text())
    handed = json.loads((run / "detector.json").read_text())
    variant = handed["from"].split("/")[1]
    if variant != board["handed_over"]["variant"]:
        raise SystemExit(f"{run} handed over {variant}, the scoreboard {board['handed_over']['variant']}")
    flag_free = {}
    for metrics in sorted((run / "detectors" / variant).glob("seed*/metrics.json")):
        flag_free[metrics.parent.name.removeprefix("seed")] = round(json.loads(metrics.read_text())["ap50"], 4)
    seeds = [s for s in flag_free if s in board["handed_over"]["per_seed"]]
    so = [board["source_only"]["per_seed"][s] for s in seeds]
    flagged = [board["handed_over"]["per_seed"][s] for s in seeds]
    free = [flag_free[s] for s in seeds]
    truth = true_flags(run / "tiles", "target-train")
    derived = {t.tile_id: t.has_vehicle for t in read_tiles_file(run / "tiles-flagged" / "target-train")[1]}
    record = json.loads((run / "tiles-flagged" / DERIVED_FLAGS_FILE).read_text())
    return {
        "flag_free": flag_free,
        "flag_free_gain": {
            "what": "handed-over AP50 with data.flags: none (every target-train flag derived by the first seed's "
            "F_S) against the same recipe on the true flags (the scoreboard run, same seeds) and source-only; "
            "gain kept = (mean flag-free - mean source-only) / (mean flagged - mean source-only)",
            "command": f"aerosynth adapt --config benchmarks/configs/flag_free_{target}.yaml; "
            f"python benchmarks/flag_free.py --collect {run} --target {target}",
            "variant": variant,
            "seeds": [int(s) for s in seeds],
            "source_only": dict(zip(seeds, so, strict=True)),
            "flagged": dict(zip(seeds, flagged, strict=True)),
            "flag_free": dict(zip(seeds, free, strict=True)),
            "gain_kept": round((fmean(free) - fmean(so)) / (fmean(flagged) - fmean(so)), 3),
            "gain_kept_per_seed": {
                s: round((f - o) / (g - o), 3) for s, f, o, g in zip(seeds, free, so, flagged, strict=True)
            },
            "beats_source_only_every_seed": all(f > o for f, o in zip(free, so, strict=True)),
            "derived_flags": {"threshold": record["source_val"]["threshold"], **compare(derived, truth)},
        },
    }


def main(argv: list[str] | None = None) -> int:
    from aerosynth.annotation.tile_flags import DERIVED_FLAGS_FILE, derive_target_flags
    from aerosynth.data.tileset import read_tiles_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run folder (tiles/, detectors/)")
    parser.add_argument("--collect", type=Path, help="a finished data.flags: none adapt run to collect")
    parser.add_argument("--target", required=True, help="names the results file flags_only_<target>.json")
    parser.add_argument("--precision", type=float, default=0.9)
    parser.add_argument("--imgsz", type=int, default=128)
    args = parser.parse_args(argv)
    if args.collect:
        path = RESULTS / f"flags_only_{args.target}.json"
        doc = json.loads(path.read_text()) if path.is_file() else {}
        doc.update(collect(args.collect, args.target))
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc["flag_free_gain"], indent=1))
        return 0
    if args.run is None:
        parser.error("give --run or --collect")
    tiles = args.run / "tiles"
    truth = true_flags(tiles, "target-train")
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
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
