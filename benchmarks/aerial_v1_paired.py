"""aerial-v1, paired design: the five-seed figures of both targets, collected from their run folders.

Protocol ``../shared/benchmarks/aerial-v1.md`` (items 9 and 10): the source-only detector of each seed is
the reference recipe (yolov8n from yaml, 128 px, batch 32, 8 epochs of the 5320 source-train tiles,
ultralytics' default augmentations with mosaic, SGD) with a fixed, label-free checkpoint rule (final
weights); every variant then fine-tunes from those weights for the same short budget, so that variants
of one seed differ by their data only: ``continued`` (source only: the control), ``self-training``,
``heatmap``, ``heatmap-readout`` (real target-train tiles labelled from weak flags + F_S's or the LDM's
boxes) and ``oracle``.

That recipe now lives in the adapt flow itself (``detection.design: paired``, ``flows/adapt_detection.py``)
and is measured through it by ``benchmarks/adapt_flow.py``: one recipe, one code path. This script's own
job loop is retired; it keeps the five-seed results in ``benchmarks/results/aerial-v1-paired.json``
readable and re-collectable from the run folders it wrote (``benchmarks/work/paired``)::

    python benchmarks/aerial_v1_paired.py collect
    python benchmarks/aerial_v1_paired.py table
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

WORK = REPO / "benchmarks" / "work" / "paired"
RESULTS = REPO / "benchmarks" / "results" / "aerial-v1-paired.json"
TILES = {"kit": REPO / "benchmarks" / "work" / "tiles-kit", "minsk": REPO / "benchmarks" / "work" / "tiles-minsk"}
#: Source-only: protocol item 9 (8 epochs of 5320 tiles at batch 32, about 1330 batches).
SOURCE_ONLY = {"epochs": 8, "batch": 32, "recipe": "reference", "checkpoint": "last", "patience": 100}
#: Fine-tuning from source-only: 3 epochs of 1280 images (half source, half target data), lower lr, no warm-up.
FINETUNE = {
    "epochs": 3,
    "batch": 32,
    "recipe": "reference",
    "checkpoint": "last",
    "patience": 100,
    "mix_total": 1280,
    "extra": {"lr0": 0.002, "warmup_epochs": 0.0, "close_mosaic": 1},
}
TARGET_VARIANTS = ("self-training", "heatmap", "heatmap-readout", "oracle")


def _run_dir(name: str, seed: int) -> Path:
    return WORK / name / f"seed{seed}"


def collect() -> dict:
    """Per target: every variant's AP50 per seed, its paired difference to source-only, mean ± std, closure."""
    import numpy as np

    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.detection.closure import gap_closure

    def ap(name: str, seed: int, target: str) -> float | None:
        path = _run_dir(name, seed) / "metrics.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text())["target_test"].get(target, {}).get("ap50")

    if not (WORK / "source-only").is_dir():
        if RESULTS.is_file():  # the committed figures (the run folders are not kept in the repository)
            return json.loads(RESULTS.read_text())
        raise SystemExit(f"{WORK}: no run folders to collect")
    seeds = sorted(int(p.name[4:]) for p in (WORK / "source-only").glob("seed*") if (p / "metrics.json").is_file())
    doc: dict = {"protocol": "aerial-v1 items 9-10, paired fine-tuning", "seeds": seeds, "targets": {}}
    for target in ("minsk", "kit"):
        base = {s: ap("source-only", s, target) for s in seeds}
        rows = {"source-only": base}
        # earlier runs of the chosen-readout variant, kept as heatmap-readout-<model> folders, after it
        earlier = sorted(p.name for p in (WORK / target).glob("heatmap-readout-*") if p.is_dir())
        for variant in ("continued", *TARGET_VARIANTS[:-1], *earlier, TARGET_VARIANTS[-1]):
            name = variant if variant == "continued" else f"{target}/{variant}"
            rows[variant] = {s: ap(name, s, target) for s in seeds}
        table = {}
        oracle = rows["oracle"]
        for variant, per_seed in rows.items():
            got = {s: v for s, v in per_seed.items() if v is not None}
            if not got:
                continue
            vals = np.array(list(got.values()))
            diffs = np.array([v - base[s] for s, v in got.items()])
            cont = rows["continued"]
            vs_cont = np.array([v - cont[s] for s, v in got.items() if cont.get(s) is not None])
            table[variant] = {
                "per_seed": {str(s): v for s, v in got.items()},
                "mean": round(float(vals.mean()), 4),
                "std": round(float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, 4),
                "paired_diff_mean": round(float(diffs.mean()), 4),
                "paired_diff_std": round(float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0, 4),
                "above_source_only_on_every_seed": bool((diffs > 0).all()) if variant != "source-only" else None,
                "paired_diff_to_continued_mean": round(float(vs_cont.mean()), 4) if len(vs_cont) else None,
                "paired_diff_to_continued_std": round(float(vs_cont.std(ddof=1)), 4) if len(vs_cont) > 1 else None,
                "closure": gap_closure(
                    got, {s: v for s, v in base.items() if v is not None}, {s: v for s, v in oracle.items() if v}
                ).to_dict(),
            }
        doc["targets"][target] = table
    speeds = [
        json.loads(p.read_text()).get("images_per_s") for p in WORK.glob("**/metrics.json") if "source-only" in str(p)
    ]
    doc["source_only_images_per_s_one_thread"] = [s for s in speeds if s]
    doc["settings"] = {"source_only": SOURCE_ONLY, "finetune": FINETUNE}
    doc["pseudo_label_quality"] = label_quality()
    atomic_write_json(RESULTS, doc)
    return doc


