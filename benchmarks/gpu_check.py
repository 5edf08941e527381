"""GPU check of the generation stage: stage-A step time and 512 px sampling speed with/without attention capture.

Run by ``benchmarks/gpu_check.sh`` (after ``pytest -m gpu``) on a machine with a CUDA GPU. The model
is the ``sd15`` preset: Stable Diffusion 1.x's architecture built from config with random weights
(UNet2DConditionModel (320, 640, 1280, 1280), cross-attention 768, ~860 M parameters; 768-wide
12-layer CLIP text encoder; 4-channel AutoencoderKL; 512 px images, 64x64 latents). Nothing is
downloaded.

* training: ``aerosynth.generation.training.train_stage("A", ...)`` itself on synthetic 512 px tiles, on the
  GPU with ``mixed_precision`` autocast (default fp16; a non-finite fp16 loss falls back to bf16
  and says so), ``batch`` tiles per step; ``warmup`` steps, then ``train_steps`` timed steps (the
  run is stopped from ``on_step`` before any checkpoint or model is written);
* sampling: ``sample_steps`` DDIM steps, guidance 7.5, ``batch`` images per batch, the same
  autocast; *capture on* is :func:`aerosynth.generation.sampling.denoise` (cross-attention maps captured)
  plus decoding and heat maps, *capture off* the same loop with diffusers' default attention
  processors plus decoding. One warm-up each, then ``repeats`` alternating timed batches
  (medians). Then one ``generate_set`` call of two batches end to end (PNG writing included).

Writes ``benchmarks/results/gpu_check.json``: GPU name, torch/CUDA versions, training s/it,
images/s, peak GPU memory per phase, capture overhead ratio (capture on / off wall time).

``--dry-run`` does the same with the ``tiny`` preset on the CPU (2 timed steps, 2 sampling steps),
so the script can be checked where there is no GPU. Without ``--dry-run`` and without CUDA it
exits with status 2 and a message.

Usage: ``python benchmarks/gpu_check.py [--precision fp16] [--batch 4] [--train-steps 20] [--dry-run]``
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "gpu_check.json"
DOMAIN = "kit_munich_aerial"


class _EnoughSteps(Exception):
    """Raised from ``on_step`` to stop stage A once the timed steps are done."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15", help="model preset (default sd15; tiny with --dry-run)")
    parser.add_argument("--precision", default="fp16", choices=["no", "fp16", "bf16"], help="autocast on CUDA")
    parser.add_argument("--batch", type=int, default=4, help="tiles per training step and images per sampling batch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per image")
    parser.add_argument("--repeats", type=int, default=2, help="timed sampling batches per capture setting")
    parser.add_argument("--device", default="cuda", help="CUDA device (cuda, cuda:N or N)")
    parser.add_argument("--out", type=Path, default=RESULT, help="result JSON")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU, 2 steps: checks the script")
    return parser.parse_args(argv)


