"""TAEF2, the pretrained tiny autoencoder of FLUX.2, as a plain torch module.

Layout from the README next to the weights (MIT, madebyollin/taesd): ``torch.nn.Sequential``
encoder and decoder of 64-channel residual blocks; the blocks of the lowest resolution add a
bottleneck branch ``x + pool(x)`` first. Images are RGB in ``[0, 1]``; latents have 32
channels at 1/8 of the resolution.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from aerosynth.data.errors import InputError

ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"
LATENT_CHANNELS = 32
FACTOR = 8


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp ``tanh(x / 3) * 3`` of the decoder input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block: three 3x3 convs, identity skip, ReLU after the sum; optional bottleneck branch."""

    def __init__(self, channels: int = 64, with_pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(), _conv(channels, channels)
        )
        self.pool = (
            nn.Sequential(
                nn.Conv2d(channels, 4 * channels, 1, bias=False),
                nn.GroupNorm(4, 4 * channels),
                nn.ReLU(),
                nn.Conv2d(4 * channels, channels, 1, bias=False),
            )
            if with_pool
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def build_encoder(ch: int = 64) -> nn.Sequential:
    """Encoder: RGB ``[0, 1]`` -> 32 latent channels at 1/8."""
    layers: list[nn.Module] = [_conv(3, ch), Block(ch)]
    for level in range(3):
        last = level == 2
        layers += [_conv(ch, ch, stride=2, bias=False), Block(ch, last), Block(ch, last), Block(ch, last)]
    layers.append(_conv(ch, LATENT_CHANNELS))
    return nn.Sequential(*layers)


def build_decoder(ch: int = 64) -> nn.Sequential:
    """Decoder: latents -> RGB (about ``[0, 1]``)."""
    layers: list[nn.Module] = [Clamp(), _conv(LATENT_CHANNELS, ch), nn.ReLU(), Block(ch, True), Block(ch, True)]
    layers.append(Block(ch, True))
    for n_blocks in (3, 3, 1):
        layers += [nn.Upsample(scale_factor=2), _conv(ch, ch, bias=False)] + [Block(ch) for _ in range(n_blocks)]
    layers.append(_conv(ch, 3))
    return nn.Sequential(*layers)


class TAEF2(nn.Module):
    """The pretrained encoder/decoder pair."""

    latent_channels = LATENT_CHANNELS
    factor = FACTOR

    def __init__(self) -> None:
        super().__init__()
        self.encoder = build_encoder()
        self.decoder = build_decoder()

    @classmethod
    def from_dir(cls, weights_dir: str | Path) -> TAEF2:
        """Load ``taef2_encoder.pth`` and ``taef2_decoder.pth`` from a folder.

        Raises:
            InputError: a file is missing or its tensors do not fit the layout.
        """
        weights_dir = Path(weights_dir)
        model = cls()
        for name, part in ((ENCODER_FILE, model.encoder), (DECODER_FILE, model.decoder)):
            path = weights_dir / name
            if not path.is_file():
                raise InputError(path, "TAEF2 weight file not found")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                part.load_state_dict(state, strict=True)
            except Exception as exc:  # torch.load raises many types for a damaged file
                raise InputError(path, f"not a TAEF2 state dict ({str(exc).splitlines()[0][:120]})") from None
        model.eval().requires_grad_(False)
        return model

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """RGB ``(B, 3, H, W)`` in ``[0, 1]`` -> latents ``(B, 32, H/8, W/8)``."""
        return self.encoder(images01)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> RGB in ``[0, 1]`` (clamped)."""
        return self.decoder(latents).clamp(0, 1)
