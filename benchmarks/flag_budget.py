"""How many flags does an analyst need? The flag-budget curve of issue #31 item 5.

Each budget is one ``aerosynth adapt`` run: ``benchmarks/configs/flag_budget_<target>_<pct>.yaml`` is the
scoreboard's run (defaults frozen, the handed-over recipe, ``relabel_with: own-seed``) on report seeds 5-7 with
``data.flag_budget`` of target-train's flags (a seeded draw) and the other tiles left out; its LDM, heat-map
labels and rounds see only those. ``--rest derived`` runs ``flag_budget_<target>_<pct>_derived.yaml`` instead:
the other tiles flagged by the first seed's F_S (``flag_budget_rest: derived``, item 3's rule); where a budget
has both, the curve's point is the one that kept more of the gain, the other beside it. The 100 % point is the
scoreboard run itself (same recipe and seeds), the 0 % point its source-only detectors. For each budget the
handed-over detector's AP50 per seed and the share of the full-flag gain it keeps (ratio of means over the
seeds)::

    python benchmarks/flag_budget.py run --target minsk        # every budget, one run after another; resumes
    python benchmarks/flag_budget.py run --target minsk --budgets 25 --rest derived
    python benchmarks/flag_budget.py collect --target minsk    # -> flag_budget in results/flags_only_minsk.json
"""

from __future__ import annotations

import argparse
import json
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

RESULTS = REPO / "benchmarks" / "results"
CONFIGS = REPO / "benchmarks" / "configs"
BUDGETS = ("05", "10", "25", "50")
#: what the unflagged tiles become: the name's suffix of the config and of the work folder
RESTS = {"skip": "", "derived": "_derived"}


def config_path(target: str, pct: str, rest: str = "skip") -> Path:
    return CONFIGS / f"flag_budget_{target}_{pct}{RESTS[rest]}.yaml"


def work_path(target: str, pct: str, rest: str = "skip") -> Path | None:
    """The run folder the budget's config names (``None`` where that config does not exist)."""
    from aerosynth.flows.config import load_config

    config = config_path(target, pct, rest)
    return REPO / load_config(config).work_dir if config.is_file() else None


def run(target: str, budgets: list[str], rest: str = "skip") -> None:
    """``aerosynth adapt`` on each budget's config in turn (a finished one is skipped stage by stage)."""
    for pct in budgets:
        config = config_path(target, pct, rest)
        log = REPO / "benchmarks" / "work" / f"{config.stem}.log"
        start = time.perf_counter()
        with log.open("a") as out:
            command = ["aerosynth", "adapt", "--config", str(config)]
            subprocess.run(command, cwd=REPO, stdout=out, stderr=out, check=True)
        print(f"{config.name}: {time.perf_counter() - start:.0f} s", flush=True)


def budget_point(work: Path, seeds: list[str]) -> dict | None:
    """A finished budget run's handed-over AP50 per seed, the flags it was given and its wall time."""
    from aerosynth.annotation.tile_flags import DERIVED_FLAGS_FILE

    handed = work / "detector.json"
    if not handed.is_file():
        return None
    variant = json.loads(handed.read_text())["variant"]
    per_seed = {s: ap for s, ap in _per_seed(work, variant).items() if s in seeds}
    flags = json.loads((work / "tiles-flagged" / DERIVED_FLAGS_FILE).read_text())
    wall, calls = run_wall(work)
    return {
        "variant": variant,
        "per_seed": per_seed,
        "mean": round(fmean(per_seed.values()), 4) if per_seed else None,
        "flags_given": flags.get("given_kept"),
        "target_train_tiles": flags["target_train"]["tiles"],
        "wall_s": wall,
        "calls": calls,
    }


def run_wall(work: Path) -> tuple[float | None, int]:
    """Seconds the run's processes were running (the union of their spans in ``logs/progress.jsonl``, so parallel
    workers count once and the gaps between a stopped call and its resume not at all) and how many calls it took."""
    from aerosynth.flows.progress import EVENTS_FILE

    events = work / "logs" / EVENTS_FILE
    if not events.is_file():
        return None, 0
    spans: dict[int, tuple[float, float]] = {}
    for line in events.read_text().splitlines():
        pid, t = (event := json.loads(line))["pid"], event["t"]
        lo, hi = spans.get(pid, (t, t))
        spans[pid] = (min(lo, t), max(hi, t))
    total, calls, end = 0.0, 0, float("-inf")
    for lo, hi in sorted(spans.values()):
        if lo > end:
            calls += 1
        total += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    return round(total, 1), calls


def collect(target: str) -> dict:
    """The curve from the finished budget runs and the scoreboard (100 %, and source-only at 0 %)."""
    board = json.loads((RESULTS / f"scoreboard_{target}.json").read_text())
    seeds = ["5", "6", "7"]
    so = {s: board["source_only"]["per_seed"][s] for s in seeds}
    full = {s: board["handed_over"]["per_seed"][s] for s in seeds}

    def gain_kept(point: dict) -> float | None:
        common = [s for s in seeds if s in point["per_seed"]]
        if not common:
            return None
        gain = fmean(full[s] for s in common) - fmean(so[s] for s in common)
        mean = fmean(point["per_seed"][s] for s in common)
        return round((mean - fmean(so[s] for s in common)) / gain, 3) if gain > 0 else None

    curve: dict[str, dict] = {}
    for pct in BUDGETS:
        points = {}
        for rest in RESTS:
            work = work_path(target, pct, rest)
            point = budget_point(work, seeds) if work is not None else None
            if point is not None:
                points[rest] = {"rest": rest, **point, "gain_kept": gain_kept(point)}
        if points:  # the rest rule that kept more of the gain; the other beside it
            kept = {r: -float("inf") if p["gain_kept"] is None else p["gain_kept"] for r, p in points.items()}
            best = max(kept, key=kept.get)
            others = {r: p for r, p in points.items() if r != best}
            curve[str(int(pct) / 100)] = {**points[best], **({"other_rest": others} if others else {})}
    variant = board["handed_over"]["variant"]
    full_point = {"variant": variant, "per_seed": full, "mean": round(fmean(full.values()), 4)}
    curve["1.0"] = {**full_point, "gain_kept": gain_kept(full_point)}
    return {
        "what": "handed-over AP50 on target-test per share of target-train's flags given (seeded draw; the rest "
        "left out, rest: skip, or flagged by F_S, rest: derived; the point is the rule that kept more of the gain, "
        "the other under other_rest), report seeds 5-7; 1.0 is the scoreboard run; "
        "gain_kept = (mean - source-only mean) / (full-flag mean - source-only mean) over the seeds the point has",
        "command": f"python benchmarks/flag_budget.py run --target {target}; "
        f"python benchmarks/flag_budget.py collect --target {target}",
        "source_only": so,
        **curve,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "collect"))
    parser.add_argument("--target", required=True, choices=("minsk", "kit"))
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=BUDGETS)
    parser.add_argument("--rest", choices=tuple(RESTS), default="skip", help="what the unflagged tiles become")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.target, args.budgets, args.rest)
    path = RESULTS / f"flags_only_{args.target}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["flag_budget"] = collect(args.target)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["flag_budget"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
