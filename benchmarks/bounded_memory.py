"""Bounded memory of synthesis: generating 10x more images must not raise peak memory by more than 1.2x.

Each measurement runs in a fresh process (peak RSS from ``getrusage``) that builds the same model and
streams a set of N images to disk in shards. Writes ``benchmarks/results/bounded_memory.json``.

    python benchmarks/bounded_memory.py [--preset tiny] [--small 24] [--factor 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import resource, sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
from aerosynth.generation.models import build_ldm, save_ldm
from aerosynth.generation.sampling import SamplingConfig, generate_set
preset, count, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
model = save_ldm(build_ldm(preset, domains=["kit_munich_aerial"]), out / "model")
t0 = time.perf_counter()
cfg = SamplingConfig(steps=4, batch_size=4, shard_size=16, progress=False, save_raw_maps=True)
generate_set(model, out / "set", "target_cars", "kit_munich_aerial", count, config=cfg)
print(time.perf_counter() - t0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(preset: str, count: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, preset, str(count), d], cwd=REPO, capture_output=True, text=True, check=True
        )
        seconds, maxrss_kb = out.stdout.strip().splitlines()[-2:]
        files = len(list((Path(d) / "set" / "images").glob("*.png")))
    return {
        "images": count,
        "written": files,
        "seconds": round(float(seconds), 2),
        "peak_rss_mb": round(int(maxrss_kb) / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--small", type=int, default=24)
    parser.add_argument("--factor", type=int, default=10)
    args = parser.parse_args(argv)
    small = measure(args.preset, args.small)
    large = measure(args.preset, args.small * args.factor)
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    doc = {
        "preset": args.preset,
        "small": small,
        "large": large,
        "peak_memory_ratio": round(ratio, 3),
        "goal": "<= 1.2",
        "met": ratio <= 1.2,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = REPO / "benchmarks" / "results" / "bounded_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
