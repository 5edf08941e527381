"""Which fine-tune recipe suits a COCO-started F_S? Issue #34's probe, on development seeds 0-4 only.

The ``finetune`` defaults (lr0 0.002, 3 epochs of 1280 images) were chosen from random-start detectors. From
COCO weights the adapted Minsk detectors ended lower than from random weights on labels as good or better, so
the fine-tune may move a COCO F_S too little. Each candidate is one ``aerosynth adapt`` run,
``benchmarks/configs/finetune_probe_minsk_lr<NNN>.yaml``: the pretrained Minsk run on seeds 0-4 with that
``detection.finetune.lr0``, the handed-over recipe only. The tiles, LDM, synthetic sets and first heat-map labels
are copied from ``benchmarks/work/pretrained-minsk`` (their stage keys do not depend on the detector, so the flow
skips them); F_S is trained by the first candidate and reused by the others (``detection.reference_from``).
The report seeds 5-9 play no part: the chosen recipe is then run on them with ``pretrained_<target>.yaml``::

    python benchmarks/finetune_probe.py run        # every candidate in turn; resumes
    python benchmarks/finetune_probe.py collect    # -> benchmarks/results/finetune_probe_minsk.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import use_checkout  # noqa: E402
from scoreboard import _per_seed  # noqa: E402  (AP50 per seed of a run's variant)

use_checkout()

CONFIGS = REPO / "benchmarks" / "configs"
RESULTS = REPO / "benchmarks" / "results"
#: the candidates in the order they run (the first trains F_S for the others)
CANDIDATES = ("lr002", "lr005", "lr010")
#: the finished run whose detector-independent stages every candidate starts from
DONOR = REPO / "benchmarks" / "work" / "pretrained-minsk"
SHARED_STAGES = ("tiles", "ldm", "synthetic", "annotation/real-heatmap")


def config_path(candidate: str) -> Path:
    return CONFIGS / f"finetune_probe_minsk_{candidate}.yaml"


def _load(config: Path):
    from aerosynth.flows.config import load_config

    return load_config(config)


def seed_folder(work: Path) -> None:
    """Copy the donor's detector-independent stages into a fresh work folder (the flow checks their keys)."""
    for stage in SHARED_STAGES:
        src, dst = DONOR / stage, work / stage
        if src.is_dir() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst, symlinks=True)


def run(candidates: list[str]) -> None:
    for candidate in candidates:
        config = config_path(candidate)
        work = REPO / _load(config).work_dir
        seed_folder(work)
        log = REPO / "benchmarks" / "work" / f"{config.stem}.log"
        start = time.perf_counter()
        with log.open("a") as out:
            command = ["aerosynth", "adapt", "--config", str(config.relative_to(REPO))]
            subprocess.run(command, cwd=REPO, stdout=out, stderr=out, check=True)
        print(f"{config.name}: {time.perf_counter() - start:.0f} s", flush=True)


def collect() -> dict:
    """Each finished candidate's handed-over AP50 per development seed; the one with the highest mean is chosen."""
    from aerosynth.flows.adapt_common import SOURCE_ONLY

    rows = {}
    for candidate in CANDIDATES:
        cfg = _load(config_path(candidate))
        work = REPO / cfg.work_dir
        if not (work / "detector.json").is_file():
            continue
        variant = json.loads((work / "detector.json").read_text())["variant"]
        handed = _per_seed(work, variant)
        rounds = {
            p.name: fmean(v.values())
            for p in sorted((work / "detectors").iterdir())
            if p.name != SOURCE_ONLY and (v := _per_seed(work, p.name))
        }
        rows[candidate] = {
            "config": str(config_path(candidate).relative_to(REPO)),
            "lr0": cfg.detection.finetune.lr0,
            "handed_over": {"variant": variant, "per_seed": handed, "mean": round(fmean(handed.values()), 4)},
            "variant_means": {k: round(v, 4) for k, v in rounds.items()},
        }
    source = _per_seed(REPO / _load(config_path(CANDIDATES[0])).work_dir, SOURCE_ONLY)
    chosen = max(rows, key=lambda c: rows[c]["handed_over"]["mean"]) if rows else None
    doc = {
        "what": "the fine-tune recipe for a COCO-started F_S (Minsk), chosen on development seeds 0-4 by the "
        "handed-over detector's mean AP50 on target-test; the report seeds 5-9 are not used",
        "commands": ["python benchmarks/finetune_probe.py run", "python benchmarks/finetune_probe.py collect"],
        "machine": "2 CPU cores",
        "seeds": [0, 1, 2, 3, 4],
        "source_only": {"per_seed": source, "mean": round(fmean(source.values()), 4) if source else None},
        "candidates": rows,
        "chosen": chosen,
    }
    out = RESULTS / "finetune_probe_minsk.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({c: r["handed_over"] for c, r in rows.items()}, indent=1), "\nchosen:", chosen)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("run", "collect"))
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated, e.g. lr002,lr010")
    args = parser.parse_args(argv)
    if args.what == "run":
        run(args.candidates.split(","))
    collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
