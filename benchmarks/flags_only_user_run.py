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

With ``--equivalence`` it then runs the same job on the Minsk folder *with* its boxes
(``benchmarks/configs/flags_only_minsk_boxes.yaml``: the settings the flags-only run takes by default, set) and
compares the two handed-over files byte for byte (``byte_identical``, their sha256) and weight for weight
-> ``equivalent`` and ``equivalence`` in ``flags_only_minsk.json``.
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
BOXES_CONFIG = REPO / "benchmarks" / "configs" / "flags_only_minsk_boxes.yaml"
TARGET = REPO / "benchmarks" / "work" / "flags_only" / "minsk_drone"
TILES_WITH_BOXES = REPO / "benchmarks" / "work" / "flags_only" / "minsk-tiles-with-boxes"
RESULTS = REPO / "benchmarks" / "results"


def _work_dir(config: Path = CONFIG) -> Path:
    from aerosynth.flows.config import load_config

    return REPO / load_config(config).work_dir


def _run(config: Path, log: Path, fresh: bool = False) -> tuple[list[str], float]:
    """``aerosynth adapt --config CONFIG`` (its output appended to ``log``), and its wall time."""
    cmd = ["aerosynth", "adapt", "--config", str(config.relative_to(REPO)), *(["--fresh"] if fresh else [])]
    started = time.perf_counter()
    with open(log, "a") as out:
        rc = subprocess.call(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return cmd, round(time.perf_counter() - started, 1)


def equivalence(flags_work: Path, boxes_work: Path) -> dict:
    """The two runs' handed-over detectors compared: variant, tiles held out, the files, weights tensor by tensor."""
    import torch

    from aerosynth.data.manifest import file_sha256

    def weights(work: Path) -> dict:
        return torch.load(work / "detector.pt", map_location="cpu", weights_only=False)["model"].state_dict()

    def ids(work: Path, split: str) -> list[str]:
        return sorted(t["tile_id"] for t in json.loads((work / "tiles" / split / "tiles.json").read_text())["tiles"])

    mine, theirs = weights(flags_work), weights(boxes_work)
    same_keys = mine.keys() == theirs.keys()
    differing = [k for k in mine if not same_keys or not torch.equal(mine[k], theirs[k])]
    handed = {w.name: json.loads((w / "detector.json").read_text())["variant"] for w in (flags_work, boxes_work)}
    splits = {s: ids(flags_work, s) == ids(boxes_work, s) for s in ("target-train", "target-holdout")}
    sha = {w.name: file_sha256(w / "detector.pt") for w in (flags_work, boxes_work)}
    return {
        "equivalent": len(set(sha.values())) == 1 and len(set(handed.values())) == 1 and all(splits.values()),
        "byte_identical": len(set(sha.values())) == 1,
        "sha256": sha,
        "handed_over": handed,
        "same_tiles": splits,
        "tensors": len(mine),
        "tensors_differing": differing[:20],
        "max_abs_difference": max(
            (float((mine[k].float() - theirs[k].float()).abs().max()) for k in differing if same_keys), default=0.0
        ),
    }


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
    parser.add_argument("--equivalence", action="store_true", help="also run the target with boxes and compare")
    args = parser.parse_args(argv)
    if not (MINSK / "images").is_dir():
        sys.exit(f"{MINSK}: no Minsk imagery (set AEROSYNTH_SHARED)")
    if not (TARGET / "flags.json").is_file():
        flags = write_flags_only_target(MINSK, TARGET, MINSK_SCALE, 128, {0, 1})
        print(f"{TARGET}: {len(flags)} tiles flagged, {sum(flags.values())} with a vehicle", flush=True)
    work = _work_dir()
    log = REPO / "benchmarks" / "work" / "flags_only_minsk.log"
    cmd, wall = _run(CONFIG, log, args.fresh)
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
            "last_call_wall_s": wall,  # this call's: stages finished before are skipped
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
    if args.equivalence:
        boxes_cmd, boxes_wall = _run(BOXES_CONFIG, log.with_name("flags_only_minsk_boxes.log"), args.fresh)
        boxes_work = _work_dir(BOXES_CONFIG)
        found = equivalence(work, boxes_work)
        doc["equivalent"] = found.pop("equivalent")
        doc["equivalence"] = {
            "command": " ".join(boxes_cmd),
            "last_call_wall_s": boxes_wall,  # this call's: stages finished before are skipped
            "wall_time": json.loads((boxes_work / "report" / "report.json").read_text()).get("wall_time"),
            **found,
        }
        print(json.dumps({"equivalent": doc["equivalent"], **doc["equivalence"]}, indent=1))
    (RESULTS / "flags_only_minsk.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["user_run"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