def label_quality() -> dict:
    """Precision/recall of every real-target labelling against the true target-train boxes.

    A diagnostic read through the evaluation API after the fact: nothing is chosen on it.
    """
    out: dict = {}
    for summary in sorted((WORK / "labels").glob("*/*/*/summary.json")):
        folder = summary.parent
        target = folder.relative_to(WORK / "labels").parts[0]
        out[str(folder.relative_to(WORK / "labels"))] = labels_vs_truth(folder / "labels", TILES[target])
    return out


def labels_vs_truth(labels: Path, tiles: Path) -> dict:
    """:func:`aerosynth.annotation.metrics.label_quality` (kept under this name for earlier scripts)."""
    from aerosynth.annotation.metrics import label_quality

    return label_quality(labels, tiles)


def markdown(doc: dict) -> str:
    """The README tables of a collected document: one per target, a row per variant."""
    from aerosynth.detection.closure import GapClosure

    lines = []
    names = {
        "source-only": "source-only (reference recipe, final weights)",
        "continued": "source-only, continued (control: same fine-tuning on source only)",
        "self-training": "real target-train labelled by F_S + flags, with source",
        "heatmap": "real target-train labelled by LDM heat maps + flags, with source",
        "heatmap-readout": "the same, model, noise and readout chosen on source-val",
        "oracle": "oracle (target-train true boxes, with source)",
    }
    for target, table in doc["targets"].items():
        lines += [
            f"**{target}** (seeds {', '.join(str(s) for s in doc['seeds'])})",
            "",
            "| variant | AP50 mean ± std | per seed | paired diff to source-only | above on every seed "
            "| diff to continued | gap closure |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant, row in table.items():
            per = ", ".join(f"{v:.3f}" for v in row["per_seed"].values())
            diff = "" if variant == "source-only" else f"{row['paired_diff_mean']:+.3f} ± {row['paired_diff_std']:.3f}"
            every = (
                ""
                if row["above_source_only_on_every_seed"] is None
                else ("yes" if row["above_source_only_on_every_seed"] else "no")
            )
            closure = ""
            if row.get("closure") and variant not in ("source-only", "oracle"):
                c = row["closure"]
                closure = GapClosure(c["ratio_of_means"], tuple(c["ci95"]) if c["ci95"] else None, ()).fmt()
            to_cont = ""
            if row["paired_diff_to_continued_mean"] is not None and variant not in ("source-only", "continued"):
                to_cont = f"{row['paired_diff_to_continued_mean']:+.3f}" + (
                    f" ± {row['paired_diff_to_continued_std']:.3f}" if row["paired_diff_to_continued_std"] else ""
                )
            if variant.startswith("heatmap-readout-"):
                names[variant] = f"the same, an earlier choice: `{variant.removeprefix('heatmap-readout-')}`"
            lines.append(
                f"| {names.get(variant, variant)} | {row['mean']:.3f} ± {row['std']:.3f} | {per} | {diff} | {every} "
                f"| {to_cont} | {closure} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("collect")
    sub.add_parser("table")
    args = parser.parse_args(argv)
    if args.cmd == "table":
        print(markdown(collect()))
    else:
        print(json.dumps(collect(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
