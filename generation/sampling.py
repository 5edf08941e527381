"""Synthesis of image sets with their cross-attention heat maps, and source-guided translation.

A set folder (read by ``annotation/``)::

    SET_DIR/
      synthetic.json            set, domain, with_vehicles, prompt, count, base_seed, image_size, gsd,
                                heatmap_channels (+ the sampling settings)
      images/000000.png         image i from seed base_seed + i
      heatmaps/000000.png       R = "cars", G = [V1], B = 255 - background token (min-max to 0..255)
      maps/000000.npy           optional float32 (3, H, W): raw "cars", [V1], background maps
                                (means over heads, layers and steps; not normalised, not inverted)
      labels/000000.txt         translation sets only: YOLO boxes that survived
      shards/000000-000063.json one manifest per shard (index range, files, sha256), written last

Maps are those of the conditional branch of classifier-free guidance, averaged over heads, over
the cross-attention layers whose map side is in ``capture_sides`` (default: every layer whose side
is at least half the latent side, e.g. 16 and 8 for the ``cpu`` preset's 16x16 latents, 8 and 4
for ``tiny``), resized bilinearly to the largest of these sides, and over all denoising steps; the
running sum has a fixed size, so memory does not grow with steps. A token absent from the prompt
(the empty set has no "cars") gives a zero map.

Device: ``SamplingConfig.device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"N"``) is where the model
runs; it is moved there (a given :class:`LDM` in place). The starting noise of image ``i`` is still
drawn on the CPU from seed ``base_seed + i`` and then moved, so an image depends on its seed alone
on any device (CPU and CUDA bytes differ, by floating-point arithmetic). ``mixed_precision``
(``"fp16"``/``"bf16"``, CUDA only, refused on CPU) autocasts the UNet and text encoder; the
autoencoder decodes in fp32. The device is not recorded in ``synthetic.json`` (shards of one set may
come from different machines); a mixed precision other than ``"no"`` is, under ``sampling``.

Shards are index ranges of ``shard_size`` images; a shard is finished when its manifest exists and
its files match their hashes, so a rerun skips finished shards and redoes the others (no gap, no
duplicate), and different processes may run different shards of one set.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from aerosynth.data.atomic import atomic_output_path, atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import write_png
from aerosynth.data.manifest import file_sha256
from aerosynth.data.tileset import LabelledTileSplit, open_split
from aerosynth.generation.attention import AttentionStore, capturing, default_capture_sides
from aerosynth.generation.device import autocast, check_mixed_precision, resolve_device
from aerosynth.generation.models import LDM, load_ldm, noise_schedule, token_positions
from aerosynth.generation.vocab import VEHICLE_TOKEN, background_token

HEATMAP_CHANNELS = ["cars", "V1", "255-background"]
SETS = {"source_cars": True, "target_cars": True, "target_empty": False}
SET_FILE = "synthetic.json"
#: Deterministic schedulers only: an image depends on its seed alone, not on its batch.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "pndm": PNDMScheduler,
}


@dataclass
class SamplingConfig:
    """Settings of a synthesis run.

    Attributes:
        steps: denoising steps.
        guidance_scale: classifier-free guidance scale (1 switches guidance off).
        guidance_rescale: 0..1, how far the guided prediction's per-image standard deviation is brought
            back to the conditional one's (Lin et al. 2024, with zero-terminal-SNR models); 0 switches it off.
        scheduler: ``ddim`` (default), ``dpm``, ``euler`` or ``pndm``.
        batch_size: images per UNet batch.
        shard_size: images per shard (manifest).
        image_size: output side in pixels (default: the model's); a multiple of the autoencoder factor.
        use_learned_tokens: prompts with [V1] and the background token; ``None``: when the model's
            tokens were trained (stage B and later).
        capture_tokens: the three tokens captured as (cars, V1, background); ``None``: the defaults.
        capture_sides: map sides of the layers to aggregate (``None``: see the module docstring).
        save_raw_maps: also write ``maps/*.npy``.
        gsd: ground sample distance of the generated images (m/px), recorded in ``synthetic.json``.
        progress: show a progress bar.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a GPU index ``"N"``.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` autocast on CUDA (refused on CPU).
    """

    steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    scheduler: str = "ddim"
    batch_size: int = 4
    shard_size: int = 64
    image_size: int | None = None
    use_learned_tokens: bool | None = None
    capture_tokens: tuple[str, str, str] | None = None
    capture_sides: list[int] | None = None
    save_raw_maps: bool = False
    gsd: float = 0.125
    progress: bool = True
    device: str = "cpu"
    mixed_precision: str = "no"


@dataclass
class TranslationConfig(SamplingConfig):
    """Settings of source-guided translation.

    Attributes:
        strength: fraction of the noise schedule the source latent is noised to (0..1].
        keep_threshold: a box survives when the mean normalised "cars" heat inside it reaches this.
        max_tiles: translate at most this many tiles, evenly spaced over the sorted tile ids.
    """

    strength: float = 0.5
    keep_threshold: float = 0.3
    max_tiles: int | None = None


# ----------------------------------------------------------------------------- core
def make_scheduler(ldm: LDM, name: str):
    """A fresh inference scheduler of the model's noise schedule.

    Raises:
        InputError: unknown scheduler name.
    """
    if name not in SCHEDULERS:
        raise InputError("scheduler", f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cfg = noise_schedule(ldm)
    if (
        cfg.get("rescale_betas_zero_snr")
        and "rescale_betas_zero_snr" not in inspect.signature(SCHEDULERS[name]).parameters
    ):
        able = sorted(n for n, c in SCHEDULERS.items() if "rescale_betas_zero_snr" in inspect.signature(c).parameters)
        raise InputError("scheduler", f"{name} has no zero-terminal-SNR schedule; choose {', '.join(able)}")
    extra: dict = {}
    if name == "ddim":
        extra = {"clip_sample": False, "set_alpha_to_one": False}
    cfg.setdefault("steps_offset", 1)
    return SCHEDULERS[name](**cfg, **extra)


def _check_size(ldm: LDM, size: int) -> None:
    ldm.check_image_size(size)
    levels = 2 ** (len(ldm.unet.config.block_out_channels) - 1)
    if (size // ldm.codec.factor) % levels:
        raise InputError("image_size", f"{size} px gives latents not divisible by the UNet's {levels}x downsampling")


def capture_token_ids(ldm: LDM, domain: str, config: SamplingConfig) -> list[int]:
    """Vocabulary ids of the (cars, V1, background) tokens.

    Raises:
        InputError: a token name is not one token of the model's vocabulary.
    """
    names = config.capture_tokens or ("cars", VEHICLE_TOKEN, background_token(domain))
    if len(names) != 3:
        raise InputError("capture_tokens", "give three token names: cars, V1, background")
    return [ldm.token_id(n) for n in names]


@torch.no_grad()
def denoise(
    ldm: LDM,
    latents: torch.Tensor,
    ids: torch.Tensor,
    positions: torch.Tensor,
    scheduler,
    steps: int,
    guidance_scale: float,
    capture_sides: set[int] | None,
    start_index: int = 0,
    mixed_precision: str = "no",
    guidance_rescale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reverse process with cross-attention capture.

    Args:
        ldm: the model.
        latents: starting latents (pure noise for ``start_index == 0``, already scaled).
        ids: token ids of the prompts ``(B, L)``.
        positions: ``(B, K)`` token positions to capture.
        scheduler: inference scheduler; ``set_timesteps(steps)`` is called here.
        steps: number of inference steps of the full schedule.
        guidance_scale: classifier-free guidance scale.
        capture_sides: layer map sides to aggregate.
        start_index: skip the first steps (translation).
        mixed_precision: ``"fp16"``/``"bf16"`` autocast of the text encoder and UNet when ``latents``
            are on CUDA (``"no"``: full precision).
        guidance_rescale: see :class:`SamplingConfig`.

    Returns:
        Final latents and the mean maps ``(B, K, S, S)``.
    """
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[start_index:]
    if start_index and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_index)
    with autocast(latents.device, mixed_precision):
        cond = ldm.encode_text(ids)
        guided = guidance_scale != 1.0
        if guided:
            uncond = ldm.encode_text(ldm.token_ids([""] * len(ids)))
            context = torch.cat([uncond, cond])
        else:
            context = cond
    store = AttentionStore(positions, tuple(latents.shape[-2:]), capture_sides, conditional_half=guided)
    with capturing(ldm.unet, store):
        for t in timesteps:
            model_in = torch.cat([latents, latents]) if guided else latents
            model_in = scheduler.scale_model_input(model_in, t)
            with autocast(latents.device, mixed_precision):
                eps = ldm.unet(model_in, t, context).sample.float()
            if guided:
                e_uncond, e_cond = eps.chunk(2)
                eps = e_uncond + guidance_scale * (e_cond - e_uncond)
                if guidance_rescale > 0:
                    eps = rescale_guided(eps, e_cond, guidance_rescale)
            latents = scheduler.step(eps, t, latents).prev_sample
    return latents, store.mean_maps()


def check_guidance_rescale(amount: float) -> None:
    """Refuse a guidance rescale outside ``[0, 1]``.

    Raises:
        InputError: it is.
    """
    if not 0 <= amount <= 1:
        raise InputError("guidance_rescale", f"{amount} is not in [0, 1]")


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, amount: float) -> torch.Tensor:
    """Guided prediction with its per-image standard deviation moved ``amount`` of the way to ``cond``'s.

    Guidance at scale > 1 inflates the prediction's spread, which over-exposes images of a model whose
    schedule ends in pure noise; this is diffusers' ``rescale_noise_cfg``, per image, so a batch's images
    do not depend on each other.
    """
    dims = tuple(range(1, guided.ndim))
    scaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12))
    return amount * scaled + (1 - amount) * guided


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, H, W, 3)`` uint8."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def heatmaps(maps: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Heat-map PNG arrays and raw maps.

    Args:
        maps: ``(B, 3, S, S)`` mean maps of cars, [V1], background.
        size: image side.

    Returns:
        ``(B, size, size, 3)`` uint8 (R cars, G V1, B 255 - background, each resized to the image,
        then min-max normalised)
        and ``(B, 3, size, size)`` float32 raw maps resized to the image.
    """
    raw = F.interpolate(maps.float().cpu(), size=(size, size), mode="bilinear", align_corners=False)
    flat = raw.flatten(2)
    lo, hi = flat.amin(dim=2)[..., None, None], flat.amax(dim=2)[..., None, None]
    span = hi - lo
    norm = torch.where(span > 0, (raw - lo) / span.clamp(min=1e-12), torch.zeros_like(raw)).clamp(0, 1)
    norm[:, 2] = 1 - norm[:, 2]
    png = (norm * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return png, raw.numpy().astype(np.float32)


def _seed_noise(ldm: LDM, indices: Sequence[int], base_seed: int, side: int) -> torch.Tensor:
    shape = (ldm.codec.latent_channels, side, side)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(base_seed + i)) for i in indices])


# ----------------------------------------------------------------------------- shards
def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    """Half-open index ranges of the shards of a set."""
    return [(a, min(a + shard_size, count)) for a in range(0, count, shard_size)]


def shard_manifest_path(set_dir: Path, start: int, stop: int) -> Path:
    return set_dir / "shards" / f"{start:06d}-{stop - 1:06d}.json"


def shard_done(set_dir: Path, start: int, stop: int) -> bool:
    """A shard is finished when its manifest exists and every listed file matches its hash."""
    path = shard_manifest_path(set_dir, start, stop)
    if not path.is_file():
        return False
    try:
        doc = json.loads(path.read_text())
        files = doc["files"]
    except (ValueError, KeyError):
        return False
    if doc.get("start") != start or doc.get("stop") != stop:
        return False
    return all((set_dir / rel).is_file() and file_sha256(set_dir / rel) == digest for rel, digest in files.items())


def _write_header(set_dir: Path, header: dict) -> None:
    path = set_dir / SET_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise InputError(path, "unreadable set description; remove the folder to start over") from None
        diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
        if diff:
            raise InputError(path, f"set exists with different settings ({', '.join(diff)}); use another folder")
        return
    atomic_write_json(path, header)


def _run_shards(
    set_dir: Path,
    header: dict,
    shard_size: int,
    shards: Sequence[int] | None,
    make_batch: Callable[[list[int]], list[dict[str, object]]],
    batch_size: int,
    progress: bool,
) -> list[int]:
    """Produce the missing shards; ``make_batch(indices)`` returns per image ``{relative path: content}``."""
    if shard_size < 1 or batch_size < 1:
        raise InputError("shard_size", "shard_size and batch_size must be positive")
    set_dir.mkdir(parents=True, exist_ok=True)
    _write_header(set_dir, header)
    ranges = shard_ranges(int(header["count"]), shard_size)
    chosen = range(len(ranges)) if shards is None else list(shards)
    for k in chosen:
        if not 0 <= k < len(ranges):
            raise InputError("shards", f"shard {k} does not exist (the set has {len(ranges)})")
    todo = [k for k in chosen if not shard_done(set_dir, *ranges[k])]
    from tqdm.auto import tqdm

    total = sum(ranges[k][1] - ranges[k][0] for k in todo)
    bar = tqdm(total=total, disable=not progress, desc=header["set"], unit="img", dynamic_ncols=True)
    try:
        for k in todo:
            start, stop = ranges[k]
            files: dict[str, str] = {}
            for a in range(start, stop, batch_size):
                indices = list(range(a, min(a + batch_size, stop)))
                for outputs in make_batch(indices):
                    for rel, content in outputs.items():
                        path = set_dir / rel
                        _write_output(path, content)
                        files[rel] = file_sha256(path)
                bar.update(len(indices))
            atomic_write_json(shard_manifest_path(set_dir, start, stop), {"start": start, "stop": stop, "files": files})
    finally:
        bar.close()
    return todo


def _write_output(path: Path, content: object) -> None:
    if isinstance(content, np.ndarray) and content.dtype == np.uint8:
        write_png(path, content)
    elif isinstance(content, np.ndarray):
        with atomic_output_path(path, ".npy") as tmp:
            np.save(tmp, content)
    else:
        atomic_write_text(path, str(content))


def _runtime(config: SamplingConfig) -> tuple[torch.device, str]:
    """The parsed device and mixed precision of a sampling config (checked before any work)."""
    owner = type(config).__name__
    device = resolve_device(config.device, f"{owner}.device")
    return device, check_mixed_precision(config.mixed_precision, device, f"{owner}.mixed_precision")


def _model(model: LDM | str | Path, device: torch.device) -> LDM:
    ldm = model if isinstance(model, LDM) else load_ldm(model)
    ldm.unet.eval()
    return ldm.to(device)


def _use_tokens(ldm: LDM, config: SamplingConfig) -> bool:
    return ldm.spec.tokens_trained if config.use_learned_tokens is None else config.use_learned_tokens


def _sampling_header(config: SamplingConfig) -> dict:
    keep = ("steps", "guidance_scale", "scheduler", "capture_tokens", "capture_sides", "save_raw_maps")
    header = {k: v for k, v in asdict(config).items() if k in keep}
    if config.mixed_precision != "no":  # full precision keeps the header of sets written before this field
        header["mixed_precision"] = config.mixed_precision
    if config.guidance_rescale:  # so does no rescale
        header["guidance_rescale"] = config.guidance_rescale
    return header


# ----------------------------------------------------------------------------- generation
def generate_set(
    model: LDM | str | Path,
    out_dir: str | Path,
    set_name: str,
    domain: str,
    count: int,
    base_seed: int = 0,
    config: SamplingConfig | None = None,
    shards: Sequence[int] | None = None,
) -> Path:
    """Generate a synthetic set (``source_cars``, ``target_cars`` or ``target_empty``).

    Args:
        model: a model folder (``train_stage``'s result) or a loaded :class:`LDM`.
        out_dir: the set folder.
        set_name: which set; ``target_empty`` uses the prompt without vehicles.
        domain: the domain in the prompt (one the model knows).
        count: number of images; image ``i`` uses seed ``base_seed + i``.
        base_seed: seed of image 0.
        config: sampling settings.
        shards: shard numbers to produce in this call (``None``: all).

    Returns:
        The set folder.

    Raises:
        InputError: unknown set, domain, scheduler or token; an image size the autoencoder or
            UNet cannot take; a set folder written with other settings.
    """
    config = config or SamplingConfig()
    if set_name not in SETS:
        raise InputError("set_name", f"unknown set {set_name!r}; choose one of {sorted(SETS)}")
    if count < 1:
        raise InputError("count", "at least one image")
    check_guidance_rescale(config.guidance_rescale)
    device, precision = _runtime(config)
    ldm = _model(model, device)
    ldm.check_domain(domain)
    size = config.image_size or ldm.spec.image_size
    _check_size(ldm, size)
    scheduler = make_scheduler(ldm, config.scheduler)
    with_vehicles = SETS[set_name]
    prompt = ldm.prompt(domain, with_vehicles, _use_tokens(ldm, config))
    token_ids = capture_token_ids(ldm, domain, config)
    ids = ldm.token_ids([prompt])
    positions = token_positions(ids, token_ids)
    side = size // ldm.codec.factor
    sides = set(config.capture_sides) if config.capture_sides else default_capture_sides(ldm.unet, side)
    header = {
        "set": set_name,
        "domain": domain,
        "with_vehicles": with_vehicles,
        "prompt": prompt,
        "count": int(count),
        "base_seed": int(base_seed),
        "image_size": int(size),
        "gsd": float(config.gsd),
        "heatmap_channels": HEATMAP_CHANNELS,
        "capture_sides_used": sorted(sides, reverse=True),
        "sampling": _sampling_header(config),
    }

    def make_batch(indices: list[int]) -> list[dict[str, object]]:
        noise = (_seed_noise(ldm, indices, base_seed, side) * scheduler.init_noise_sigma).to(device)
        images, heat, raw = _sample_batch(ldm, noise, ids, positions, scheduler, config, sides, size, precision)
        return [_set_item(i, images[j], heat[j], raw[j], config.save_raw_maps) for j, i in enumerate(indices)]

    out = Path(out_dir)
    _run_shards(out, header, config.shard_size, shards, make_batch, config.batch_size, config.progress)
    return out


def _sample_batch(
    ldm: LDM,
    latents: torch.Tensor,
    ids: torch.Tensor,
    positions: torch.Tensor,
    scheduler,
    config: SamplingConfig,
    sides: set[int],
    size: int,
    precision: str,
    start_index: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Denoise a batch with capture and decode it: images, heat-map PNG arrays, raw maps."""
    n = len(latents)
    latents, maps = denoise(
        ldm,
        latents,
        ids.expand(n, -1),
        positions.expand(n, -1),
        scheduler,
        config.steps,
        config.guidance_scale,
        sides,
        start_index=start_index,
        mixed_precision=precision,
        guidance_rescale=config.guidance_rescale,
    )
    with torch.no_grad():
        images = to_uint8(ldm.codec.decode(latents))
    heat, raw = heatmaps(maps, size)
    return images, heat, raw


def _set_item(i: int, image: np.ndarray, heat: np.ndarray, raw: np.ndarray, save_raw: bool) -> dict[str, object]:
    """The files of image ``i`` of a set (relative path -> content)."""
    item: dict[str, object] = {f"images/{i:06d}.png": image, f"heatmaps/{i:06d}.png": heat}
    if save_raw:
        item[f"maps/{i:06d}.npy"] = raw
    return item


# ----------------------------------------------------------------------------- translation
def box_heat(heat01: np.ndarray, boxes: Detections) -> np.ndarray:
    """Mean of a ``(H, W)`` map in ``[0, 1]`` inside each box (pixels whose centre is inside)."""
    h, w = heat01.shape
    out = np.zeros(len(boxes))
    for k, (x1, y1, x2, y2) in enumerate(boxes.xyxy):
        c0, c1 = int(np.clip(math.floor(x1 + 0.5), 0, w - 1)), int(np.clip(math.ceil(x2 - 0.5), 1, w))
        r0, r1 = int(np.clip(math.floor(y1 + 0.5), 0, h - 1)), int(np.clip(math.ceil(y2 - 0.5), 1, h))
        patch = heat01[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)]
        out[k] = float(patch.mean()) if patch.size else 0.0
    return out


def translate_split(
    model: LDM | str | Path,
    source_split: str | Path,
    out_dir: str | Path,
    domain: str,
    base_seed: int = 0,
    config: TranslationConfig | None = None,
    shards: Sequence[int] | None = None,
) -> Path:
    """Source-guided translation of a labelled split into ``domain``'s style.

    Tile ``i`` (tiles sorted by id) is encoded, noised to ``strength`` with seed ``base_seed + i``,
    denoised with the target prompt while the "cars" map is captured; its boxes are kept when the
    mean normalised "cars" heat inside them reaches ``keep_threshold``.

    Returns:
        The ``translation`` set folder (``labels/`` included; manifests list the source tiles).

    Raises:
        InputError: a weak split (no boxes), unknown domain/token/scheduler, bad strength, guidance
            rescale or size.
    """
    config = config or TranslationConfig()
    if not 0 < config.strength <= 1:
        raise InputError("strength", f"{config.strength} is not in (0, 1]")
    check_guidance_rescale(config.guidance_rescale)
    split = open_split(Path(source_split))
    if not isinstance(split, LabelledTileSplit):
        raise InputError(source_split, "translation needs a labelled source split (this one is weak)")
    device, precision = _runtime(config)
    ldm = _model(model, device)
    ldm.check_domain(domain)
    size = config.image_size or ldm.spec.image_size
    _check_size(ldm, size)
    tile_ids = sorted(t.tile_id for t in split.tiles)
    if not tile_ids:
        raise InputError(source_split, "split has no tiles")
    if config.max_tiles is not None and len(tile_ids) > config.max_tiles:
        step = len(tile_ids) / config.max_tiles
        tile_ids = [tile_ids[int(i * step)] for i in range(config.max_tiles)]
    scheduler = make_scheduler(ldm, config.scheduler)
    prompt = ldm.prompt(domain, True, _use_tokens(ldm, config))
    ids = ldm.token_ids([prompt])
    positions = token_positions(ids, capture_token_ids(ldm, domain, config))
    side = size // ldm.codec.factor
    sides = set(config.capture_sides) if config.capture_sides else default_capture_sides(ldm.unet, side)
    start_index = min(config.steps - 1, int(round(config.steps * (1 - config.strength))))
    header = {
        "set": "translation",
        "domain": domain,
        "with_vehicles": True,
        "prompt": prompt,
        "count": len(tile_ids),
        "base_seed": int(base_seed),
        "image_size": int(size),
        "gsd": float(split.info.gsd * split.info.tile_size / size),
        "heatmap_channels": HEATMAP_CHANNELS,
        "capture_sides_used": sorted(sides, reverse=True),
        "source_split": str(Path(source_split).resolve()),
        "source_domain": split.info.domain,
        "strength": config.strength,
        "keep_threshold": config.keep_threshold,
        "max_tiles": config.max_tiles,
        "sampling": _sampling_header(config),
    }

    def make_batch(indices: list[int]) -> list[dict[str, object]]:
        rgbs, labels = [], []
        for i in indices:
            rgb = split.image(tile_ids[i])
            h, w = rgb.shape[:2]
            boxes = split.labels(tile_ids[i])
            if (h, w) != (size, size):
                rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
                boxes = boxes.scale(size / w, size / h)
            rgbs.append(rgb)
            labels.append(boxes)
        x = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        scheduler.set_timesteps(config.steps)
        t_start = scheduler.timesteps[start_index]
        with torch.no_grad():
            clean = ldm.codec.encode(x.to(device))
        noise = _seed_noise(ldm, indices, base_seed, side).to(device)
        noisy = scheduler.add_noise(clean, noise, t_start.repeat(len(indices)))
        images, heat, raw = _sample_batch(
            ldm, noisy, ids, positions, scheduler, config, sides, size, precision, start_index=start_index
        )
        out = []
        for j, i in enumerate(indices):
            cars01 = heat[j][:, :, 0].astype(np.float64) / 255
            keep = box_heat(cars01, labels[j]) >= config.keep_threshold
            item = _set_item(i, images[j], heat[j], raw[j], config.save_raw_maps)
            item[f"labels/{i:06d}.txt"] = labels[j][keep].to_yolo(size, size)
            out.append(item)
        return out

    out = Path(out_dir)
    _run_shards(out, header, config.shard_size, shards, make_batch, config.batch_size, config.progress)
    atomic_write_json(out / "sources.json", {f"{i:06d}": tile_ids[i] for i in range(len(tile_ids))})
    return out
