"""aerial-v1 with the LDM fine-tuned on a lent GPU: pack here, train there, bring it back, run the adapt flow here.

The GPU box gets no imagery: a latent pack (uint8 TAEF2 latents of the training tiles with their box
masks, see :mod:`aerosynth.generation.latent_pack`) and the TAEF2 weights. Stages A-C (box-supervised
attention and conditioning dropout on, as on CPU) run there on a wall-clock budget (step counts come
from a short calibration of each stage, or ``--steps``); the stage-C model comes back as fp16 files
under 16 MB each. Everything after fine-tuning runs here through the adapt flow of
``benchmarks/configs/adapt_flow_<target>.yaml``: the text-to-image samples, the translation, the
harmonised and blended copy-paste composites, the heat-map and fused labels of the real tiles and every
detector, with what does not depend on the LDM (tiles, F_S, continued, oracle, copy-paste, F_S's labels)
copied from the CPU run, so the two runs differ in the LDM only.

    python benchmarks/gpu_ldm.py pack --target minsk                  # here: .gpu_pack/minsk-latents.npz (git-ignored)
    # on the device (one call, ~9 min of its 15 with start-up; .whl/ holds the wheels it lacks):
    #   run(command="pip install -q --no-deps .whl/*.whl && pip install -q --no-deps --no-build-isolation -e . &&
    #                python benchmarks/gpu_ldm.py train --target minsk --budget-s 300 --export $OUT/minsk",
    #       carry=[".gpu_pack", ".whl"], timeout_s=540)
    python benchmarks/gpu_ldm.py unpack --target minsk FOLDER_WITH_RETURNED_FILES    # here
    nohup python benchmarks/gpu_ldm.py evaluate --target minsk > benchmarks/work/gpu-ldm-minsk.log 2>&1 &   # here

Dry run of the whole path on this CPU (token budgets; checks that every step runs, not the figures):

    python benchmarks/gpu_ldm.py train --target minsk --device cpu --precision no --steps 2,2,2 --batch-size 4 \\
        --work /tmp/gpu-dry/work --export /tmp/gpu-dry/export
    python benchmarks/gpu_ldm.py unpack --target minsk --model-dir /tmp/gpu-dry/model /tmp/gpu-dry/export
    python benchmarks/gpu_ldm.py evaluate --target minsk --dry-run --model-dir /tmp/gpu-dry/model \\
        --work-dir /tmp/gpu-dry/run

Writes ``benchmarks/results/gpu_ldm/adapt_flow_<target>_gpu.json`` (``_gpu_dry_run.json`` for a dry run) in
``benchmarks/adapt_flow.py``'s format, with the training record under ``ldm_training``; the training
records in ``benchmarks/results/gpu_ldm/aerial-v1-gpu-ldm-training-<target>/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import use_checkout  # noqa: E402  (the GPU machine runs it from a plain checkout)

use_checkout()
PACK_DIR = REPO / ".gpu_pack"
PACK_FILE = PACK_DIR / "aerial-v1-latents.npz"
CPU_WORK = REPO / "benchmarks" / "work" / "aerial-v1-cpu"
#: The adapt run whose tiles each target's pack is made from.
TARGET_WORK = {"kit": CPU_WORK, "minsk": REPO / "benchmarks" / "work" / "aerial-v1-minsk-cpu"}
GPU_WORK = REPO / "benchmarks" / "work" / "aerial-v1-gpu-ldm"
RESULTS = REPO / "benchmarks" / "results" / "gpu_ldm"
SHARD_BYTES = 15_000_000


# ----------------------------------------------------------------------------- here: pack
def pack(args: argparse.Namespace) -> None:
    from aerosynth.generation.latent_pack import write_latent_pack

    work = TARGET_WORK[args.target]
    tiles = work / "tiles"
    if not (tiles / "source-train").is_dir():
        sys.exit(f"gpu_ldm pack: {tiles} has no tiles; run `aerosynth adapt --preset ... --until tiles` first")
    cache = work / "ldm" / "stageA" / "cache" / "latents.pt"
    tmp_cache = Path(f"/tmp/aerosynth-gpu-ldm-latents-{args.target}.pt")
    if cache.is_file():  # reuse the CPU run's encoding (a copy: a key mismatch must not touch that run)
        shutil.copyfile(cache, tmp_cache)
    out = write_latent_pack(
        [tiles / "source-train", tiles / "target-train"],
        _pack_file(args.target),
        preset="cpu",
        autoencoder_dir=args.autoencoder_dir,
        max_per_group=args.max_per_group,
        cache=tmp_cache,
    )
    shutil.copytree(args.autoencoder_dir, PACK_DIR / "taef2", dirs_exist_ok=True)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")


def _pack_file(target: str | None) -> Path:
    return PACK_DIR / f"{target}-latents.npz" if target else PACK_FILE


# ----------------------------------------------------------------------------- GPU: train
def _stage_rate(stamps: list[float]) -> float:
    """Seconds per step after the first third of the steps (warm-up, autotuning)."""
    skip = max(1, len(stamps) // 3)
    return (stamps[-1] - stamps[skip - 1]) / (len(stamps) - skip)


def _export_fp16(model_dir: Path, dest: Path) -> list[str]:
    """``unet``/``text_encoder`` weights as fp16 safetensors files of at most ``SHARD_BYTES`` each."""
    import torch
    from safetensors.torch import load_file, save_file

    written = []
    for name in ("unet", "text_encoder"):
        state = load_file(str(model_dir / f"{name}.safetensors"))
        shards: list[dict] = [{}]
        size = 0
        for key in sorted(state):
            t = state[key]
            t = t.half() if t.is_floating_point() else t
            if not bool(torch.isfinite(t.float()).all()):
                raise SystemExit(f"{name}.{key} does not fit fp16")
            nbytes = t.numel() * t.element_size()
            if size + nbytes > SHARD_BYTES and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][key] = t.contiguous()
            size += nbytes
        for i, shard in enumerate(shards):
            path = dest / f"{name}-fp16-{i + 1}-of-{len(shards)}.safetensors"
            save_file(shard, str(path))
            written.append(path.name)
    return written


def train(args: argparse.Namespace) -> None:
    import torch

    from aerosynth.generation.training import StageAConfig, StageBConfig, StageCConfig, train_stage

    if args.device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work, export = Path(args.work), Path(args.export)
    work.mkdir(parents=True, exist_ok=True)
    export.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info: dict = {
        "device": args.device,
        "mixed_precision": args.precision,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "budget_s": None if args.steps else args.budget_s,
        "latent_pack": _pack_file(args.target).name,
        "target": args.target,
        "args": args,
    }
    if args.device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(0)
    common = {
        "preset": "cpu",
        "seed": 0,
        "progress": False,
        "device": args.device,
        "mixed_precision": args.precision,
        "batch_size": args.batch_size,
        "autoencoder_dir": Path(args.autoencoder_dir),
    }
    lrs = {"A": args.lr_a, "B": args.lr_b, "C": args.lr_c}
    classes = {"A": StageAConfig, "B": StageBConfig, "C": StageCConfig}

    def config(stage: str, steps: int, init: Path | None):
        extra = {"ema_decay": args.ema_a} if stage == "A" and args.ema_a and steps >= 1000 else {}
        return classes[stage](
            **common,
            **extra,
            steps=steps,
            learning_rate=lrs[stage],
            checkpoint_every=max(steps // 2, 1),
            init_model=init,
        )

    def run(stage: str, steps: int, init: Path | None, out: Path) -> tuple[Path, list[float]]:
        stamps: list[float] = []

        def on_step(step: int, logs: dict) -> None:
            stamps.append(time.perf_counter())
            if step % max(steps // 10, 1) == 0 or step == steps:
                msg = " ".join(f"{k}={float(v):.4f}" for k, v in logs.items())
                print(f"stage {stage} step {step}/{steps} {msg} ({time.perf_counter() - t_start:.0f} s)", flush=True)

        model = train_stage(
            stage,
            config(stage, steps, init),
            [],
            out,
            resume=False,
            on_step=on_step,
            latent_pack=_pack_file(args.target),
        )
        return model, stamps

    if args.steps:
        steps = dict(zip("ABC", (int(x) for x in args.steps.split(",")), strict=True))
        info["steps"] = steps
    else:
        steps = calibrate(run, info)
    run_stages(run, steps, info, t_start, work, export)


def calibrate(run, info: dict) -> dict[str, int]:
    """Step counts of A, B, C that fit the budget, from a few timed steps of A and of B."""
    args = info["args"]
    work = Path(args.work)
    t0 = time.perf_counter()
    cal_a, stamps = run("A", args.cal_steps, None, work / "calibration" / "stageA")
    rate_a = _stage_rate(stamps)
    _, stamps = run("B", args.cal_steps, cal_a, work / "calibration" / "stageB")
    rate_b = _stage_rate(stamps)
    calibration_s = time.perf_counter() - t0
    budget = max(args.budget_s - calibration_s, 10.0)
    steps = {
        "A": int(args.share_a * budget / rate_a),
        "B": int(args.share_b * budget / rate_b),
        "C": int((1 - args.share_a - args.share_b) * budget / rate_b),
    }
    steps = {k: max(args.min_steps, v // 10 * 10) for k, v in steps.items()}
    info.update(
        {
            "calibration": {"s_per_step_a": rate_a, "s_per_step_b": rate_b, "seconds": round(calibration_s, 1)},
            "steps": steps,
        }
    )
    print(f"calibration: A {rate_a:.4f} s/step, B {rate_b:.4f} s/step; steps {steps}", flush=True)
    return steps


def run_stages(run, steps: dict[str, int], info: dict, t_start: float, work: Path, export: Path) -> None:
    import torch

    info.pop("args")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model, seconds = None, {}
    for stage in ("A", "B", "C"):
        t0 = time.perf_counter()
        model, _ = run(stage, steps[stage], model, work / f"stage{stage}")
        seconds[stage] = round(time.perf_counter() - t0, 1)
        print(f"stage {stage}: {steps[stage]} steps in {seconds[stage]} s", flush=True)
    info["stage_seconds"] = seconds
    if torch.cuda.is_available():
        info["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    info["total_s"] = round(time.perf_counter() - t_start, 1)
    files = _export_fp16(model, export)
    (work / "gpu_training.json").write_text(json.dumps(info, indent=1) + "\n")
    with tarfile.open(export / "records.tar.gz", "w:gz") as tar:
        tar.add(work / "gpu_training.json", arcname="gpu_training.json")
        tar.add(model / "ldm.json", arcname="ldm.json")
        for stage in ("A", "B", "C"):
            for name in ("stage.json", "losses.csv"):
                if (work / f"stage{stage}" / name).is_file():
                    tar.add(work / f"stage{stage}" / name, arcname=f"stage{stage}/{name}")
    print(json.dumps(info), flush=True)
    print("exported:", files + ["records.tar.gz"], flush=True)


# ----------------------------------------------------------------------------- here: unpack
def _records_dir(model: Path, target: str | None, own_folder: bool) -> Path:
    """Where the training records of a returned model go: beside a model unpacked to a folder of one's own
    (a dry run), else under ``benchmarks/results/gpu_ldm/``."""
    if own_folder:
        return model.parent / "records"
    return RESULTS / ("aerial-v1-gpu-ldm-training" + (f"-{target}" if target else ""))


def unpack(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file, save_file

    src = Path(args.files)
    model = (
        Path(args.model_dir)
        if args.model_dir
        else GPU_WORK / "model"
        if args.target is None
        else REPO / "benchmarks" / "work" / "gpu-ldm" / args.target / "model"
    )
    model.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "text_encoder"):
        state: dict = {}
        parts = sorted(src.glob(f"{name}-fp16-*.safetensors"))
        if not parts:
            sys.exit(f"gpu_ldm unpack: no {name}-fp16-*.safetensors in {src}")
        for part in parts:
            state.update(load_file(str(part)))
        state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(state, str(model / f"{name}.safetensors"))
    records = _records_dir(model, args.target, bool(args.model_dir))
    shutil.rmtree(records, ignore_errors=True)
    records.mkdir(parents=True)
    with tarfile.open(src / "records.tar.gz") as tar:
        tar.extractall(records, filter="data")
    doc = json.loads((records / "ldm.json").read_text())
    doc["autoencoder_dir"] = str(Path(args.autoencoder_dir).resolve())  # the GPU box's path means nothing here
    (model / "ldm.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    from aerosynth.generation.models import load_ldm

    ldm = load_ldm(model)
    n = sum(p.numel() for p in ldm.unet.parameters())
    print(f"{model}: UNet {n / 1e6:.1f} M parameters, tokens trained: {ldm.spec.tokens_trained}")


# ----------------------------------------------------------------------------- here: evaluate
#: What an evaluation copies from the CPU run of its target: nothing here depends on the LDM, so the same
#: models and labels (their stages are found current and skipped).
REUSED = (
    "tiles",
    "detectors/source-only",
    "detectors/continued",
    "detectors/oracle",
    "detectors/copy-paste+source",
    "annotation/copy-paste",
    "annotation/real-self-training",
)
#: Settings of ``evaluate --dry-run``: every step of the flow, each on a token budget.
DRY_RUN = {
    "detection": {
        "seeds": [0],
        "epochs": 1,
        "max_train_images": 64,
        "finetune": {"epochs": 1, "images": 64},
        "mixes": [["real-heatmap", "copy-paste-blended"]],
        "reference_from": None,
    },
    "generation": {"counts": {"source_cars": 4, "target_cars": 4, "target_empty": 4}, "translation": {"max_tiles": 8}},
    "annotation": {
        "copy_paste": {"max_tiles": 16},
        "real_target": {"rounds": 2, "noise_fraction": [0.3], "heatmap_models": "last"},
        "relay": {"enabled": False},
    },
}


def evaluate(args: argparse.Namespace) -> None:
    """The adapt flow of ``benchmarks/configs/adapt_flow_<target>.yaml`` with the GPU-trained LDM, here.

    Every LDM-made set (text-to-image samples, translation, harmonised and blended composites) and the
    heat-map labels come from the returned model; what does not depend on the LDM is copied from the CPU
    run (:data:`REUSED`), so the two runs differ in the LDM only. Figures: ``adapt_flow_<target>_gpu.json``
    beside the CPU run's, in :mod:`adapt_flow`'s format.
    """
    from aerosynth.data.offline import apply_offline_settings

    apply_offline_settings()
    from aerosynth.flows.adapt import run_adapt
    from aerosynth.flows.config import load_config

    model = Path(args.model_dir) if args.model_dir else REPO / "benchmarks" / "work" / "gpu-ldm" / args.target / "model"
    if not (model / "ldm.json").is_file():
        sys.exit(f"gpu_ldm evaluate: no model in {model}; run `gpu_ldm.py unpack --target {args.target}` first")
    work = Path(args.work_dir) if args.work_dir else REPO / "benchmarks" / "work" / "gpu-ldm" / args.target / "run"
    cpu_work = TARGET_WORK[args.target]
    for part in REUSED if not args.dry_run else ("tiles",):  # a dry run trains token-budget baselines of its own
        if not (work / part).exists() and (cpu_work / part).exists():
            (work / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(cpu_work / part, work / part, symlinks=True)
    generation = {"init_model": str(model), **{f"stage_{s}": {"steps": 0} for s in "abc"}}
    overrides = {"work_dir": str(work), "name": f"aerial-v1-gpu-ldm-{args.target}", "generation": generation}
    if args.dry_run:  # DRY_RUN sets other generation keys than these
        overrides = {**DRY_RUN, **overrides, "generation": {**DRY_RUN["generation"], **generation}}
    cfg = load_config(REPO / "benchmarks" / "configs" / f"adapt_flow_{args.target}.yaml", overrides=overrides)
    t0 = time.perf_counter()
    report = run_adapt(cfg)
    wall = round(time.perf_counter() - t0, 1)
    from adapt_flow import collect

    name = f"adapt_flow_{args.target}_gpu{'_dry_run' if args.dry_run else ''}.json"
    out = RESULTS / name
    ns = argparse.Namespace(target=args.target, config=None, work_dir=str(work), out=str(out), fresh=False)
    result = collect(ns, command=f"python benchmarks/gpu_ldm.py evaluate --target {args.target}", wall_s=wall)
    training = _records_dir(model, args.target, bool(args.model_dir)) / "gpu_training.json"
    result["ldm_training"] = json.loads(training.read_text()) if training.is_file() else None
    result["machine"] = "LDM stages A-C: the device's GPU (ldm_training); everything else: 2 CPU cores"
    result["dry_run"] = bool(args.dry_run)
    result["report"] = str(report)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{out}: {len(result['variants'])} variants")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write .gpu_pack/ from the CPU run's tiles")
    p.add_argument("--autoencoder-dir", default=str(REPO.parent / "shared" / "weights" / "taef2"))
    p.add_argument("--max-per-group", type=int, default=1400)
    p.add_argument("--target", choices=sorted(TARGET_WORK), default="kit")
    p = sub.add_parser("train", help="stages A-C from the pack on a wall-clock budget (the GPU machine)")
    p.add_argument("--export", required=True, help="folder for the fp16 weights and records")
    p.add_argument("--target", choices=sorted(TARGET_WORK), help="train from .gpu_pack/<target>-latents.npz")
    p.add_argument("--work", default="/tmp/aerosynth-gpu-ldm")
    p.add_argument("--autoencoder-dir", default=str(PACK_DIR / "taef2"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=["no", "fp16", "bf16"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=300.0, help="seconds for calibration and stages A-C")
    p.add_argument("--cal-steps", type=int, default=30)
    p.add_argument("--steps", help="fixed steps of A,B,C (e.g. 1400,600,600) instead of calibrating to the budget")
    p.add_argument("--share-a", type=float, default=0.5)
    p.add_argument("--share-b", type=float, default=0.25)
    p.add_argument("--min-steps", type=int, default=10)
    p.add_argument("--lr-a", type=float, default=2e-4)
    p.add_argument("--lr-b", type=float, default=1e-4, help="stage B (tokens only: the UNet stays frozen)")
    p.add_argument("--lr-c", type=float, default=1e-5)
    p.add_argument("--ema-a", type=float, default=0.999)
    p = sub.add_parser("unpack", help="fp16 files back into a model folder (benchmarks/work/aerial-v1-gpu-ldm)")
    p.add_argument("files")
    p.add_argument("--target", choices=sorted(TARGET_WORK), help="unpack into benchmarks/work/gpu-ldm/<target>/model")
    p.add_argument("--model-dir", help="unpack into this folder instead")
    p.add_argument("--autoencoder-dir", default=str(REPO.parent / "shared" / "weights" / "taef2"))
    p = sub.add_parser(
        "evaluate", help="the adapt flow here with the returned LDM (benchmarks/configs/adapt_flow_<target>.yaml)"
    )
    p.add_argument("--target", choices=sorted(TARGET_WORK), default="minsk")
    p.add_argument("--model-dir", help="the unpacked model (default benchmarks/work/gpu-ldm/<target>/model)")
    p.add_argument("--work-dir", help="the run folder (default benchmarks/work/gpu-ldm/<target>/run)")
    p.add_argument("--dry-run", action="store_true", help="token budgets everywhere: checks the path, not the figures")
    args = parser.parse_args(argv)
    {"pack": pack, "train": train, "unpack": unpack, "evaluate": evaluate}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
