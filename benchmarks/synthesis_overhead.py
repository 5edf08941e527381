"""Overhead of attention capture: aerosynth's sampler vs plain diffusers sampling of the same model.

Both sides use the same UNet, text encoder, autoencoder (an ``AutoencoderKL`` from config, so
that diffusers' ``StableDiffusionPipeline`` can drive it), DDIM scheduler, steps, guidance and
batch. The capture side runs :func:`aerosynth.generation.sampling.denoise` (explicit probabilities on the
captured cross-attention layers, running-sum maps) plus decoding and heat-map rendering; the
plain side runs the pipeline with diffusers' default SDPA processors. Runs alternate
(plain, capture, plain, ...), each in a fresh process with one warm-up, measuring wall time of
the sampling call and peak RSS (``resource.getrusage``). Writes
``benchmarks/results/synthesis_overhead.json`` with the ratios of medians (capture / plain).

``--mode harmonise`` measures the sets made from real tiles (issue 22's harmonised and blended
copy-paste composites): aerosynth's source-guided translation (encode, noise to ``--strength``, denoise
with capture, decode, heat maps, then the blend onto the original outside the boxes) against diffusers'
``StableDiffusionImg2ImgPipeline`` at the same strength, written under the key ``harmonise``.

Usage: ``nice python benchmarks/synthesis_overhead.py [--mode text|harmonise] [--preset cpu] [--runs 5]
[--steps 20] [--batch 4]``
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


def _pipeline(cls, ldm, make_scheduler):
    """A diffusers pipeline of class ``cls`` over the LDM's own modules, DDIM, no safety checker."""
    pipe = cls(
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
    return pipe


def worker(
    kind: str, preset: str, steps: int, batch: int, threads: int, mode: str = "text", strength: float = 0.3
) -> dict:
    """Build the model, warm up once, time one sampling call; return the figures."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from checkout import use_checkout

    use_checkout()
    from aerosynth.data.offline import apply_offline_settings

    apply_offline_settings()
    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from aerosynth.annotation.copy_paste import keep_background
    from aerosynth.data.detections import Detections
    from aerosynth.generation.attention import default_capture_sides
    from aerosynth.generation.models import build_ldm, token_positions
    from aerosynth.generation.sampling import (
        SamplingConfig,
        _sample_batch,
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
    # the tiles a harmonisation starts from: seeded smooth colour fields, one pasted "car" box each
    rng = np.random.default_rng(0)
    tiles = np.clip(rng.normal(120, 25, (batch, size, size, 3)), 0, 255).astype(np.uint8)
    tiles[:, 40:52, 50:58] = 30
    boxes = [Detections(np.array([[50.0, 40.0, 58.0, 52.0]]))] * batch

    if mode == "harmonise" and kind == "plain":
        pipe = _pipeline(StableDiffusionImg2ImgPipeline, ldm, make_scheduler)
        images = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255  # diffusers takes [0, 1]

        def run() -> None:
            gens = [torch.Generator().manual_seed(i) for i in range(batch)]
            pipe(
                prompt=[prompt] * batch,
                image=images,
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="np",
            )

    elif mode == "harmonise":
        scheduler = make_scheduler(ldm, "ddim")
        ids = ldm.token_ids([prompt])
        positions = token_positions(ids, capture_token_ids(ldm, domain, SamplingConfig()))
        sides = default_capture_sides(ldm.unet, side)
        config = SamplingConfig(steps=steps, guidance_scale=guidance)
        start_index = min(steps - 1, int(round(steps * (1 - strength))))

        def run() -> None:
            x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1
            scheduler.set_timesteps(steps)
            clean = ldm.codec.encode(x)
            noise = _seed_noise(ldm, range(batch), 0, side)
            noisy = scheduler.add_noise(clean, noise, scheduler.timesteps[start_index].repeat(batch))
            out, _heat, _raw = _sample_batch(
                ldm, noisy, ids, positions, scheduler, config, sides, size, "no", start_index=start_index
            )
            for j in range(batch):
                keep_background(tiles[j], out[j], boxes[j])

    elif kind == "plain":
        pipe = _pipeline(StableDiffusionPipeline, ldm, make_scheduler)

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
    parser.add_argument("--mode", choices=["text", "harmonise"], default="text")
    parser.add_argument("--strength", type=float, default=0.3, help="harmonise: fraction of the schedule")
    args = parser.parse_args()
    if args.worker:
        fig = worker(args.worker, args.preset, args.steps, args.batch, args.threads, args.mode, args.strength)
        print(json.dumps(fig))
        return
    results: dict[str, list[dict]] = {"plain": [], "capture": []}
    for _ in range(args.runs):
        for kind in ("plain", "capture"):
            cmd = [sys.executable, __file__, "--worker", kind, "--preset", args.preset, "--steps", str(args.steps)]
            cmd += ["--batch", str(args.batch), "--threads", str(args.threads), "--mode", args.mode]
            cmd += ["--strength", str(args.strength)]
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
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    summary["date"] = time.ctime()
    if args.mode == "harmonise":  # beside the text-to-image figures, which stay at the top level
        summary.update({"strength": args.strength, "plain_side": "StableDiffusionImg2ImgPipeline"})
        summary = {**previous, "harmonise": summary}
    elif "harmonise" in previous:
        summary["harmonise"] = previous["harmonise"]
    RESULT.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
