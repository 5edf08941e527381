"""Does the flag-level figure rank detectors as AP50 does? (issue #31 item 4, on targets with boxes)

A user without target boxes picks and checks detectors by their tile-level AP on held-out flags
(:mod:`aerosynth.detection.flag_scores`); this measures whether that figure orders detectors as AP50 does.
For every detector of a finished run folder (``detectors/<variant>/seed<s>/``: each variant x seed, the
oracles included) the run already holds its predictions on target-test (``predictions.json``, down to the
evaluation's low confidence) and its AP50 (``metrics.json``). The flags are the target-test tiles' own ("a
vehicle is on this tile", from their boxes, ignore regions left out): tiles no detector trained on, as the
held-out flags of a user's run are. Spearman's rank correlation is taken over all variants x seeds, and per
seed over the variants (the choice a user makes within one run).

What limits that figure is measured beside it (``split_half``): target-test's frames are split at random into
two halves, and on each split AP50 on one half is ranked against AP50 on the other (how well AP50 on other
tiles ranks the same detectors) and tile-level AP on one half against AP50 on the other (the flag figure,
under the same handicap). Writes ``flag_rank`` and ``flag_rank_spearman`` into
``benchmarks/results/flags_only_<target>.json``::

    python benchmarks/flag_rank.py --run benchmarks/work/scoreboard-minsk --target minsk
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import use_checkout  # noqa: E402

use_checkout()

RESULTS = REPO / "benchmarks" / "results"


def detector_figures(run: Path, flags: dict[str, bool]) -> dict[str, dict]:
    """``"<variant>/seed<s>"`` -> its AP50 and flag-level figures on target-test, for every scored detector."""
    from aerosynth.data.detections import Detections
    from aerosynth.detection.flag_scores import flag_scores

    out = {}
    for metrics_file in sorted((run / "detectors").glob("*/seed*/metrics.json")):
        folder = metrics_file.parent
        predictions_file = folder / "predictions.json"
        if not predictions_file.is_file():
            continue
        raw = json.loads(predictions_file.read_text())
        by_tile = {t: Detections.from_coco(raw.get(t, [])) for t in flags}
        scores = flag_scores(by_tile, flags)
        ap50 = json.loads(metrics_file.read_text())["ap50"]
        out[f"{folder.parent.name}/{folder.name}"] = {
            "ap50": round(float(ap50), 4),
            "tile_ap": scores.tile_ap,
            "auroc": scores.auroc,
        }
    return out


def concordance(detectors: dict[str, dict], gap: float) -> dict:
    """Among pairs of detectors whose AP50 differs by more than ``gap``: the share tile-level AP orders alike."""
    keys = sorted(detectors)
    pairs = same = 0
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            d_ap50 = detectors[a]["ap50"] - detectors[b]["ap50"]
            if abs(d_ap50) > gap:
                pairs += 1
                same += (detectors[a]["tile_ap"] - detectors[b]["tile_ap"]) * d_ap50 > 0
    return {"pairs": pairs, "ordered_alike": round(same / pairs, 3) if pairs else None}


def rank_figures(detectors: dict[str, dict]) -> dict:
    """Spearman of tile-level AP (and AUROC) against AP50: over all detectors, and per seed over its variants."""
    from aerosynth.detection.flag_scores import spearman

    def rho(keys: list[str], figure: str) -> float:
        return round(spearman({k: detectors[k][figure] for k in keys}, {k: detectors[k]["ap50"] for k in keys}), 3)

    keys = sorted(detectors)
    seeds = sorted({k.split("/")[1] for k in keys}, key=lambda s: int(s.removeprefix("seed")))
    per_seed = {}
    for seed in seeds:
        mine = [k for k in keys if k.endswith("/" + seed)]
        if len(mine) >= 3:
            per_seed[seed.removeprefix("seed")] = {"tile_ap": rho(mine, "tile_ap"), "auroc": rho(mine, "auroc")}
    return {
        "detectors": len(keys),
        "concordance": {f"ap50_gap_over_{gap}": concordance(detectors, gap) for gap in (0.0, 0.02, 0.05, 0.1)},
        "spearman_tile_ap": rho(keys, "tile_ap"),
        "spearman_auroc": rho(keys, "auroc"),
        "per_seed": per_seed,
    }


TILE_SCORES = {
    "best box": lambda conf: float(conf.max()) if len(conf) else 0.0,
    "noisy-or": lambda conf: float(1 - (1 - conf).prod()) if len(conf) else 0.0,
    "sum of confidences": lambda conf: float(conf.sum()),
    "boxes at 0.25": lambda conf: float((conf >= 0.25).sum()),
}


def other_tile_scores(run: Path, flags: dict[str, bool]) -> dict[str, float]:
    """Spearman against AP50 of tile-level AP when a tile's score is not its best box but another rule.

    The product scores a tile by its best box (:func:`aerosynth.detection.flag_scores.tile_score`); this checks
    whether a score that counts every box (noisy-or, their sum, how many pass 0.25) ranks detectors better.
    """
    import numpy as np

    from aerosynth.detection.flag_scores import spearman, tile_average_precision

    tiles = sorted(flags)
    truth = [flags[t] for t in tiles]
    ap50: dict[str, float] = {}
    by_rule: dict[str, dict[str, float]] = {rule: {} for rule in TILE_SCORES}
    for metrics_file in sorted((run / "detectors").glob("*/seed*/metrics.json")):
        raw = json.loads((metrics_file.parent / "predictions.json").read_text())
        key = f"{metrics_file.parent.parent.name}/{metrics_file.parent.name}"
        ap50[key] = json.loads(metrics_file.read_text())["ap50"]
        conf = {t: np.array([a["score"] for a in raw.get(t, [])], dtype=float) for t in tiles}
        for rule, score in TILE_SCORES.items():
            by_rule[rule][key] = tile_average_precision([score(conf[t]) for t in tiles], truth)
    return {rule: round(spearman(figures, ap50), 3) for rule, figures in by_rule.items()}


def split_half(run: Path, flags: dict[str, bool], halves: int = 20) -> dict:
    """Spearman of AP50 on half the frames against AP50 and against tile-level AP on the other half.

    Every detector's saved predictions are scored again on each half of ``halves`` random frame splits (a
    frame's tiles stay together). Both orders of each split count; the figures are means over them.
    """
    import random
    import statistics

    from aerosynth.data.detections import Detections
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.detection.evaluation import evaluate_coco
    from aerosynth.detection.flag_scores import flag_scores, spearman

    split = open_evaluation_split(run / "tiles", "target-test")
    doc = split.coco
    image_id = {im["file_name"]: int(im["id"]) for im in doc["images"]}
    frames = sorted({t.source_image for t in split.tiles})
    predictions = {}
    for metrics_file in sorted((run / "detectors").glob("*/seed*/metrics.json")):
        raw = json.loads((metrics_file.parent / "predictions.json").read_text())
        key = f"{metrics_file.parent.parent.name}/{metrics_file.parent.name}"
        predictions[key] = {t.tile_id: Detections.from_coco(raw.get(t.tile_id, [])) for t in split.tiles}

    def figures(tiles: list) -> tuple[dict, dict]:
        ids = {image_id[f"images/{t.tile_id}.png"] for t in tiles}
        sub = {
            "images": [im for im in doc["images"] if im["id"] in ids],
            "annotations": [a for a in doc["annotations"] if a["image_id"] in ids],
            "categories": doc["categories"],
        }
        ap50, tile_ap = {}, {}
        for key, by_tile in predictions.items():
            mine = {t.tile_id: by_tile[t.tile_id] for t in tiles}
            ap50[key] = evaluate_coco(sub, {image_id[f"images/{t}.png"]: d for t, d in mine.items()}).ap50
            tile_ap[key] = flag_scores(mine, {t.tile_id: flags[t.tile_id] for t in tiles}).tile_ap
        return ap50, tile_ap

    ap50_vs_ap50, tile_ap_vs_ap50 = [], []
    for rep in range(halves):
        order = frames[:]
        random.Random(rep).shuffle(order)
        first = set(order[: len(order) // 2])
        a = figures([t for t in split.tiles if t.source_image in first])
        b = figures([t for t in split.tiles if t.source_image not in first])
        for (ap50_x, tile_ap_x), (ap50_y, _) in ((a, b), (b, a)):
            ap50_vs_ap50.append(spearman(ap50_x, ap50_y))
            tile_ap_vs_ap50.append(spearman(tile_ap_x, ap50_y))
    return {
        "what": "Spearman over every detector between figures on two halves of target-test's frames "
        f"({len(frames)} frames, {halves} random splits, both orders, mean): AP50 on one half against AP50 "
        "on the other, and tile-level AP on one half against AP50 on the other",
        "frames": len(frames),
        "ap50_vs_ap50": round(statistics.fmean(ap50_vs_ap50), 3),
        "tile_ap_vs_ap50": round(statistics.fmean(tile_ap_vs_ap50), 3),
    }


def main(argv: list[str] | None = None) -> int:
    from flag_free import true_flags

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder with target boxes")
    parser.add_argument("--target", required=True, help="names the results file flags_only_<target>.json")
    parser.add_argument("--halves", type=int, default=20, help="random frame splits for the split-half check")
    args = parser.parse_args(argv)
    flags = true_flags(args.run / "tiles", "target-test")
    detectors = detector_figures(args.run, flags)
    ranking = rank_figures(detectors)
    path = RESULTS / f"flags_only_{args.target}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["flag_rank_spearman"] = ranking["spearman_tile_ap"]
    doc["flag_rank"] = {
        "what": "tile-level AP (best box per tile) on the target-test tiles' flags against AP50 on their boxes, "
        "for every detector of the run (variants x seeds); Spearman over all, and per seed over its variants",
        "command": f"python benchmarks/flag_rank.py --run {args.run} --target {args.target}",
        "run": str(args.run),
        "tiles": len(flags),
        "flagged": sum(flags.values()),
        **ranking,
        "split_half": split_half(args.run, flags, args.halves),
        "spearman_by_tile_score": other_tile_scores(args.run, flags),
        "per_detector": detectors,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc["flag_rank"].items() if k != "per_detector"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
