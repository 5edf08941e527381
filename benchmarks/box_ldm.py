"""Box-supervised LDM on aerial-v1 (both targets): stage A on 2 cores, then its heat-map quality.

Trains the ``cpu`` model (12.9 M UNet on the pretrained TAEF2) with the box-supervised attention loss on
Madison source-train tiles (their boxes), conditioning dropout and trained text embeddings, on Madison
source-train (at most ``--max-tiles`` evenly spaced), KIT target-train and Minsk target-train (weak flags
only). Then scores heat-map boxes (``aerosynth map-quality``'s method) on real source-val (the gate: the
only split settings may be chosen on) and, as a diagnostic through the evaluation API, on the KIT and
Minsk target-test tiles, at noise 0.1, 0.3 and 0.5.

    python benchmarks/box_ldm.py train --steps 1800 [--box-loss l1|bce] [--name stageA]
        [--timestep-sampling high] [--prediction-type v_prediction --zero-terminal-snr]
        [--stage B|C --init NAME]
    python benchmarks/box_ldm.py quality [--name stageA]
    python benchmarks/box_ldm.py samples [--name stageA] [--count 64]   # grids + two-sample test
    python benchmarks/box_ldm.py flags [--name stageA]   # weak-flag check of the maps on target-train
    python benchmarks/box_ldm.py denoise [--name stageA] # one-step denoising error per level, held-out tiles
    python benchmarks/box_ldm.py errors [--name stageA] [--noise 0.3]   # where the chosen readout errs
    python benchmarks/box_ldm.py table                   # markdown table of every model's figures

Resumable: training checkpoints every 50 steps; a rerun continues. Results:
``benchmarks/results/box_ldm/box_ldm_<name>.json`` (training record, map quality, and each command's entry).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import use_checkout  # noqa: E402

use_checkout()

WORK = REPO / "benchmarks" / "work" / "box-ldm"
TILES = {"kit": REPO / "benchmarks" / "work" / "tiles-kit", "minsk": REPO / "benchmarks" / "work" / "tiles-minsk"}
TAEF2 = REPO.parent / "shared" / "weights" / "taef2"
RESULTS = REPO / "benchmarks" / "results" / "box_ldm"
NOISE = (0.1, 0.3, 0.5)


def train(
    name: str,
    steps: int,
    box_loss: str,
    max_tiles: int,
    lr: float,
    box_max_timestep: float,
    lambda_empty: float = 0.0,
    lambda_present: float = 0.0,
    timestep_sampling: str = "uniform",
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
    stage: str = "A",
    init: str | None = None,
    ema_decay: float | None = None,
    train_unet: bool | None = None,
) -> Path:
    """Stage A of a new ``cpu`` model, or stage B / C from the model folder of ``init`` (another name)."""
    from aerosynth.generation.training import StageAConfig, StageBConfig, StageCConfig, train_stage

    if stage != "A" and init is None:
        raise SystemExit(f"stage {stage} starts from another model: give --init NAME")
    config_class = {"A": StageAConfig, "B": StageBConfig, "C": StageCConfig}[stage]
    cfg = config_class(
        init_model=WORK / init / "model" if init else None,
        preset="cpu",
        steps=steps,
        batch_size=8,
        learning_rate=lr,
        autoencoder_dir=TAEF2,
        lambda_box=1.0,
        box_loss=box_loss,
        box_max_timestep=box_max_timestep,
        lambda_empty=lambda_empty,
        lambda_present=lambda_present,
        timestep_sampling=timestep_sampling,
        prediction_type=prediction_type,
        zero_terminal_snr=zero_terminal_snr,
        ema_decay=ema_decay,
        train_unet=train_unet,
        cond_dropout=0.1,
        train_text="embeddings",
        max_tiles_per_split=max_tiles,
        checkpoint_every=50,
        progress=False,
        seed=0,
    )
    splits = [TILES["kit"] / "source-train", TILES["kit"] / "target-train", TILES["minsk"] / "target-train"]
    started = time.perf_counter()

    def on_step(step: int, losses: dict) -> None:
        if step % 25 == 0:
            print(
                f"{time.strftime('%H:%M:%S')} step {step}/{steps} "
                + " ".join(f"{k}={v:.4f}" for k, v in losses.items()),
                flush=True,
            )

    model = train_stage(stage, cfg, splits, WORK / name, on_step=on_step)
    print(f"trained in {time.perf_counter() - started:.0f} s (this invocation)", flush=True)
    return model


def quality(name: str, limit: int | None, suffix: str = "") -> dict:
    """Heat-map boxes of one model on real tiles: the default rule, and the readout chosen on source-val.

    Per noise level, the readout (normalisation, resampling, fixed threshold, peak split) is chosen on
    source-val only (:func:`choose_readout`) and then applied unchanged to both target-test splits. A
    two-fold check on source-val (choose on even tiles, score on odd, and back) says how much choosing on
    the same tiles flatters the source-val figure.
    """
    from aerosynth.annotation.map_quality import choose_readout, evaluate_map_quality, memoised
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.generation.models import load_ldm
    from aerosynth.generation.real_maps import cars_map_function

    model_dir = WORK / name / "model"
    ldm = load_ldm(model_dir)
    stage = json.loads((WORK / name / "stage.json").read_text())
    path = RESULTS / f"box_ldm_{name}{suffix}.json"
    # the other commands' entries (denoise, flags, errors) are kept; this command's are replaced
    doc: dict = json.loads(path.read_text()) if path.is_file() else {}
    doc.update({"model": str(model_dir.relative_to(REPO)), "stage": stage, "map_quality": {}, "readout": {}})
    doc.pop("errors", None)  # they read the readout chosen here
    val = open_evaluation_split(TILES["kit"], "source-val")
    targets = {
        "target-test-kit": (open_evaluation_split(TILES["kit"], "target-test"), "kit_munich_aerial"),
        "target-test-minsk": (open_evaluation_split(TILES["minsk"], "target-test"), "minsk_drone"),
    }

    def entry(report: dict, started: float) -> dict:
        return {
            "ap50": report["scores"]["ap50"],
            "precision": report["scores"]["precision"],
            "recall": report["scores"]["recall"],
            "best_sweep": {
                k: report["best_sweep"][k] for k in ("fixed_threshold", "precision", "recall", "f1", "ap50")
            },
            "tiles": report["tiles"],
            "seconds": round(time.perf_counter() - started, 1),
        }

    caches: dict[str, dict] = {}  # each tile encoded once per domain for all noise levels
    for noise in NOISE:
        started = time.perf_counter()
        fn = memoised(cars_map_function(ldm, "madison_drone", noise, seed=0, encode_cache=caches.setdefault("s", {})))
        doc["map_quality"][f"source-val@{noise}"] = entry(evaluate_map_quality(val, fn, limit=limit), started)
        readout, report = choose_readout(val, fn, limit=limit)
        folds = []
        scored_tiles = [t.tile_id for t in val.tiles[:limit]]
        for k in (0, 1):
            fold_split, test_split = val.subset(scored_tiles[k::2]), val.subset(scored_tiles[1 - k :: 2])
            chosen, _ = choose_readout(fold_split, fn)  # maps come from the memo: one UNet pass per tile
            scored = evaluate_map_quality(test_split, fn, config=chosen.config, normalise=chosen.normalise)
            folds.append(scored["scores"]["ap50"])
        doc["readout"][f"{noise}"] = {
            "chosen": report["chosen"],
            "source_val_ap50": report["chosen"]["ap50"],
            "source_val_two_fold_ap50": folds,
        }
        print("source-val", noise, json.dumps(doc["readout"][f"{noise}"]["chosen"]), folds, flush=True)
        for label, (split, domain) in targets.items():
            started = time.perf_counter()
            tfn = memoised(cars_map_function(ldm, domain, noise, seed=0, encode_cache=caches.setdefault(domain, {})))
            e = entry(evaluate_map_quality(split, tfn, limit=limit), started)
            chosen_report = evaluate_map_quality(
                split, tfn, config=readout.config, normalise=readout.normalise, limit=limit
            )
            e["chosen_readout"] = {k: chosen_report["scores"][k] for k in ("ap50", "precision", "recall")}
            doc["map_quality"][f"{label}@{noise}"] = e
            print(label, noise, json.dumps(e), flush=True)
    doc["note"] = (
        "target-test figures are a diagnostic (evaluation API); the readout is chosen on source-val only "
        "and applied unchanged to target-test"
    )
    atomic_write_json(path, doc)
    return doc


def errors(name: str, noise: float) -> dict:
    """Where the chosen readout's boxes go wrong on real tiles (a diagnostic through the evaluation API).

    Every box of the readout chosen on source-val at ``noise`` is a true positive, on an ignore region, a
    false positive on a tile without vehicles, or a false positive on a tile with vehicles whose best IoU
    with a true box is 0.1-0.5 (``near``: a merged, split or shifted box) or below 0.1 (``far``); with the
    median confidence of each kind, and the AP50 on the tiles with vehicles alone (what a perfect tile
    gate would leave).
    """
    import numpy as np

    from aerosynth.annotation.map_quality import MapReadout, score_boxes
    from aerosynth.annotation.metrics import match_image
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.detections import box_iou
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.generation.models import load_ldm
    from aerosynth.generation.real_maps import cars_map_function

    path = RESULTS / f"box_ldm_{name}.json"
    doc = json.loads(path.read_text())
    readout = MapReadout.from_dict(doc["readout"][f"{noise:g}"]["chosen"])
    ldm = load_ldm(WORK / name / "model")
    out = doc.setdefault("errors", {})
    for label, target, split_name, domain in (
        ("source-val", "kit", "source-val", "madison_drone"),
        ("target-test-kit", "kit", "target-test", "kit_munich_aerial"),
        ("target-test-minsk", "minsk", "target-test", "minsk_drone"),
    ):
        split = open_evaluation_split(TILES[target], split_name)
        fn = cars_map_function(ldm, domain, noise, seed=0)
        maps = [fn(split.image(t.tile_id)) for t in split.tiles]
        preds = readout.boxes(maps, split.info.gsd, (split.info.tile_size, split.info.tile_size))
        gts = [split.labels(t.tile_id) for t in split.tiles]
        ignores = [split.ignore_regions(t.tile_id) for t in split.tiles]
        kinds: dict[str, list[float]] = {k: [] for k in ("tp", "ignored", "fp_empty_tile", "fp_near", "fp_far")}
        for pred, gt, ign in zip(preds, gts, ignores, strict=True):
            if not len(pred):
                continue
            tp, ignored = match_image(pred, gt, ign)
            best = box_iou(pred.xyxy, gt.xyxy).max(axis=1) if len(gt) else np.zeros(len(pred))
            for k, conf in enumerate(pred.confidence):
                kind = (
                    "tp"
                    if tp[k]
                    else "ignored"
                    if ignored[k]
                    else "fp_empty_tile"
                    if not len(gt)
                    else "fp_near"
                    if best[k] >= 0.1
                    else "fp_far"
                )
                kinds[kind].append(float(conf))
        with_vehicles = [i for i, g in enumerate(gts) if len(g)]
        flagged = score_boxes(
            [preds[i] for i in with_vehicles], [gts[i] for i in with_vehicles], [ignores[i] for i in with_vehicles]
        )
        out[f"{label}@{noise:g}"] = {
            "boxes": {k: len(v) for k, v in kinds.items()},
            "median_confidence": {k: round(float(np.median(v)), 3) if v else None for k, v in kinds.items()},
            "true_boxes": int(sum(len(g) for g in gts)),
            "tiles": len(gts),
            "tiles_with_vehicles": len(with_vehicles),
            "ap50_all_tiles": score_boxes(preds, gts, ignores)["ap50"],
            "ap50_tiles_with_vehicles": flagged["ap50"],
        }
        print(name, label, json.dumps(out[f"{label}@{noise:g}"]), flush=True)
    atomic_write_json(path, doc)
    return out


def flags(name: str, limit: int, noise: float) -> dict:
    """Label-free checks of the "cars" maps on target-train: flag AUC of each tile's map peak, box sizes.

    A model whose maps ignore vehicles in a target domain (or never attend there) scores about 0.5, however
    good it is on source-val; the check reads only the weak flags the method is allowed.
    """
    import numpy as np

    from aerosynth.annotation.map_quality import MapReadout, flag_auc
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.tileset import open_split
    from aerosynth.generation.models import load_ldm
    from aerosynth.generation.real_maps import cars_map_function

    ldm = load_ldm(WORK / name / "model")
    val = open_split(TILES["kit"] / "source-val")
    source_area = float(np.median([a for t in val.tiles for a in val.labels(t.tile_id).area]))
    path = RESULTS / f"box_ldm_{name}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"model": str((WORK / name / "model").relative_to(REPO))}
    checks = doc.setdefault("flag_auc_target_train", {})
    for target, domain in (("kit", "kit_munich_aerial"), ("minsk", "minsk_drone")):
        split = open_split(TILES[target] / "target-train")
        step = max(1, len(split.tiles) // limit)
        tiles = split.tiles[::step][:limit]
        fn = cars_map_function(ldm, domain, noise, seed=0)
        maps = [fn(split.image(t.tile_id)) for t in tiles]
        auc = flag_auc(maps, [t.has_vehicle for t in tiles])
        entry = {"auc": auc, "tiles": len(tiles), "flagged": sum(t.has_vehicle for t in tiles)}
        chosen = (doc.get("readout") or {}).get(f"{noise:g}")
        if chosen is not None:
            # label-free size check: vehicles are the same size at one GSD, so the readout's boxes on the
            # flagged target-train tiles should be about as large as real source-val vehicles
            readout = MapReadout.from_dict(chosen["chosen"])
            boxes = readout.boxes(maps, split.info.gsd, (split.info.tile_size, split.info.tile_size))
            areas = [float(a) for d, t in zip(boxes, tiles, strict=True) if t.has_vehicle for a in d.area]
            entry["box_area_ratio"] = float(np.median(areas) / source_area) if areas else 0.0
        checks[f"{target}@{noise}"] = entry
        print(name, target, noise, json.dumps(entry), flush=True)
    atomic_write_json(path, doc)
    return doc


def denoise(name: str, per_split: int = 16) -> dict:
    """One-step clean-latent error per noise level on held-out real tiles (source-val, both target-tests).

    Evenly spaced tiles of each split with their domain's prompt (vehicle prompt when flagged), seeded
    noise: where in the schedule the model is weak (high noise sets the layout text-to-image needs).
    """
    import numpy as np
    import torch
    from diffusers import DDPMScheduler

    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.tileset import open_split
    from aerosynth.generation.models import load_ldm, noise_schedule
    from aerosynth.generation.training import denoising_error

    ldm = load_ldm(WORK / name / "model")
    schedule = DDPMScheduler(**noise_schedule(ldm))
    out: dict = {}
    for label, folder in (
        ("source-val", TILES["kit"] / "source-val"),
        ("kit-target-test", TILES["kit"] / "target-test"),
        ("minsk-target-test", TILES["minsk"] / "target-test"),
    ):
        split = open_split(folder)
        pick = np.linspace(0, len(split.tiles) - 1, per_split).round().astype(int)
        tiles = [split.tiles[i] for i in pick]
        images = torch.stack(
            [torch.from_numpy(split.image(t.tile_id)).permute(2, 0, 1).float() / 127.5 - 1 for t in tiles]
        )
        with torch.no_grad():
            latents = ldm.codec.encode(images)
        ids = ldm.token_ids([ldm.prompt(split.info.domain, t.has_vehicle, False) for t in tiles])
        out[label] = denoising_error(ldm, latents, ids, schedule, seed=0, tiles=per_split)
        print(name, label, out[label], flush=True)
    path = RESULTS / f"box_ldm_{name}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"model": str((WORK / name / "model").relative_to(REPO))}
    doc["denoising_error_held_out"] = out
    atomic_write_json(path, doc)
    return out


def table() -> str:
    """A markdown table of every ``box_ldm_<name>.json``: per model and noise level, the readout chosen on
    source-val, its two-fold check, the same readout on both target-test splits, and the flag check."""
    lines = [
        "| model | noise | source-val, default rule | source-val, chosen readout | two-fold | KIT test | "
        "Minsk test | flag AUC KIT / Minsk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("box_ldm_*.json")):
        doc = json.loads(path.read_text())
        if "readout" not in doc:
            continue
        name = path.stem[len("box_ldm_") :]
        flags_doc = doc.get("flag_auc_target_train") or {}
        auc = " / ".join(
            f"{flags_doc[k]['auc']:.2f}" if flags_doc.get(k, {}).get("auc") is not None else "-"
            for k in ("kit@0.1", "minsk@0.1")
        )
        for noise, entry in doc["readout"].items():
            q = doc["map_quality"]
            c = entry["chosen"]
            how = f"{c['normalise']}, x{c['config']['upsample']}, {c['config']['threshold']:g}"
            folds = ", ".join(f"{v:.3f}" for v in entry["source_val_two_fold_ap50"])
            kit, minsk = q[f"target-test-kit@{noise}"], q[f"target-test-minsk@{noise}"]
            lines.append(
                f"| {name} | {noise} | {q[f'source-val@{noise}']['ap50']:.3f} | {entry['source_val_ap50']:.3f} ({how}) "
                f"| {folds} | {kit['chosen_readout']['ap50']:.3f} (default {kit['ap50']:.3f}) "
                f"| {minsk['chosen_readout']['ap50']:.3f} (default {minsk['ap50']:.3f}) "
                f"| {auc if noise == '0.1' else ''} |"
            )
    return "\n".join(lines)


def samples(name: str, count: int, steps: int) -> dict:
    """Text-to-image ``target_cars`` per target at guidance 1, 4, and 4 with guidance rescale 0.7: grids and
    the two-sample test (finished sets are reused).

    The two-sample accuracy is a small CNN's held-out accuracy telling real target-train tiles flagged
    with vehicles from the generated images (0.5 = indistinguishable).
    """
    from aerosynth.data.atomic import atomic_write_json
    from aerosynth.data.tileset import open_split
    from aerosynth.detection.two_sample import two_sample_accuracy
    from aerosynth.flows.adapt import write_synthetic_samples
    from aerosynth.generation.models import load_ldm
    from aerosynth.generation.sampling import SamplingConfig, generate_set

    ldm = load_ldm(WORK / name / "model")
    doc: dict = {"model": str((WORK / name / "model").relative_to(REPO)), "count": count, "steps": steps, "sets": {}}
    for target, domain in (("minsk", "minsk_drone"), ("kit", "kit_munich_aerial")):
        split = open_split(TILES[target] / "target-train")
        real = [split.image_path(t.tile_id) for t in split.tiles if t.has_vehicle]
        for guidance, rescale in ((1.0, 0.0), (4.0, 0.0), (4.0, 0.7)):
            started = time.perf_counter()
            label = f"g{guidance:g}" + (f"r{rescale:g}" if rescale else "")
            folder = WORK / name / "samples" / f"{target}-{label}"
            cfg = SamplingConfig(
                steps=steps,
                guidance_scale=guidance,
                guidance_rescale=rescale,
                batch_size=8,
                shard_size=64,
                progress=False,
            )
            set_dir = generate_set(ldm, folder / "target_cars", "target_cars", domain, count, config=cfg)
            prefix = "box_ldm_samples" if name == "stageA" else f"box_ldm_{name}_samples"
            grid = write_synthetic_samples(folder, RESULTS / f"{prefix}_{target}_{label}.png")
            synthetic = sorted((set_dir / "images").glob("*.png"))
            test = two_sample_accuracy(real, synthetic, seed=0)
            doc["sets"][f"{target}@{label}"] = {
                "two_sample_accuracy": test["accuracy"],
                "two_sample": test,
                "grid": str(grid.relative_to(REPO)) if grid else None,
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(target, label, test["accuracy"], flush=True)
    atomic_write_json(RESULTS / f"box_ldm_{name}_samples.json", doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--name", default="stageA")
    t.add_argument("--steps", type=int, default=1800)
    t.add_argument("--box-loss", default="l1", choices=["l1", "bce"])
    t.add_argument("--box-max-timestep", type=float, default=1.0)
    t.add_argument("--lambda-empty", type=float, default=0.0, help="empty-tile attention loss (flags only)")
    t.add_argument("--lambda-present", type=float, default=0.0, help="flagged-tile attention loss (flags only)")
    t.add_argument("--timestep-sampling", default="uniform", choices=["uniform", "high"])
    t.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    t.add_argument("--zero-terminal-snr", action="store_true")
    t.add_argument("--stage", default="A", choices=["A", "B", "C"])
    t.add_argument("--init", help="stage B / C: the name of the model to start from")
    t.add_argument("--ema", type=float, help="export the exponential moving average of the weights (decay)")
    t.add_argument(
        "--train-unet", action="store_true", default=None, help="stage B: train the UNet too (default: tokens only)"
    )
    t.add_argument("--max-tiles", type=int, default=1500)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--threads", type=int, default=1, help="torch threads (1 when detectors share the cores)")
    q = sub.add_parser("quality")
    q.add_argument("--name", default="stageA")
    q.add_argument("--limit", type=int, default=None)
    q.add_argument("--threads", type=int, default=1)
    sub.add_parser("table")
    d = sub.add_parser("denoise")
    d.add_argument("--name", default="stageA")
    d.add_argument("--threads", type=int, default=1)
    f = sub.add_parser("flags")
    f.add_argument("--name", default="stageA")
    f.add_argument("--limit", type=int, default=300)
    f.add_argument("--noise", type=float, default=0.1)
    f.add_argument("--threads", type=int, default=1)
    er = sub.add_parser("errors", help="where the chosen readout's boxes go wrong (diagnostic)")
    er.add_argument("--name", default="stageA")
    er.add_argument("--noise", type=float, default=0.3)
    er.add_argument("--threads", type=int, default=1)
    sa = sub.add_parser("samples")
    sa.add_argument("--name", default="stageA")
    sa.add_argument("--count", type=int, default=64)
    sa.add_argument("--steps", type=int, default=25)
    sa.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from aerosynth.data.offline import apply_offline_settings

    apply_offline_settings()
    torch.set_num_threads(getattr(args, "threads", 1))
    if args.cmd == "train":
        train(
            args.name,
            args.steps,
            args.box_loss,
            args.max_tiles,
            args.lr,
            args.box_max_timestep,
            args.lambda_empty,
            args.lambda_present,
            args.timestep_sampling,
            args.prediction_type,
            args.zero_terminal_snr,
            args.stage,
            args.init,
            args.ema,
            args.train_unet,
        )
    elif args.cmd == "denoise":
        denoise(args.name)
    elif args.cmd == "table":
        print(table())
    elif args.cmd == "errors":
        errors(args.name, args.noise)
    elif args.cmd == "flags":
        flags(args.name, args.limit, args.noise)
    elif args.cmd == "quality":
        quality(args.name, args.limit)
    else:
        samples(args.name, args.count, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
