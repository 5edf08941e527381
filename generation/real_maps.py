"""Cross-attention maps of *real* images: what the model "sees" as vehicles in a labelled tile.

Used to measure how good heat-map pseudo-boxes are (``aerosynth.annotation.map_quality``): a real tile is
encoded, noised to a chosen fraction of the schedule with a seeded noise, and passed once through
the UNet with the domain's vehicle prompt while the "cars" token's cross-attention is captured
(conditional branch, every captured layer, heads averaged).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from aerosynth.data.errors import InputError
from aerosynth.generation.attention import AttentionStore, capturing, default_capture_sides
from aerosynth.generation.models import LDM, load_ldm, token_positions
from aerosynth.generation.sampling import SamplingConfig, capture_token_ids, make_scheduler


def cars_map_function(
    model: LDM | str | Path,
    domain: str,
    noise_fraction: float = 0.3,
    seed: int = 0,
    token: str = "cars",
    encode_cache: dict[bytes, torch.Tensor] | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``rgb (H, W, 3) uint8 -> (S, S) float`` map of ``token`` for real images.

    Args:
        model: a trained model folder or a loaded :class:`LDM`.
        domain: the domain named in the prompt (one the model knows).
        noise_fraction: timestep of the single pass, as a fraction of the training schedule (0..1].
        seed: seed of the noise (the same for every image, so maps are repeatable).
        token: which captured token's map to return: ``cars``, ``V1`` or ``background``.
        encode_cache: a dict shared by several map functions of one model (e.g. one per noise level):
            each image is encoded once (keyed by its bytes' digest).
    """
    if not 0 < noise_fraction <= 1:
        raise InputError("noise_fraction", f"{noise_fraction} is not in (0, 1]")
    which = {"cars": 0, "V1": 1, "background": 2}
    if token not in which:
        raise InputError("token", f"unknown token {token!r} (cars, V1 or background)")
    ldm = model if isinstance(model, LDM) else load_ldm(model)
    ldm.check_domain(domain)
    config = SamplingConfig(use_learned_tokens=None)
    use_tokens = ldm.spec.tokens_trained
    ids = ldm.token_ids([ldm.prompt(domain, True, use_tokens)])
    positions = token_positions(ids, capture_token_ids(ldm, domain, config))
    size = ldm.spec.image_size
    side = size // ldm.codec.factor
    sides = default_capture_sides(ldm.unet, side)
    scheduler = make_scheduler(ldm, "ddim")
    t = torch.tensor([int(round(noise_fraction * (scheduler.config.num_train_timesteps - 1)))])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = ldm.encode_text(ids)

    @torch.no_grad()
    def cars_map(rgb: np.ndarray) -> np.ndarray:
        if rgb.shape[:2] != (size, size):
            rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1
        if encode_cache is None:
            clean = ldm.codec.encode(x)
        else:
            key = hashlib.sha1(rgb.tobytes()).digest()
            if key not in encode_cache:
                encode_cache[key] = ldm.codec.encode(x)
            clean = encode_cache[key]
        noise = torch.randn(clean.shape, generator=generator.manual_seed(seed))
        noisy = scheduler.add_noise(clean, noise, t)
        store = AttentionStore(positions, tuple(clean.shape[-2:]), sides)
        with capturing(ldm.unet, store):
            ldm.unet(noisy, t, cond)
        return store.mean_maps()[0, which[token]].float().numpy()

    return cars_map