def _write_tiles(root: Path, size: int, n: int) -> list[Path]:
    """Two weak tile splits (the flags are all stage A needs) of ``n`` tiles of ``size`` px."""
    import numpy as np

    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.imageio import write_png
    from aerosynth.data.tileset import SplitInfo, TileRecord, tiles_document

    rng = np.random.default_rng(0)
    splits = []
    for name, domain, colour in (
        ("source-train", "madison_drone", (90, 110, 80)),
        ("target-train", DOMAIN, (120, 120, 130)),
    ):
        split = root / name
        records = []
        for i in range(n):
            img = np.array(colour, dtype=np.float64) + rng.normal(0, 12, (size, size, 3))
            if i % 2 == 0:
                x, y = rng.integers(0, size - size // 8, 2)
                img[y : y + size // 16, x : x + size // 8] = (230, 230, 230)
            write_png(split / "images" / f"t{i:03d}.png", np.clip(img, 0, 255).astype(np.uint8))
            records.append(TileRecord(f"t{i:03d}", "synthetic", "g0", 0, 0, size, size, i % 2 == 0))
        info = SplitInfo(name=name, domain=domain, gsd=0.125, tile_size=size, weak=True)
        atomic_write_json(split / "tiles.json", tiles_document(info, records))
        splits.append(split)
    return splits


class _Probe:
    """Wall time and peak memory (GPU when on CUDA, else process RSS) of a block."""

    def __init__(self, device) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def __enter__(self) -> _Probe:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.start
        if self.cuda:
            self.peak_gib = self.torch.cuda.max_memory_allocated() / 2**30
        else:
            self.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_training(preset: str, splits: list[Path], work: Path, args, device, precision: str) -> dict:
    """Time ``train_stage("A")``: ``warmup`` untimed steps, then ``train_steps`` timed ones."""
    import torch

    from aerosynth.generation.training import StageAConfig, train_stage

    stamps: list[float] = []
    total = args.warmup + args.train_steps

    def on_step(step: int, losses: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if step == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if step >= total:
            raise _EnoughSteps

    cfg = StageAConfig(
        preset=preset,
        steps=10**6,
        batch_size=args.batch,
        checkpoint_every=10**9,
        learning_rate=1e-5,
        device=str(device),
        mixed_precision=precision,
        progress=False,
    )
    start = time.perf_counter()
    try:
        train_stage("A", cfg, splits, work / f"stageA-{precision}", resume=False, on_step=on_step)
    except _EnoughSteps:
        pass
    timed = stamps[-1] - stamps[args.warmup - 1] if args.warmup else stamps[-1] - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "stage": "A",
        "mixed_precision": precision,
        "batch_size": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.train_steps,
        "s_per_it": timed / args.train_steps,
        "it_per_s": args.train_steps / timed,
        "tiles_per_s": args.train_steps * args.batch / timed,
        "first_step_s": stamps[0] - start,
        "peak_gpu_memory_gib": peak,
    }


def _plain_denoise(ldm, latents, ids, scheduler, steps: int, guidance: float, precision: str):
    """:func:`aerosynth.generation.sampling.denoise` without capture (diffusers' default attention processors)."""
    import torch

    from aerosynth.generation.device import autocast

    scheduler.set_timesteps(steps)
    with torch.no_grad():
        with autocast(latents.device, precision):
            context = torch.cat([ldm.encode_text(ldm.token_ids([""] * len(ids))), ldm.encode_text(ids)])
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            with autocast(latents.device, precision):
                eps = ldm.unet(model_in, t, context).sample.float()
            e_uncond, e_cond = eps.chunk(2)
            latents = scheduler.step(e_uncond + guidance * (e_cond - e_uncond), t, latents).prev_sample
    return latents


def time_sampling(ldm, args, device, precision: str, work: Path) -> tuple[dict, dict]:
    """Capture on vs off (median of ``repeats`` alternating batches), then one ``generate_set`` call."""
    import torch

    from aerosynth.generation.attention import default_capture_sides
    from aerosynth.generation.models import token_positions
    from aerosynth.generation.sampling import (
        SamplingConfig,
        _seed_noise,
        capture_token_ids,
        denoise,
        generate_set,
        heatmaps,
        make_scheduler,
        to_uint8,
    )

    guidance, batch, size = 7.5, args.batch, ldm.spec.image_size
    side = size // ldm.codec.factor
    config = SamplingConfig(steps=args.sample_steps, batch_size=batch, use_learned_tokens=True, progress=False)
    prompt = ldm.prompt(DOMAIN, True, True)
    ids = ldm.token_ids([prompt] * batch)
    positions = token_positions(ids, capture_token_ids(ldm, DOMAIN, config))
    sides = default_capture_sides(ldm.unet, side)
    scheduler = make_scheduler(ldm, "ddim")

    def noise(seed: int) -> torch.Tensor:
        return (_seed_noise(ldm, range(batch), seed, side) * scheduler.init_noise_sigma).to(device)

    def capture_on(seed: int) -> None:
        latents, maps = denoise(
            ldm, noise(seed), ids, positions, scheduler, args.sample_steps, guidance, sides, mixed_precision=precision
        )
        with torch.no_grad():
            to_uint8(ldm.codec.decode(latents))
        heatmaps(maps, size)

    def capture_off(seed: int) -> None:
        latents = _plain_denoise(ldm, noise(seed), ids, scheduler, args.sample_steps, guidance, precision)
        with torch.no_grad():
            to_uint8(ldm.codec.decode(latents))

    runs: dict[str, list[tuple[float, float]]] = {"capture_off": [], "capture_on": []}
    fns = {"capture_off": capture_off, "capture_on": capture_on}
    for fn in fns.values():  # warm-up
        fn(0)
    for r in range(args.repeats):
        for name, fn in fns.items():
            with _Probe(device) as probe:
                fn(r + 1)
            runs[name].append((probe.wall, probe.peak_gib))
    result: dict = {
        "scheduler": "ddim",
        "steps": args.sample_steps,
        "guidance_scale": guidance,
        "batch": batch,
        "mixed_precision": precision,
        "image_size": size,
        "capture_sides": sorted(sides, reverse=True),
    }
    for name, values in runs.items():
        wall = statistics.median(v[0] for v in values)
        result[name] = {
            "s_per_batch": wall,
            "images_per_s": batch / wall,
            "s_per_denoising_step": wall / args.sample_steps,
            "peak_memory_gib": max(v[1] for v in values),
            "walls_s": [v[0] for v in values],
        }
    result["capture_overhead_ratio"] = result["capture_on"]["s_per_batch"] / result["capture_off"]["s_per_batch"]
    result["capture_memory_ratio"] = result["capture_on"]["peak_memory_gib"] / max(
        result["capture_off"]["peak_memory_gib"], 1e-9
    )
    cfg = SamplingConfig(
        steps=args.sample_steps,
        batch_size=batch,
        shard_size=batch,
        use_learned_tokens=True,
        progress=False,
        device=str(device),
        mixed_precision=precision,
    )
    with _Probe(device) as probe:
        generate_set(ldm, work / f"set-{precision}", "target_cars", DOMAIN, 2 * batch, config=cfg)
    end_to_end = {
        "images": 2 * batch,
        "wall_s": probe.wall,
        "images_per_s": 2 * batch / probe.wall,
        "peak_memory_gib": probe.peak_gib,
    }
    return result, end_to_end


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from checkout import use_checkout

    use_checkout()
    from aerosynth.data.offline import apply_offline_settings

    apply_offline_settings()
    import torch

    if args.dry_run:
        args.preset, args.device, args.precision = "tiny", "cpu", "no"
        args.warmup, args.train_steps, args.sample_steps, args.repeats = 1, 2, 2, 1
        args.batch = min(args.batch, 2)
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); run it on a machine with an NVIDIA GPU, "
            "or pass --dry-run to check the script on the CPU",
            file=sys.stderr,
        )
        return 2
    from aerosynth.data.errors import InputError
    from aerosynth.generation.device import resolve_device
    from aerosynth.generation.models import PRESETS, build_ldm

    try:
        device = resolve_device(args.device, "--device")
    except InputError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    spec = PRESETS[args.preset]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        splits = _write_tiles(work / "tiles", spec.image_size, max(4, args.batch))
        precision = args.precision
        notes: list[str] = []
        print(f"gpu_check: stage A, preset {args.preset}, {precision}, batch {args.batch}", flush=True)
        try:
            training = time_training(args.preset, splits, work, args, device, precision)
        except FloatingPointError as exc:
            if precision != "fp16":
                raise
            notes.append(f"fp16 training gave a non-finite loss ({exc}); timed with bf16 instead")
            precision = "bf16"
            training = time_training(args.preset, splits, work, args, device, precision)
        print(f"gpu_check: training {training['s_per_it']:.3f} s/it", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        build = time.perf_counter()
        ldm = build_ldm(args.preset).to(device)
        ldm.unet.eval()
        build_s = time.perf_counter() - build
        params = {name: sum(p.numel() for p in module.parameters()) for name, module in ldm.components().items()}
        print(f"gpu_check: sampling, {params['unet'] / 1e6:.0f} M parameter UNet", flush=True)
        sampling, end_to_end = time_sampling(ldm, args, device, precision, work)
        print(
            f"gpu_check: capture on {sampling['capture_on']['images_per_s']:.2f} img/s, "
            f"off {sampling['capture_off']['images_per_s']:.2f} img/s, "
            f"overhead x{sampling['capture_overhead_ratio']:.3f}",
            flush=True,
        )
    doc = {
        "dry_run": bool(args.dry_run),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "model": {
            "preset": args.preset,
            "image_size": spec.image_size,
            "latent_shape": [ldm.codec.latent_channels] + [spec.image_size // ldm.codec.factor] * 2,
            "parameters": params,
            "build_s": build_s,
        },
        "mixed_precision": precision,
        "training": training,
        "sampling": sampling,
        "generate_set": end_to_end,
        "notes": notes,
        "memory_unit": "GiB of torch.cuda.max_memory_allocated (dry run: peak RSS)",
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("gpu", "torch", "cuda", "mixed_precision", "wall_s")}))
    print(f"gpu_check: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
