"""Overhead of attention capture: aerosynth's sampler vs plain diffusers sampling of the same model.

Both sides use the same UNet, text encoder, autoencoder (an ``AutoencoderKL`` from config, so
that diffusers' ``StableDiffusionPipeline`` can drive it), DDIM scheduler, steps, guidance and
batch. The capture side runs :func:`aerosynth.generation.sampling.denoise` (explicit probabilities on the
captured cross-attention layers, running-sum maps) plus decoding and heat-map rendering; the
plain side runs the pipeline with diffusers' default SDPA processors. Runs alternate
(plain, capture, plain, ...), each in a fresh process with one warm-up, measuring wall time of
the sampling call and peak RSS (``resource.getrusage``). Writes
``benchmarks/results/synthesis_overhead.json`` with the ratios of medians (capture / plain).

Usage: ``nice python benchmarks/synthesis_overhead.py [--preset cpu] [--runs 5] [--steps 20] [--batch 4]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "synthesis_overhead.json"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(kind: str, preset: str, steps: int, batch: int, threads: int) -> dict:
    """Build the model, warm up once, time one sampling call; return the figures."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from checkout import use_checkout

    use_checkout()
    from aerosynth.data.offline import apply_offline_settings

    apply_offline_settings()
    import torch
    from diffusers import StableDiffusionPipeline

    from aerosynth.generation.attention import default_capture_sides
    from aerosynth.generation.models import build_ldm, token_positions
    from aerosynth.generation.sampling import (
        SamplingConfig,
        _seed_noise,
        capture_token_ids,
        denoise,
        heatmaps,
        make_scheduler,
        to_uint8,
    )

    torch.set_num_threads(threads)
    ldm = build_ldm(preset)  # AutoencoderKL from config: diffusers' pipeline can use it
    ldm.unet.eval()
    domain = "kit_munich_aerial"
    prompt = ldm.prompt(domain, True, True)
    size = ldm.spec.image_size
    side = size // ldm.codec.factor
    guidance = 7.5

    if kind == "plain":
        pipe = StableDiffusionPipeline(
            vae=ldm.codec.module,
            text_encoder=ldm.text_encoder,
            tokenizer=ldm.tokenizer,
            unet=ldm.unet,
            scheduler=make_scheduler(ldm, "ddim"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)

        def run() -> None:
            gens = [torch.Generator().manual_seed(i) for i in range(batch)]
            pipe(
                prompt=[prompt] * batch,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="np",
            )

    else:
        scheduler = make_scheduler(ldm, "ddim")
        ids = ldm.token_ids([prompt] * batch)
        positions = token_positions(ids, capture_token_ids(ldm, domain, SamplingConfig()))
        sides = default_capture_sides(ldm.unet, side)

        def run() -> None:
            noise = _seed_noise(ldm, range(batch), 0, side) * scheduler.init_noise_sigma
            latents, maps = denoise(ldm, noise, ids, positions, scheduler, steps, guidance, sides)
            with torch.no_grad():
                to_uint8(ldm.codec.decode(latents))
            heatmaps(maps, size)

    with torch.no_grad():
        run()  # warm-up
        rss_before = _rss_mb()
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "wall_s": wall, "peak_rss_mb": peak, "rss_before_mb": rss_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=["plain", "capture"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.preset, args.steps, args.batch, args.threads)))
        return
    results: dict[str, list[dict]] = {"plain": [], "capture": []}
    for _ in range(args.runs):
        for kind in ("plain", "capture"):
            cmd = [sys.executable, __file__, "--worker", kind, "--preset", args.preset, "--steps", str(args.steps)]
            cmd += ["--batch", str(args.batch), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
            results[kind].append(json.loads(out.strip().splitlines()[-1]))
            print(kind, results[kind][-1], flush=True)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    summary = {
        "preset": args.preset,
        "steps": args.steps,
        "batch": args.batch,
        "threads": args.threads,
        "runs_each": args.runs,
        "scheduler": "ddim",
        "guidance_scale": 7.5,
        "median_wall_s": {k: median(k, "wall_s") for k in results},
        "median_peak_rss_mb": {k: median(k, "peak_rss_mb") for k in results},
        "wall_time_ratio": median("capture", "wall_s") / median("plain", "wall_s"),
        "peak_memory_ratio": median("capture", "peak_rss_mb") / median("plain", "peak_rss_mb"),
        "peak_memory_increase_ratio": (median("capture", "peak_rss_mb") - median("capture", "rss_before_mb"))
        / max(median("plain", "peak_rss_mb") - median("plain", "rss_before_mb"), 1e-9),
        "runs": results,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
