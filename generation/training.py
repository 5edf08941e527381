"""Training stages of the latent diffusion model.

* stage ``0``: train the ``AutoencoderKL`` from config on tiles; report PSNR on held-out tiles.
* stage ``A``: fine-tune the UNet (autoencoder and text encoder frozen) on a balanced mix of
  domains and of tiles with/without vehicles; prompts ``an aerial view image with cars in D``
  or, for tiles flagged empty, ``an aerial view image in D``.
* stage ``B``: learned tokens ([V1] before "cars", one background token per domain) and the
  UNet, on tiles with vehicles, with ``L = L_LDM + l_obj L_obj + l_bg L_bg`` over every
  cross-attention layer (see :mod:`aerosynth.generation.attention`).
* stage ``C``: tokens frozen, the UNet fine-tuned further with the same losses.

Two additions a model trained from scratch needs (Stable Diffusion brings both from pretraining):

* **Box-supervised attention** (``lambda_box``, stages A-C): on labelled (source) tiles with vehicles,
  the "cars" map of every cross-attention layer (from stage B also [V1]) is pulled toward the tile's box
  mask at the layer's resolution, the background token toward its complement
  (:func:`aerosynth.generation.attention.box_attention_loss`; ``box_loss`` ``l1`` or ``bce``,
  ``box_max_timestep`` restricts it to the lower noise levels). Target tiles keep their weak flag only:
  a weak split has no boxes to read.
* **Empty-tile attention** (``lambda_empty``, stage A, off by default): a tile flagged "no vehicle"
  (source or target: the flag is the only label read) is passed a second time with its domain's
  vehicle prompt, and the "cars" token's attention probability is pushed to zero everywhere
  (:func:`aerosynth.generation.attention.empty_attention_loss`): what a domain's empty ground looks
  like is what "cars" must not attend to. One extra UNet pass for those rows; single-process only.
  Alone it lets a target domain's "cars" attention collapse to nothing (no target tile has a box to
  pull it up); ``lambda_present`` adds the other half of the weak label: on a tile flagged "vehicle"
  without boxes (target), the strongest "cars" attention is pulled up
  (:func:`aerosynth.generation.attention.present_attention_loss`, multiple-instance style).
* **Conditioning dropout** (``cond_dropout``): that share of the tiles is trained with the empty prompt,
  the unconditional branch classifier-free guidance extrapolates from; ``train_text`` also trains the
  text encoder's token embeddings (or the whole encoder) in stage A, so that prompts differ for the UNet.

Each stage writes ``OUT/`` with ``model/`` (or ``autoencoder/`` for stage 0), ``losses.csv``,
``stage.json`` and ``checkpoints/last.pt`` (written atomically every ``checkpoint_every`` steps
and on SIGINT/SIGTERM). ``resume=True`` continues from the checkpoint; on CPU the result is
bit-identical to an uninterrupted run with the same seed (RNG states, data order position,
optimizer and EMA are in the checkpoint).

Device (see :mod:`aerosynth.generation.device`): ``StageConfig.device`` is ``"cpu"`` (default), ``"cuda"``,
``"cuda:N"`` or ``"N"``; models and batches move there, while data order and noise still come from
CPU generators seeded by ``seed`` (so the CPU path is exactly what it was). ``mixed_precision``
(``"no"``/``"fp16"``/``"bf16"``, CUDA only, refused on CPU) autocasts the UNet and text encoder of
stages A/B/C; stage 0 trains the autoencoder in fp32 whatever it says. Neither field is part of
the resume fingerprint: a checkpoint (always loaded with ``map_location="cpu"``) may be resumed on
another device or precision; only the same device and precision give bit-identical results.

Multi-GPU fine-tuning (DDP through ``accelerate``)::

    accelerate launch --multi_gpu --num_processes 4 -m aerosynth.generation.train_cli --stage A \
        --config stage.yaml --split tiles/source-train --split tiles/target-train --out runs/ldm/stageA

``stage.yaml`` holds StageConfig fields, e.g. ``{steps: 2000, batch_size: 8, device: cuda,
mixed_precision: fp16}``. ``torchrun --standalone --nproc_per_node 4 -m aerosynth.generation.train_cli ...``
works the same way; with ``device: cpu`` it runs DDP over gloo on CPU processes (``accelerate
launch --cpu`` starts one process only, without ``mpirun``).
When ``WORLD_SIZE > 1`` the stage builds an ``accelerate.Accelerator`` (its ``mixed_precision`` is
forced to ``"no"``: precision comes from the config, not from ``accelerate launch`` flags), each
process uses its own GPU (``cuda:LOCAL_RANK``; the index in ``device`` is ignored), and the UNet
(the autoencoder in stage 0) and its optimizer go through ``accelerator.prepare`` (DDP).
``batch_size`` is per process: every process draws the same global batch of
``batch_size * world_size`` tiles and noise from the shared seeded generators and keeps its own
slice, gradients are averaged by ``accelerator.backward`` (the stage-B token embedding, outside
DDP, is all-reduced explicitly), logged losses are the mean over processes, a SIGINT/SIGTERM on any
process stops all of them after the same step, and only rank 0 writes checkpoints, ``losses.csv``,
the model and ``stage.json``. Single-process runs (the default, and every CPU test) never create
an Accelerator.

Not guaranteed: bit-identical results between world sizes (a W-process run is the single-process
run with ``batch_size * W`` up to floating-point reduction order), bit-identical resume of a
checkpoint under a different world size or device (it resumes, with the same data order and
noise, but not the same bytes), and identical bytes between CPU and CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from aerosynth.data.atomic import atomic_output_path, atomic_write_json, atomic_write_text, link_or_copy
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.manifest import file_sha256
from aerosynth.data.tileset import LabelledTileSplit, open_split
from aerosynth.generation.attention import (
    BOX_LOSS_FORMS,
    AttentionStore,
    attention_losses,
    box_attention_loss,
    capturing,
    empty_attention_loss,
    present_attention_loss,
)
from aerosynth.generation.device import Runtime, make_runtime
from aerosynth.generation.latent_pack import LatentPack, read_latent_pack
from aerosynth.generation.models import (
    LDM,
    KLCodec,
    build_ldm,
    check_prediction,
    load_codec,
    load_ldm,
    load_pretrained_sd,
    noise_schedule,
    resolve_spec,
    save_kl_autoencoder,
    save_ldm,
    token_positions,
)
from aerosynth.generation.vocab import DEFAULT_DOMAINS, VEHICLE_TOKEN, background_token

STAGES = ("0", "A", "B", "C")
CHECKPOINT = "checkpoints/last.pt"
LOSSES_CSV = "losses.csv"
STAGE_FILE = "stage.json"
LOSS_COLUMNS = ("step", "loss", "loss_ldm", "loss_obj", "loss_bg", "loss_box", "loss_empty", "loss_present", "lr")
#: Side of the box masks kept per tile (fraction of each cell covered; pooled to each layer's side).
MASK_SIDE = 32
TEXT_TRAINING = ("none", "embeddings", "encoder")
TIMESTEP_SAMPLING = ("uniform", "high")


@dataclass
class StageConfig:
    """Settings shared by every stage.

    Attributes:
        preset: model preset (``tiny``, ``cpu``) when no ``init_model`` is given.
        steps: optimizer steps.
        batch_size: tiles per micro-batch.
        grad_accum: micro-batches per optimizer step.
        learning_rate: UNet (or autoencoder) learning rate.
        train_unet: whether the stage trains the UNet (or its LoRA adapters). ``None``: stages A and C
            do, stage B does not (it learns the tokens only): on the ``cpu`` model, 600 stage-B steps that
            also trained the UNet at 1e-4 took source-val heat-map AP50 from 0.811 to 0.658 and KIT
            target-test from 0.724 to 0.369; tokens only gave 0.817 and 0.751.
        token_learning_rate: learned-token learning rate (stage B).
        weight_decay: AdamW weight decay of the UNet.
        min_snr_gamma: min-SNR loss weighting ``min(snr, gamma) / snr``; ``None`` switches it off.
        lora_rank: 0 trains the full UNet, otherwise LoRA adapters of that rank (peft).
        ema_decay: keep an exponential moving average of the trained weights and export it.
        checkpoint_every: steps between checkpoints.
        seed: seed of data order and noise.
        lambda_obj: weight of L_obj (stages B, C).
        lambda_bg: weight of L_bg (stages B, C).
        lambda_box: weight of the box-supervised attention loss on labelled tiles with vehicles (0: off).
        box_loss: its form, ``l1`` (maps as distributions) or ``bce`` (per-pixel attention probability).
        box_max_timestep: apply it only below this fraction of the noise schedule (1: every timestep).
        lambda_empty: weight of the empty-tile attention loss (stage A, tiles flagged empty; 0: off).
        timestep_sampling: how training timesteps are drawn: ``uniform``, or ``high`` (density rising
            linearly with the timestep: twice the uniform share at pure noise, none at t = 0), to spend more
            of the budget where a model trained from scratch is weakest (the layout-setting high-noise steps).
        lambda_present: weight of the flagged-tile attention loss (stages A-C, flagged tiles without
            boxes: the strongest "cars" attention pulled up; 0: off).
        prediction_type: what a new model's UNet predicts, ``epsilon`` or ``v_prediction``; with
            ``v_prediction``, ``min_snr_gamma`` weights the clean-latent error by ``min(snr + 1, gamma)``
            (1 at pure noise, where noise prediction gives it weight ``snr``, nearly 0). A loaded model
            keeps its own.
        zero_terminal_snr: a new model's schedule ends in pure noise (needs ``v_prediction``). With
            ``high`` timestep sampling, these are the defaults: on the ``cpu`` model they took the one-step
            denoising error at t = 0.9 from 7.8 to 0.90 and source-val heat-map AP50 from 0.765 to 0.811.
        cond_dropout: share of tiles trained with the empty prompt (classifier-free guidance's branch).
        train_text: stage A also trains the text encoder's ``embeddings`` or the whole ``encoder``
            (``none``: frozen, as before); its learning rate is ``token_learning_rate``.
        init_model: the previous stage's ``model/`` folder (required for B and C).
        pretrained_dir: a local Stable Diffusion v1.x folder to start stage A from (instead of a preset).
        image_size: training image side for ``pretrained_dir`` (default 512; tiles are resized).
        autoencoder_dir: TAEF2 weights folder or stage-0 output (new models only).
        domains: domains of the model (default: the splits' plus aerial-v1's).
        max_tiles_per_split: use at most this many tiles of each split (evenly spaced).
        holdout_every: stage 0 holds out every n-th tile for the PSNR report.
        progress: show a progress bar.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a GPU index ``"N"`` (not part of the fingerprint).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` autocast on CUDA (refused on CPU; not part of
            the fingerprint).
    """

    preset: str = "tiny"
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-4
    train_unet: bool | None = None
    token_learning_rate: float = 5e-3
    weight_decay: float = 1e-2
    min_snr_gamma: float | None = 5.0
    lora_rank: int = 0
    ema_decay: float | None = None
    checkpoint_every: int = 100
    seed: int = 0
    lambda_obj: float = 1.0
    lambda_bg: float = 1.0
    lambda_box: float = 1.0
    box_loss: str = "l1"
    box_max_timestep: float = 1.0
    lambda_empty: float = 0.0
    lambda_present: float = 0.0
    timestep_sampling: str = "high"
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    cond_dropout: float = 0.1
    train_text: str = "embeddings"
    init_model: Path | None = None
    pretrained_dir: Path | None = None
    image_size: int | None = None
    autoencoder_dir: Path | None = None
    domains: list[str] | None = None
    max_tiles_per_split: int | None = None
    holdout_every: int = 10
    progress: bool = True
    device: str = "cpu"
    mixed_precision: str = "no"

    def fingerprint(self) -> dict:
        """The fields that must not change between a checkpoint and its resumption.

        ``device`` and ``mixed_precision`` say where and how to compute, not what: a run may resume
        on another device, so they are left out (as are ``steps``, ``checkpoint_every``, ``progress``).
        """
        skip = {"steps", "checkpoint_every", "progress", "device", "mixed_precision"}
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in skip}


@dataclass
class Stage0Config(StageConfig):
    """Stage 0: the autoencoder."""

    learning_rate: float = 1e-3
    kl_weight: float = 1e-6


@dataclass
class StageAConfig(StageConfig):
    """Stage A: UNet fine-tuning with plain prompts."""


@dataclass
class StageBConfig(StageConfig):
    """Stage B: learned tokens + UNet with the attention losses."""


@dataclass
class StageCConfig(StageConfig):
    """Stage C: UNet with the attention losses, tokens frozen.

    Its default learning rate is a tenth of stage A's: on the ``cpu`` model, 400 stage-C steps at 1e-4
    took KIT target-test heat-map AP50 from 0.751 (after stage B) to 0.159; at 1e-5 to 0.782.
    """

    learning_rate: float = 1e-5


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- data
@dataclass
class TileSet:
    """Tiles of the training splits in memory.

    Attributes:
        images: ``(N, 3, S, S)`` float in ``[-1, 1]``.
        domains: domain of each tile.
        has_vehicle: weak flag of each tile.
        names: ``split/tile_id`` of each tile.
        box_masks: ``(N, MASK_SIDE, MASK_SIDE)`` uint8, 255 x the fraction of each cell covered by a box
            (zeros for weak tiles, which have no boxes).
        has_boxes: the tile comes from a labelled split and has at least one box.
    """

    images: torch.Tensor
    domains: list[str]
    has_vehicle: list[bool]
    names: list[str] = field(default_factory=list)
    box_masks: torch.Tensor | None = None
    has_boxes: list[bool] = field(default_factory=list)

    def digest(self) -> str:
        h = hashlib.sha256("\n".join(self.names).encode())
        h.update(str(tuple(self.images.shape)).encode())
        return h.hexdigest()[:16]


def box_mask(boxes: np.ndarray, width: int, height: int, side: int = MASK_SIDE) -> np.ndarray:
    """``(side, side)`` uint8: 255 x the fraction of each cell covered by the union of ``xyxy`` boxes."""
    full = Detections(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)).pixel_mask(width, height)
    return cv2.resize(full.astype(np.uint8) * 255, (side, side), interpolation=cv2.INTER_AREA)


def load_tiles(splits: Sequence[Path], image_size: int, max_per_split: int | None = None) -> TileSet:
    """Read the tiles of splits (resized to ``image_size``), with their domain, weak flag and box mask.

    Box masks come from labelled (source) splits only; a weak (target) split has no boxes to read.

    Raises:
        InputError: a split is not a tile split, or no tile is found.
    """
    images: list[np.ndarray] = []
    domains: list[str] = []
    flags: list[bool] = []
    names: list[str] = []
    masks: list[np.ndarray] = []
    boxed: list[bool] = []
    for split_dir in splits:
        split = open_split(Path(split_dir))
        labelled = isinstance(split, LabelledTileSplit)
        records = sorted(split.tiles, key=lambda r: r.tile_id)
        if max_per_split is not None and len(records) > max_per_split:
            picks = np.linspace(0, len(records) - 1, max_per_split).round().astype(int)
            records = [records[i] for i in picks]
        for rec in records:
            rgb = split.image(rec.tile_id)
            boxes = split.labels(rec.tile_id).xyxy if labelled else np.zeros((0, 4))
            masks.append(box_mask(boxes, rgb.shape[1], rgb.shape[0]))
            boxed.append(bool(len(boxes)))
            if rgb.shape[0] != image_size or rgb.shape[1] != image_size:
                rgb = cv2.resize(rgb, (image_size, image_size), interpolation=cv2.INTER_AREA)
            images.append(rgb)
            domains.append(split.info.domain)
            flags.append(bool(rec.has_vehicle))
            names.append(f"{split.name}/{rec.tile_id}")
    if not images:
        raise InputError(",".join(str(s) for s in splits), "no tiles in the training splits")
    arr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return TileSet(arr, domains, flags, names, torch.from_numpy(np.stack(masks)), boxed)


class BalancedSampler:
    """Draws tile indices: a group (domain x vehicle flag) uniformly, then a tile of it uniformly.

    Its whole state is one numpy generator state, saved in checkpoints.
    """

    def __init__(self, groups: dict[tuple[str, bool], list[int]], seed: int) -> None:
        self.keys = sorted(k for k, v in groups.items() if v)
        if not self.keys:
            raise InputError("train_splits", "no tile fits this stage (stages B and C need tiles with vehicles)")
        self.groups = {k: groups[k] for k in self.keys}
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> list[int]:
        out = []
        for _ in range(size):
            key = self.keys[int(self.rng.integers(len(self.keys)))]
            members = self.groups[key]
            out.append(members[int(self.rng.integers(len(members)))])
        return out

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


# ----------------------------------------------------------------------------- helpers
class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def raise_if_set(self) -> None:
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt("training interrupted (checkpoint written)")
        if self.signum is not None:
            raise SystemExit(128 + self.signum)


class EMA:
    """Exponential moving average of named parameters."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        for n, p in params.items():
            self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(LOSS_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in LOSS_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_output_path(path, ".pt") as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, stage: str, fingerprint: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step")
    except Exception as exc:  # torch raises many types for a damaged file
        raise InputError(
            path, f"corrupt or unreadable checkpoint ({type(exc).__name__}); delete it to start over"
        ) from None
    if state.get("stage") != stage:
        raise InputError(path, f"checkpoint of stage {state.get('stage')!r}, not {stage!r}")
    old = state.get("fingerprint", {})
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        raise InputError(path, f"checkpoint was written with a different config ({', '.join(diff)}); use resume=False")
    return state


def _rng_state(sampler: BalancedSampler, noise: torch.Generator) -> dict:
    return {"sampler": sampler.state(), "noise": noise.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict, sampler: BalancedSampler, noise: torch.Generator) -> None:
    sampler.set_state(state["sampler"])
    noise.set_state(state["noise"])
    torch.set_rng_state(state["torch"])


@dataclass
class _Job:
    """One stage's moving parts, handed to the common optimisation loop."""

    stage: str
    config: StageConfig
    out_dir: Path
    modules: dict[str, torch.nn.Module]
    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    sampler: BalancedSampler
    noise: torch.Generator
    micro_step: Callable[[list[int]], dict[str, torch.Tensor]]
    after_step: Callable[[], None] = lambda: None
    runtime: Runtime = field(default_factory=lambda: Runtime(torch.device("cpu")))
    ddp_model: torch.nn.Module | None = None
    sync_params: list[torch.nn.Parameter] = field(default_factory=list)


def _optimise(job: _Job, resume: bool, on_step: Callable[[int, dict], None] | None) -> EMA | None:
    """The shared loop: micro-batches, accumulation, clipping, EMA, checkpoints, CSV, progress, signals."""
    cfg, rt = job.config, job.runtime
    ckpt_path = job.out_dir / CHECKPOINT
    ema = EMA(job.trainable, cfg.ema_decay) if cfg.ema_decay else None
    scaler = rt.grad_scaler()
    rows: list[dict] = []
    step = 0
    if resume and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path, job.stage, cfg.fingerprint())
        for name, module in job.modules.items():
            module.load_state_dict(state["modules"][name])
        job.optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.shadow = {n: v.to(job.trainable[n].device) for n, v in state["ema"].items()}
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], job.sampler, job.noise)
        rows = list(state["rows"])
        step = int(state["step"])

    def checkpoint() -> None:
        if not rt.is_main:
            return
        _save_checkpoint(
            ckpt_path,
            {
                "stage": job.stage,
                "fingerprint": cfg.fingerprint(),
                "step": step,
                "modules": {n: m.state_dict() for n, m in job.modules.items()},
                "optimizer": job.optimizer.state_dict(),
                "ema": None if ema is None else ema.shadow,
                "rng": _rng_state(job.sampler, job.noise),
                "rows": rows,
                "scaler": None if scaler is None else scaler.state_dict(),
                "world_size": rt.world,
            },
        )
        _write_csv(job.out_dir / LOSSES_CSV, rows)

    params = list(job.trainable.values())
    bar = _progress(cfg.steps, step, cfg.progress and rt.is_main, f"stage {job.stage}")
    start, start_step = time.perf_counter(), step
    try:
        with _StopFlag() as stop:
            while step < cfg.steps:
                job.optimizer.zero_grad(set_to_none=True)
                totals: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    # every process draws the same global batch and keeps its own slice (micro_step)
                    batch = job.sampler.batch(cfg.batch_size * rt.world)
                    with rt.no_sync(job.ddp_model, micro < cfg.grad_accum - 1):
                        losses = job.micro_step(batch)
                        rt.backward(losses["loss"] / cfg.grad_accum, scaler)
                    for k, v in losses.items():
                        totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                if rt.distributed:
                    for p in job.sync_params:
                        if p.grad is not None:
                            p.grad.copy_(rt.mean_over_processes(p.grad))
                    totals = rt.mean_values(totals)
                if not np.isfinite(totals["loss"]):
                    raise FloatingPointError(f"stage {job.stage}: loss is {totals['loss']} at step {step}")
                if scaler is not None:
                    scaler.unscale_(job.optimizer)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                if scaler is not None:
                    scaler.step(job.optimizer)
                    scaler.update()
                else:
                    job.optimizer.step()
                job.after_step()
                if ema is not None:
                    ema.update(job.trainable)
                step += 1
                row = {"step": step, **{k: f"{v:.6g}" for k, v in totals.items()}}
                row["lr"] = f"{job.optimizer.param_groups[0]['lr']:.3g}"
                rows.append(row)
                rate = (step - start_step) / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{totals['loss']:.4f}", steps_s=f"{rate:.2f}")
                bar.update(1)
                if on_step is not None:
                    on_step(step, totals)
                stopping = rt.any_process(stop.signum is not None)
                if stopping or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    checkpoint()
                if stopping:
                    stop.raise_if_set()
                    raise KeyboardInterrupt("training stopped: another process was interrupted (checkpoint written)")
    finally:
        bar.close()
    return ema


@contextlib.contextmanager
def _ema_swapped(job: _Job, ema: EMA | None) -> Iterator[None]:
    """Context in which the trainable parameters hold their EMA values."""
    if ema is None:
        yield
        return
    saved = {n: p.detach().clone() for n, p in job.trainable.items()}
    with torch.no_grad():
        for n, p in job.trainable.items():
            p.copy_(ema.shadow[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in job.trainable.items():
                p.copy_(saved[n])


def _adamw(groups: list[dict], device: torch.device | None = None) -> torch.optim.Optimizer:
    foreach = False if device is None or device.type == "cpu" else None  # None: torch's default (foreach on CUDA)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=foreach)


# ----------------------------------------------------------------------------- stage 0
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in ``[-1, 1]`` (as 8-bit range ``[0, 1]``)."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@torch.no_grad()
def reconstruction_psnr(codec, images: torch.Tensor, batch: int = 16) -> float:
    """Mean PSNR of ``decode(encode(x))`` over images in ``[-1, 1]`` (on the codec's device)."""
    device = next(codec.module.parameters()).device
    values = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        values.append(psnr(codec.decode(codec.encode(x)), x))
    return float(np.mean(values))


class _AutoencoderStep(torch.nn.Module):
    """Encode, sample with given noise, decode: one forward for DDP to wrap in stage 0."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * eps
        return self.vae.decode(z).sample, post.kl()


def _stage0(
    config: Stage0Config, splits: Sequence[Path], out_dir: Path, resume: bool, on_step, runtime: Runtime
) -> Path:
    spec = resolve_spec(config.preset, config.domains)
    tiles = load_tiles(splits, spec.image_size, config.max_tiles_per_split)
    n = len(tiles.names)
    held = [i for i in range(n) if config.holdout_every and i % config.holdout_every == config.holdout_every - 1]
    train = [i for i in range(n) if i not in set(held)] or list(range(n))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        codec = load_codec(None, spec.autoencoder_kl)
    assert isinstance(codec, KLCodec)
    device = runtime.device
    vae = codec.module.train().requires_grad_(True).to(device)
    trainable = dict(vae.named_parameters())
    optimizer = _adamw([{"params": list(trainable.values()), "lr": config.learning_rate, "weight_decay": 0.0}], device)
    step_module, optimizer = runtime.prepare(_AutoencoderStep(vae), optimizer)
    sampler = BalancedSampler({("all", True): train}, config.seed)
    noise = torch.Generator().manual_seed(config.seed + 1)
    side = spec.image_size // codec.factor
    latent_shape = (codec.latent_channels, side, side)

    def micro_step(idx: list[int]) -> dict[str, torch.Tensor]:
        eps = torch.randn((len(idx), *latent_shape), generator=noise)  # CPU noise for the global batch
        part = runtime.local_part(len(idx))
        x = tiles.images[idx[part]].to(device)
        rec, kl = step_module(x, eps[part].to(device))
        l_rec = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        l_kl = kl.mean() / x[0].numel()
        return {"loss": l_rec + config.kl_weight * l_kl, "loss_ldm": l_rec}

    job = _Job(
        "0",
        config,
        out_dir,
        {"autoencoder": vae},
        trainable,
        optimizer,
        sampler,
        noise,
        micro_step,
        runtime=runtime,
        ddp_model=step_module if runtime.distributed else None,
    )
    ema = _optimise(job, resume, on_step)
    if not runtime.is_main:
        runtime.wait()
        return out_dir / "autoencoder"
    with _ema_swapped(job, ema):
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            latents = torch.cat(
                [
                    vae.encode(tiles.images[train[i : i + 16]].to(device)).latent_dist.mode()
                    for i in range(0, len(train), 16)
                ]
            )
        codec.scaling = float(1.0 / max(latents.std().item(), 1e-6))
        held_images = tiles.images[held] if held else tiles.images[train]
        metrics = {
            "psnr_heldout_db": reconstruction_psnr(codec, held_images),
            "heldout_tiles": len(held),
            "train_tiles": len(train),
            "latent_scaling": codec.scaling,
        }
        target = out_dir / "autoencoder"
        save_kl_autoencoder(codec, target, metrics)
    atomic_write_json(
        out_dir / STAGE_FILE,
        {"stage": "0", "config": config.fingerprint(), "steps": config.steps, "metrics": metrics}
        | _runtime_record(config, runtime),
    )
    runtime.wait()
    return target


# ----------------------------------------------------------------------------- stages A, B, C
def _lora_targets() -> list[str]:
    return ["to_q", "to_k", "to_v", "to_out.0"]


def _merged_unet_state(unet: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """UNet weights with LoRA adapters merged into plain diffusers names."""
    if not lora:
        return {k: v.detach().clone() for k, v in unet.state_dict().items()}
    from peft.tuners.tuners_utils import BaseTunerLayer

    twin = copy.deepcopy(unet)
    for module in twin.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    out = {}
    for key, value in twin.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().clone()
    return out


def _prepare_model(stage: str, config: StageConfig, split_domains: Sequence[str]) -> LDM:
    if stage in ("B", "C") and config.init_model is None:
        raise InputError("init_model", f"stage {stage} starts from the previous stage's model folder")
    if config.init_model is not None:
        ldm = load_ldm(config.init_model)
    else:
        domains = config.domains or sorted(set(DEFAULT_DOMAINS) | set(split_domains))
        if config.pretrained_dir is not None:
            ldm = load_pretrained_sd(config.pretrained_dir, domains, config.image_size or 512, config.autoencoder_dir)
        else:
            spec = replace(
                resolve_spec(config.preset),
                prediction_type=config.prediction_type,
                zero_terminal_snr=config.zero_terminal_snr,
            )
            ldm = build_ldm(spec, config.autoencoder_dir, domains)
    for domain in split_domains:
        ldm.check_domain(domain)
    return ldm


def _encode_latents(
    ldm: LDM, tiles: TileSet, cache: Path, runtime: Runtime | None = None, earlier: Path | None = None
) -> torch.Tensor:
    """Latents of every tile (kept on the CPU), cached in ``cache`` (written by rank 0 only).

    ``earlier`` is the previous stage's cache: when it holds the same tiles encoded by the same
    autoencoder, it is linked into ``cache`` instead of encoding every tile again (minutes per stage).
    """
    key = f"{tiles.digest()}-{ldm.codec.kind}-{ldm.codec.scaling:.6g}-{ldm.autoencoder_dir}"
    for path in (cache, earlier):
        if path is None or not path.is_file():
            continue
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is rebuilt
            continue
        if doc.get("key") != key:
            continue
        if path != cache and (runtime is None or runtime.is_main):
            link_or_copy(path, cache)
        return doc["latents"]
    device = next(ldm.codec.module.parameters()).device
    with torch.no_grad():
        latents = torch.cat(
            [ldm.codec.encode(tiles.images[i : i + 16].to(device)).cpu() for i in range(0, len(tiles.names), 16)]
        )
    if runtime is None or runtime.is_main:
        with atomic_output_path(cache, ".pt") as tmp:
            torch.save({"key": key, "latents": latents}, tmp)
    return latents


def _pack_tiles(pack: LatentPack, ldm: LDM, where: Path) -> tuple[TileSet, torch.Tensor]:
    """The tile list and latents of a pack, checked against the model's autoencoder and latent shape."""
    side = ldm.spec.image_size // ldm.codec.factor
    expected = (ldm.codec.latent_channels, side, side)
    if pack.codec != ldm.codec.kind or abs(pack.scaling - ldm.codec.scaling) > 1e-6 * max(1.0, abs(pack.scaling)):
        raise InputError(
            where,
            f"latent pack encoded with {pack.codec} (scaling {pack.scaling:.6g}); the model's autoencoder is "
            f"{ldm.codec.kind} (scaling {ldm.codec.scaling:.6g})",
        )
    if tuple(pack.latents.shape[1:]) != expected:
        raise InputError(
            where, f"latent pack holds latents {tuple(pack.latents.shape[1:])}; the model needs {expected}"
        )
    tiles = TileSet(torch.empty(0), pack.domains, pack.has_vehicle, pack.names, pack.box_masks, pack.has_boxes)
    return tiles, pack.latents


def _diffusion_stage(
    stage: str,
    config: StageConfig,
    splits: Sequence[Path],
    out_dir: Path,
    resume: bool,
    on_step,
    runtime: Runtime,
    latent_pack: Path | None = None,
) -> Path:
    _check_box_settings(config)
    train_unet = config.train_unet if config.train_unet is not None else stage != "B"
    if not train_unet and stage != "B":
        raise InputError("train_unet", f"stage {stage} trains the UNet (only stage B can learn its tokens alone)")
    pack = read_latent_pack(latent_pack) if latent_pack is not None else None
    split_domains = sorted(set(pack.domains)) if pack else sorted({open_split(Path(s)).info.domain for s in splits})
    ldm = _prepare_model(stage, config, split_domains)
    device = runtime.device
    ldm.codec.module.to(device)
    if pack is not None:
        tiles, latents = _pack_tiles(pack, ldm, Path(latent_pack))
        del pack
    else:
        tiles = load_tiles(splits, ldm.spec.image_size, config.max_tiles_per_split)
        earlier = Path(config.init_model).parent / "cache" / "latents.pt" if config.init_model else None
        latents = _encode_latents(ldm, tiles, out_dir / "cache" / "latents.pt", runtime, earlier)
    del tiles.images
    learned = stage in ("B", "C")
    n_tiles = len(tiles.names)
    masks = tiles.box_masks
    if masks is None:
        masks = torch.zeros((n_tiles, MASK_SIDE, MASK_SIDE), dtype=torch.uint8)
    has_boxes = torch.tensor(tiles.has_boxes or [False] * n_tiles, dtype=torch.bool)
    use_box = config.lambda_box > 0 and bool(has_boxes.any())
    flagged_unboxed = torch.tensor(
        [bool(v) and not b for v, b in zip(tiles.has_vehicle, tiles.has_boxes or [False] * n_tiles, strict=True)]
    )
    use_present = config.lambda_present > 0 and bool(flagged_unboxed.any())
    n = len(tiles.names)
    if learned:
        groups = {
            (d, True): [i for i in range(n) if tiles.domains[i] == d and tiles.has_vehicle[i]] for d in split_domains
        }
    else:
        groups = {
            (d, f): [i for i in range(n) if tiles.domains[i] == d and tiles.has_vehicle[i] == f]
            for d in split_domains
            for f in (False, True)
        }
    sampler = BalancedSampler(groups, config.seed)
    noise = torch.Generator().manual_seed(config.seed + 1)

    prompts = [ldm.prompt(tiles.domains[i], tiles.has_vehicle[i] or learned, learned) for i in range(n)]
    ids = ldm.token_ids(prompts)
    cars_id, v1_id = ldm.token_id("cars"), ldm.token_id(VEHICLE_TOKEN)
    bg_ids = {d: ldm.token_id(background_token(d)) for d in split_domains}
    positions = torch.cat(
        [token_positions(ids[i : i + 1], [cars_id, v1_id, bg_ids[tiles.domains[i]]]) for i in range(n)]
    )
    flagged = torch.tensor(list(tiles.has_vehicle), dtype=torch.bool)
    use_empty = stage == "A" and config.lambda_empty > 0 and bool((~flagged).any())
    if use_empty and runtime.distributed:
        raise InputError("lambda_empty", "the empty-tile attention loss runs in a single process only")
    if use_empty:
        # the vehicle prompt of each domain, for the second pass of tiles flagged empty
        vehicle_ids = {d: ldm.token_ids([ldm.prompt(d, True, False)]) for d in split_domains}
        vehicle_pos = {d: token_positions(vehicle_ids[d], [cars_id, v1_id, bg_ids[d]]) for d in split_domains}

    unet, text_encoder = ldm.unet, ldm.text_encoder
    lora = config.lora_rank > 0 and train_unet
    if not train_unet:
        unet.requires_grad_(False)
    elif lora:
        from peft import LoraConfig

        # the adapters' random init comes from the config's seed, not from whatever the process drew before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=_lora_targets(),
                )
            )
        unet.requires_grad_(False)
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        unet.requires_grad_(True)
    unet.train()
    # LoRA adapters are created (from the CPU generator) before the move, so CPU and CUDA start alike
    unet.to(device)
    text_encoder.to(device)
    positions = positions.to(device)
    trainable = {f"unet.{n_}": p for n_, p in unet.named_parameters() if p.requires_grad}
    groups_opt = (
        [{"params": list(trainable.values()), "lr": config.learning_rate, "weight_decay": config.weight_decay}]
        if trainable
        else []
    )
    embedding = text_encoder.get_input_embeddings().weight
    train_tokens = stage == "B"
    text_params: dict[str, torch.nn.Parameter] = {}
    if stage == "A" and config.train_text != "none":
        text_params = (
            {"text_encoder.token_embedding": embedding}
            if config.train_text == "embeddings"
            else {f"text_encoder.{n_}": p for n_, p in text_encoder.named_parameters()}
        )
        for p in text_params.values():
            p.requires_grad_(True)
        text_encoder.train()
        trainable.update(text_params)
        groups_opt.append({"params": list(text_params.values()), "lr": config.token_learning_rate, "weight_decay": 0.0})
    empty_ids = ldm.token_ids([""])
    token_rows = [v1_id] + [bg_ids[d] for d in split_domains]
    frozen_rows = torch.ones(embedding.shape[0], dtype=torch.bool, device=device)
    frozen_rows[token_rows] = False
    embedding_init = embedding.detach().clone()
    if train_tokens:
        embedding.requires_grad_(True)
        trainable["text_encoder.token_embedding"] = embedding
        groups_opt.append({"params": [embedding], "lr": config.token_learning_rate, "weight_decay": 0.0})
    optimizer = _adamw(groups_opt, device)
    if train_unet:
        unet_forward, optimizer = runtime.prepare(unet, optimizer)
    else:  # nothing of the UNet to synchronise: the token rows are averaged over processes (sync_params)
        unet_forward = unet

    schedule = DDPMScheduler(**noise_schedule(ldm))
    alphas = schedule.alphas_cumprod.to(device)
    cached_text: dict[int, torch.Tensor] = {}
    latent_hw = tuple(latents.shape[-2:])

    def text_embeddings(batch_ids: torch.Tensor, idx: list[int], dropped: torch.Tensor) -> torch.Tensor:
        if train_tokens or text_params:
            return text_encoder(batch_ids.to(device))[0]
        with torch.no_grad():
            for i in idx:
                if i not in cached_text:
                    cached_text[i] = text_encoder(ids[i : i + 1].to(device))[0][0]
            if bool(dropped.any()) and -1 not in cached_text:
                cached_text[-1] = text_encoder(empty_ids.to(device))[0][0]
        return torch.stack([cached_text[-1 if bool(d) else i] for i, d in zip(idx, dropped, strict=True)])

    num_t = schedule.config.num_train_timesteps
    capture = learned or use_box or use_present
    velocity = schedule.config.prediction_type == "v_prediction"

    def micro_step(idx: list[int]) -> dict[str, torch.Tensor]:
        # noise, timesteps and dropout come from the CPU generator for the whole (global) batch, then move
        eps = torch.randn((len(idx), *latents.shape[1:]), generator=noise)
        t = sample_timesteps(len(idx), num_t, config.timestep_sampling, noise)
        dropped = (
            torch.rand(len(idx), generator=noise) < config.cond_dropout
            if config.cond_dropout > 0
            else torch.zeros(len(idx), dtype=torch.bool)
        )
        part = runtime.local_part(len(idx))
        idx, eps, t, dropped = idx[part], eps[part].to(device), t[part].to(device), dropped[part]
        x0 = latents[idx].to(device)
        noisy = schedule.add_noise(x0, eps, t)
        batch_ids = torch.where(dropped[:, None], empty_ids, ids[idx])
        with runtime.autocast():
            cond = text_embeddings(batch_ids, idx, dropped)
            if capture:
                # a dropped (empty) prompt has none of the captured tokens
                pos = torch.where(dropped.to(device)[:, None], torch.full_like(positions[idx], -1), positions[idx])
                store = AttentionStore(pos, latent_hw, keep_layer_maps=True)
                with capturing(unet, store):
                    pred = unet_forward(noisy, t, cond, return_dict=False)[0]
            else:
                pred = unet_forward(noisy, t, cond, return_dict=False)[0]
        zero = torch.zeros((), device=device)
        l_obj, l_bg = attention_losses(store) if learned else (zero, zero)
        l_box = zero
        if use_box:
            valid = has_boxes[idx] & ~dropped & (t.cpu() < config.box_max_timestep * num_t)
            l_box = box_attention_loss(
                store, masks[idx].float() / 255, valid.to(device), config.box_loss, learned_tokens=learned
            )
        l_present = zero
        if use_present:
            rows_ok = flagged_unboxed[idx] & ~dropped & (t.cpu() < config.box_max_timestep * num_t)
            l_present = present_attention_loss(store, rows_ok.to(device))
        l_empty = zero
        if use_empty:
            limit = config.box_max_timestep * num_t
            rows = [j for j in range(len(idx)) if not (flagged[idx[j]] or dropped[j]) and int(t[j]) < limit]
            if rows:
                doms = [tiles.domains[idx[j]] for j in rows]
                v_ids = torch.cat([vehicle_ids[d] for d in doms])
                v_pos = torch.cat([vehicle_pos[d] for d in doms]).to(device)
                sel = torch.tensor(rows, device=device)
                with runtime.autocast():
                    with torch.set_grad_enabled(bool(train_tokens or text_params)):
                        v_cond = text_encoder(v_ids.to(device))[0]
                    v_store = AttentionStore(v_pos, latent_hw, keep_layer_maps=True)
                    with capturing(unet, v_store):
                        unet_forward(noisy[sel], t[sel], v_cond, return_dict=False)
                l_empty = empty_attention_loss(v_store)
        target = schedule.get_velocity(x0, eps, t) if velocity else eps
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            snr = alphas[t] / (1 - alphas[t])
            per_sample = per_sample * snr_weight(snr, config.min_snr_gamma, velocity)
        l_ldm = per_sample.mean()
        loss = l_ldm + config.lambda_box * l_box + config.lambda_empty * l_empty + config.lambda_present * l_present
        if learned:
            loss = loss + config.lambda_obj * l_obj + config.lambda_bg * l_bg
        out = {"loss": loss, "loss_ldm": l_ldm, "loss_obj": l_obj, "loss_bg": l_bg, "loss_box": l_box}
        if use_empty:
            out["loss_empty"] = l_empty
        if use_present:
            out["loss_present"] = l_present
        return out

    def after_step() -> None:
        if train_tokens:
            with torch.no_grad():
                embedding[frozen_rows] = embedding_init[frozen_rows]

    modules: dict[str, torch.nn.Module] = {"unet": unet}
    if train_tokens or text_params:
        modules["text_encoder"] = text_encoder
    job = _Job(
        stage,
        config,
        out_dir,
        modules,
        trainable,
        optimizer,
        sampler,
        noise,
        micro_step,
        after_step,
        runtime=runtime,
        ddp_model=unet_forward if runtime.distributed and train_unet else None,
        sync_params=[embedding] if train_tokens else [],
    )
    ema = _optimise(job, resume, on_step)
    if not runtime.is_main:
        runtime.wait()
        return out_dir / "model"
    with _ema_swapped(job, ema):
        unet_state = _merged_unet_state(unet, lora)
        embedding.requires_grad_(False)
        text_encoder.requires_grad_(False).eval()
        unet.eval()
        gap = conditioning_gap(ldm, latents, ids, empty_ids, schedule, config.seed)
        error = denoising_error(ldm, latents, ids, schedule, config.seed)
        if lora:
            ldm.unet = build_ldm(ldm.spec, ldm.autoencoder_dir).unet
        target = out_dir / "model"
        if train_tokens:
            ldm.spec.tokens_trained = True
        save_ldm(ldm, target, unet_state=unet_state)
    moved = float((embedding.detach()[token_rows] - embedding_init[token_rows]).norm())
    metrics = {
        "tiles": n,
        "tiles_with_boxes": int(has_boxes.sum()),
        "token_embedding_change": moved,
        "final_loss": _last_logged_loss(out_dir),
        "conditioning_gap": gap,
        "denoising_error": error,
    }
    if latent_pack is not None:
        metrics["latent_pack"] = {"file": Path(latent_pack).name, "sha256": file_sha256(Path(latent_pack))}
    atomic_write_json(
        out_dir / STAGE_FILE,
        {"stage": stage, "config": config.fingerprint(), "steps": config.steps, "metrics": metrics}
        | _runtime_record(config, runtime),
    )
    runtime.wait()
    return target


def _check_box_settings(config: StageConfig) -> None:
    if config.box_loss not in BOX_LOSS_FORMS:
        raise InputError("box_loss", f"unknown box loss {config.box_loss!r} ({', '.join(BOX_LOSS_FORMS)})")
    if not 0 < config.box_max_timestep <= 1:
        raise InputError("box_max_timestep", f"{config.box_max_timestep} is not in (0, 1]")
    if not 0 <= config.cond_dropout < 1:
        raise InputError("cond_dropout", f"{config.cond_dropout} is not in [0, 1)")
    if config.train_text not in TEXT_TRAINING:
        raise InputError("train_text", f"unknown text training {config.train_text!r} ({', '.join(TEXT_TRAINING)})")
    if config.lambda_box < 0:
        raise InputError("lambda_box", "must not be negative")
    if config.lambda_empty < 0:
        raise InputError("lambda_empty", "must not be negative")
    if config.lambda_present < 0:
        raise InputError("lambda_present", "must not be negative")
    check_prediction(config.prediction_type, config.zero_terminal_snr)
    if config.timestep_sampling not in TIMESTEP_SAMPLING:
        raise InputError(
            "timestep_sampling",
            f"unknown timestep sampling {config.timestep_sampling!r} ({', '.join(TIMESTEP_SAMPLING)})",
        )


def snr_weight(snr: torch.Tensor, gamma: float, velocity: bool) -> torch.Tensor:
    """Min-SNR loss weights of the prediction error at each timestep's signal-to-noise ratio.

    Noise prediction: ``min(snr, gamma) / snr`` (Hang et al. 2023), a clean-latent weight of
    ``min(snr, gamma)``. Velocity prediction: ``min(snr + 1, gamma) / (snr + 1)``, a clean-latent weight of
    ``min(snr + 1, gamma)``, which keeps weight 1 at pure noise (``snr = 0``) where the layout is set.
    """
    if velocity:
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def predicted_clean(schedule: DDPMScheduler, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by a UNet output (noise or velocity, after the schedule's prediction type)."""
    alpha = schedule.alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)
    if schedule.config.prediction_type == "v_prediction":
        return alpha.sqrt() * noisy.float() - (1 - alpha).sqrt() * pred.float()
    return (noisy.float() - (1 - alpha).sqrt() * pred.float()) / alpha.sqrt()


def sample_timesteps(count: int, num_t: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps in ``[0, num_t)``: ``uniform``, or ``high`` (density proportional to ``t + 1/2``)."""
    if mode == "uniform":
        return torch.randint(0, num_t, (count,), generator=generator)
    if mode == "high":
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        return (u.sqrt() * num_t).floor().clamp(max=num_t - 1).long()
    raise ValueError(f"unknown timestep sampling {mode!r} ({', '.join(TIMESTEP_SAMPLING)})")


def _probe_levels(
    ldm: LDM,
    latents: torch.Tensor,
    ids: torch.Tensor,
    schedule: DDPMScheduler,
    seed: int,
    tiles: int,
    fractions: Sequence[float],
):
    """``(fraction, t, noisy, x0, cond)`` per noise level: evenly spaced tiles, their prompts' text
    states, seeded noise (the same for every diagnostic built on it)."""
    device = next(ldm.unet.parameters()).device
    pick = torch.from_numpy(np.linspace(0, len(latents) - 1, min(tiles, len(latents))).round().astype(np.int64))
    x0 = latents[pick].to(device)
    gen = torch.Generator().manual_seed(seed + 7)
    cond = ldm.text_encoder(ids[pick].to(device))[0]
    for frac in fractions:
        t = torch.full((len(pick),), int(frac * (schedule.config.num_train_timesteps - 1)), device=device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        yield frac, t, schedule.add_noise(x0, eps, t), x0, cond


@torch.no_grad()
def denoising_error(
    ldm: LDM,
    latents: torch.Tensor,
    ids: torch.Tensor,
    schedule: DDPMScheduler,
    seed: int,
    tiles: int = 16,
    fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
) -> dict:
    """Relative error of the one-step clean-latent prediction per noise level: where the model is weak.

    ``mean (x0_hat - x0)^2 / var(x0)``, with ``x0_hat`` recovered from the UNet's output (the tiles and
    seeded noise of :func:`conditioning_gap`, training prompts). 0 is a perfect one-step denoiser; about 1
    is no better than the mean latent. The noise-prediction error itself is smallest at high noise, where
    the noisy input is nearly the noise, so it would hide the regime text-to-image sampling starts in.
    """
    out = {}
    for frac, t, noisy, x0, cond in _probe_levels(ldm, latents, ids, schedule, seed, tiles, fractions):
        x0_hat = predicted_clean(schedule, noisy, ldm.unet(noisy, t, cond).sample, t)
        out[f"t{frac:g}"] = round(float((x0_hat - x0.float()).pow(2).mean() / (x0.float().var() + 1e-12)), 5)
    return out


@torch.no_grad()
def conditioning_gap(
    ldm: LDM,
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    schedule: DDPMScheduler,
    seed: int,
    tiles: int = 16,
    fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
) -> dict:
    """How much the UNet uses its prompt: ``mean |eps_cond - eps_uncond| / mean |eps_cond|``.

    Evenly spaced tiles, each with its training prompt against the empty prompt, at a few noise levels
    with seeded noise. 0 means the prompt changes nothing (classifier-free guidance has nothing to amplify).
    """
    uncond = None
    out = {}
    for frac, t, noisy, _, cond in _probe_levels(ldm, latents, ids, schedule, seed, tiles, fractions):
        if uncond is None:
            uncond = ldm.text_encoder(empty_ids.expand(len(t), -1).to(t.device))[0]
        e_c = ldm.unet(noisy, t, cond).sample.float()
        e_u = ldm.unet(noisy, t, uncond).sample.float()
        out[f"t{frac:g}"] = round(float((e_c - e_u).abs().mean() / (e_c.abs().mean() + 1e-12)), 5)
    out["mean"] = round(float(np.mean(list(out.values()))), 5)
    return out


def _runtime_record(config: StageConfig, runtime: Runtime) -> dict:
    """``{"runtime": ...}`` for ``stage.json`` when the stage ran anywhere but one CPU process, else ``{}``."""
    if runtime.device.type == "cpu" and runtime.mixed_precision == "no" and not runtime.distributed:
        return {}
    return {
        "runtime": {
            "device": str(config.device),
            "mixed_precision": runtime.mixed_precision,
            "world_size": runtime.world,
        }
    }


def _last_logged_loss(out_dir: Path) -> float | None:
    """The last logged loss of a stage folder (``None`` when nothing is logged)."""
    path = out_dir / LOSSES_CSV
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return float(rows[-1]["loss"]) if rows else None


# ----------------------------------------------------------------------------- public entry
def train_stage(
    stage: str,
    config: StageConfig,
    train_splits: Sequence[Path],
    out_dir: Path,
    resume: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    latent_pack: str | Path | None = None,
) -> Path:
    """Run one training stage.

    Args:
        stage: ``"0"``, ``"A"``, ``"B"`` or ``"C"``.
        config: its settings (``init_model`` is the previous stage's returned folder).
        train_splits: tile split folders (``aerosynth.data.tileset`` layout); domain and weak flag come
            from each split's ``tiles.json``.
        out_dir: the stage's output folder.
        resume: continue from ``out_dir/checkpoints/last.pt`` when present; ``False`` starts over.
        on_step: called after every optimizer step with the step number and its losses.
        latent_pack: train stages A-C from a :mod:`aerosynth.generation.latent_pack` file instead of the tiles
            (``train_splits`` may then be empty; ``max_tiles_per_split`` does not apply).

    Returns:
        The trained model folder (``out_dir/model``; ``out_dir/autoencoder`` for stage 0),
        loadable with :func:`aerosynth.generation.models.load_ldm` (or as ``autoencoder_dir``).

    Raises:
        InputError: unknown stage, bad splits, missing ``init_model``, corrupt checkpoint.
        KeyboardInterrupt: after SIGINT, once the checkpoint is written (SIGTERM: SystemExit).
    """
    stage = str(stage).upper()
    if stage not in STAGES:
        raise InputError("stage", f"unknown training stage {stage!r}; choose one of {list(STAGES)}")
    if not train_splits and latent_pack is None:
        raise InputError("train_splits", "no training split given")
    if latent_pack is not None and str(stage).upper() == "0":
        raise InputError("latent_pack", "stage 0 trains the autoencoder and needs the tiles, not a latent pack")
    if config.steps < 1 or config.batch_size < 1 or config.grad_accum < 1 or config.checkpoint_every < 1:
        raise InputError("config", "steps, batch_size, grad_accum and checkpoint_every must be positive")
    owner = f"{type(config).__name__}"
    runtime = make_runtime(config.device, config.mixed_precision, owner)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    done = out_dir / STAGE_FILE
    result = out_dir / ("autoencoder" if stage == "0" else "model")
    if resume and done.is_file() and result.is_dir():
        doc = json.loads(done.read_text())
        same_pack = latent_pack is None or (doc.get("metrics", {}).get("latent_pack") or {}).get(
            "sha256"
        ) == file_sha256(Path(latent_pack))
        if doc.get("config") == config.fingerprint() and doc.get("steps") == config.steps and same_pack:
            return result
    done.unlink(missing_ok=True)
    if stage == "0":
        return _stage0(
            config if isinstance(config, Stage0Config) else Stage0Config(**asdict(config)),
            train_splits,
            out_dir,
            resume,
            on_step,
            runtime,
        )
    return _diffusion_stage(
        stage, config, train_splits, out_dir, resume, on_step, runtime, Path(latent_pack) if latent_pack else None
    )
