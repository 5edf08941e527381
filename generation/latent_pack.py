"""Latent packs: the training tiles' latents, quantised to uint8, for training on another machine.

A GPU box that fine-tunes the LDM needs only each tile's autoencoder latent, its domain and its weak
flag, not the imagery. A pack holds exactly that in one ``.npz`` file, 4x smaller than float32
latents: each channel is stored as uint8 over its own ``[low, high]`` range, so the round-trip error
is at most ``(high - low) / 510`` (about 0.02 for TAEF2 latents of unit variance, far below the noise
the diffusion loss adds). Stages A-C train from a pack as from tile splits::

    pack = write_latent_pack(["runs/x/tiles/source-train", "runs/x/tiles/target-train"], "pack.npz",
                             preset="cpu", autoencoder_dir="../shared/weights/taef2", max_per_group=1500)
    train_stage("A", StageAConfig(preset="cpu", autoencoder_dir=...), [], out, latent_pack="pack.npz")

``max_per_group`` keeps at most that many tiles (evenly spaced by tile id) of each domain x weak-flag
group, the groups the balanced sampler draws from; neighbouring video frames are near duplicates, so
thinning the largest groups costs little.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aerosynth.data.atomic import atomic_output_path
from aerosynth.data.errors import InputError

PACK_FORMAT = 1


@dataclass
class LatentPack:
    """Latents of training tiles with what the stages need to know about each tile.

    Attributes:
        latents: ``(N, C, h, w)`` float32, dequantised.
        names: ``split/tile_id`` of each tile.
        domains: domain of each tile.
        has_vehicle: weak flag of each tile.
        codec: autoencoder kind (``taef2`` or ``kl``) the latents came from.
        scaling: that codec's latent scaling.
        image_size: tile side the latents were encoded at.
        box_masks: ``(N, S, S)`` uint8 box masks of labelled (source) tiles, zeros elsewhere (``None`` in
            packs written before box supervision).
        has_boxes: the tile is labelled and has a box (the box loss trains on these only).
    """

    latents: torch.Tensor
    names: list[str]
    domains: list[str]
    has_vehicle: list[bool]
    codec: str
    scaling: float
    image_size: int
    box_masks: torch.Tensor | None = None
    has_boxes: list[bool] = field(default_factory=list)


def quantise(latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(uint8 codes, low, high)`` of ``(N, C, h, w)`` latents, one range per channel."""
    x = latents.detach().float().cpu().numpy()
    low = x.min(axis=(0, 2, 3)).astype(np.float32)
    high = x.max(axis=(0, 2, 3)).astype(np.float32)
    span = np.maximum(high - low, 1e-12)[None, :, None, None]
    codes = np.clip(np.rint((x - low[None, :, None, None]) / span * 255.0), 0, 255).astype(np.uint8)
    return codes, low, high


def dequantise(codes: np.ndarray, low: np.ndarray, high: np.ndarray) -> torch.Tensor:
    """Float32 latents of :func:`quantise`'s output."""
    span = (high - low).astype(np.float32)[None, :, None, None]
    x = codes.astype(np.float32) / 255.0 * span + low.astype(np.float32)[None, :, None, None]
    return torch.from_numpy(x)


def thin_groups(domains: Sequence[str], flags: Sequence[bool], max_per_group: int | None) -> list[int]:
    """Indices kept when every domain x flag group holds at most ``max_per_group`` tiles (evenly spaced)."""
    if max_per_group is None:
        return list(range(len(domains)))
    if max_per_group < 1:
        raise InputError("max_per_group", "must be at least 1")
    keep: list[int] = []
    for key in sorted(set(zip(domains, flags, strict=True))):
        members = [i for i, k in enumerate(zip(domains, flags, strict=True)) if k == key]
        if len(members) > max_per_group:
            picks = np.linspace(0, len(members) - 1, max_per_group).round().astype(int)
            members = [members[i] for i in picks]
        keep.extend(members)
    return sorted(keep)


def write_latent_pack(
    train_splits: Sequence[str | Path],
    out: str | Path,
    preset: str = "cpu",
    autoencoder_dir: str | Path | None = None,
    max_per_group: int | None = None,
    cache: str | Path | None = None,
) -> Path:
    """Encode the tiles of ``train_splits`` with a model's autoencoder and write them as a pack.

    Args:
        train_splits: tile split folders (``aerosynth.data.tileset`` layout).
        out: the ``.npz`` file to write (atomically).
        preset: model preset whose image size and autoencoder are used.
        autoencoder_dir: TAEF2 weights folder or stage-0 output.
        max_per_group: keep at most this many tiles per domain x weak-flag group.
        cache: a stage's ``cache/latents.pt`` to reuse (or fill) instead of encoding again.

    Returns:
        ``out``.

    Raises:
        InputError: no split, or a split is not a tile split.
    """
    from aerosynth.generation.models import build_ldm
    from aerosynth.generation.training import _encode_latents, load_tiles

    if not train_splits:
        raise InputError("train_splits", "no training split given")
    ldm = build_ldm(preset, autoencoder_dir)
    tiles = load_tiles([Path(s) for s in train_splits], ldm.spec.image_size)
    keep = thin_groups(tiles.domains, tiles.has_vehicle, max_per_group)
    with torch.no_grad():
        if cache is not None and (Path(cache).is_file() or len(keep) == len(tiles.names)):
            latents = _encode_latents(ldm, tiles, Path(cache))[keep]  # reuse (or fill) a stage's cache
        else:  # only the tiles kept: thinning first saves most of the encoding of near-duplicate frames
            images = tiles.images[torch.as_tensor(keep, dtype=torch.long)]
            latents = torch.cat([ldm.codec.encode(images[i : i + 16]) for i in range(0, len(keep), 16)])
    codes, low, high = quantise(latents)
    meta = {
        "format": PACK_FORMAT,
        "codec": ldm.codec.kind,
        "scaling": float(ldm.codec.scaling),
        "image_size": int(ldm.spec.image_size),
        "names": [tiles.names[i] for i in keep],
        "domains": [tiles.domains[i] for i in keep],
        "has_vehicle": [bool(tiles.has_vehicle[i]) for i in keep],
        "has_boxes": [bool(tiles.has_boxes[i]) for i in keep],
        "tiles_before_thinning": len(tiles.names),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_path(out, ".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                codes=codes,
                low=low,
                high=high,
                box_masks=tiles.box_masks[keep].numpy(),
                meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
            )
    return out


def read_latent_pack(path: str | Path) -> LatentPack:
    """Read a pack written by :func:`write_latent_pack`.

    Raises:
        InputError: missing file, not a pack, or an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "latent pack not found")
    try:
        with np.load(path, allow_pickle=False) as doc:
            codes, low, high = doc["codes"], doc["low"], doc["high"]
            masks = torch.from_numpy(doc["box_masks"]) if "box_masks" in doc.files else None
            meta = json.loads(doc["meta"].tobytes().decode())
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(path, f"not a latent pack ({exc})") from None
    if meta.get("format") != PACK_FORMAT:
        raise InputError(path, f"latent pack format {meta.get('format')!r}; this aerosynth reads {PACK_FORMAT}")
    n = codes.shape[0]
    if codes.ndim != 4 or not (len(meta["names"]) == len(meta["domains"]) == len(meta["has_vehicle"]) == n):
        raise InputError(path, "latent pack is inconsistent (tile lists and latents differ in length)")
    return LatentPack(
        latents=dequantise(codes, low, high),
        names=list(meta["names"]),
        domains=list(meta["domains"]),
        has_vehicle=[bool(f) for f in meta["has_vehicle"]],
        codec=str(meta["codec"]),
        scaling=float(meta["scaling"]),
        image_size=int(meta["image_size"]),
        box_masks=masks,
        has_boxes=[bool(f) for f in meta.get("has_boxes", [False] * n)],
    )
