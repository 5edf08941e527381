"""A real-vs-synthetic two-sample test: can a small classifier tell generated images from real ones?

A tiny CNN is trained to separate real tiles (label 0) from synthetic images (label 1) and scored on
images it never saw. Held-out accuracy near 0.5 means the two sets are indistinguishable to it; near 1.0
means the synthetic images are easy to spot (a different look, artefacts, wrong statistics). It is a
diagnostic of the generator only: nothing is chosen with it.

Classes are balanced (the first ``n`` images of each, ``n`` the smaller count, capped), the held-out part
is chosen by index (every ``k``-th image of each class), and everything is seeded: the same inputs give
the same number, bit for bit, on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb

ImageLike = str | Path | np.ndarray


def _load(images: Sequence[ImageLike], n: int, size: int, what: str) -> np.ndarray:
    """The first ``n`` images as ``(n, 3, size, size)`` float32 in ``[-1, 1]``."""
    out = np.empty((n, 3, size, size), np.float32)
    for i, image in enumerate(images[:n]):
        rgb = read_rgb(image) if isinstance(image, (str, Path)) else np.asarray(image)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"{what}[{i}]", f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
        if rgb.shape[:2] != (size, size):
            rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        out[i] = rgb.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    return out


def _classifier() -> nn.Module:
    """Three strided convolutions, global average pooling, one logit (about 15 k parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 1),
    )


def two_sample_accuracy(
    real_images: Sequence[ImageLike],
    synthetic_images: Sequence[ImageLike],
    seed: int = 0,
    size: int = 64,
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    held_out_every: int = 4,
    max_per_class: int = 512,
) -> dict:
    """Held-out accuracy of a small CNN telling ``real_images`` from ``synthetic_images``.

    Args:
        real_images: real tiles (paths or ``(H, W, 3)`` uint8 RGB arrays).
        synthetic_images: generated images, the same way.
        seed: seed of the weights' initialisation and of the batches.
        size: images are resized (area) to ``size x size`` pixels.
        steps: optimiser steps (Adam) on the training part.
        batch_size: images per step, half of each class.
        learning_rate: Adam's learning rate.
        held_out_every: image ``i`` of a class is held out when ``i % held_out_every == held_out_every - 1``.
        max_per_class: most images used per class.

    Returns:
        ``accuracy`` (held-out, 0.5 = indistinguishable), ``real_accuracy`` and ``synthetic_accuracy``
        (per class), ``per_class`` (images used per class), ``train`` and ``held_out`` counts (both
        classes), the ``real_available`` / ``synthetic_available`` counts and the settings.

    Raises:
        InputError: fewer than ``held_out_every`` images in a class (one held out), a bad setting or a bad image.
    """
    if size < 8 or steps < 1 or batch_size < 2 or held_out_every < 2 or max_per_class < 1:
        raise InputError("two_sample_accuracy", "size >= 8, steps >= 1, batch_size >= 2, held_out_every >= 2")
    n = min(len(real_images), len(synthetic_images), max_per_class)
    if n < held_out_every:
        raise InputError(
            "two_sample_accuracy",
            f"needs at least {held_out_every} images per class, got {len(real_images)} real and "
            f"{len(synthetic_images)} synthetic",
        )
    x = np.concatenate([_load(real_images, n, size, "real_images"), _load(synthetic_images, n, size, "synthetic")])
    y = np.concatenate([np.zeros(n, np.float32), np.ones(n, np.float32)])
    index = np.concatenate([np.arange(n), np.arange(n)])
    held = index % held_out_every == held_out_every - 1
    train_idx, test_idx = np.flatnonzero(~held), np.flatnonzero(held)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _classifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(seed)
    real_train, syn_train = train_idx[y[train_idx] == 0], train_idx[y[train_idx] == 1]
    half = max(batch_size // 2, 1)
    model.train()
    for _ in range(steps):
        batch = np.concatenate([rng.choice(real_train, half), rng.choice(syn_train, half)])
        xb = x_t[batch]
        flip = rng.integers(0, 2, size=2)  # flips of the whole batch: content, not orientation, decides
        if flip[0]:
            xb = xb.flip(-1)
        if flip[1]:
            xb = xb.flip(-2)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb).squeeze(1), y_t[batch])
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x_t[test_idx[i : i + 256]]).squeeze(1) for i in range(0, len(test_idx), 256)])
    predicted = (logits.numpy() > 0).astype(np.float32)
    correct = predicted == y[test_idx]
    is_real = y[test_idx] == 0
    return {
        "accuracy": float(correct.mean()),
        "real_accuracy": float(correct[is_real].mean()),
        "synthetic_accuracy": float(correct[~is_real].mean()),
        "per_class": int(n),
        "train": int(len(train_idx)),
        "held_out": int(len(test_idx)),
        "real_available": len(real_images),
        "synthetic_available": len(synthetic_images),
        "final_train_loss": float(loss.detach()),
        "settings": {
            "seed": seed,
            "size": size,
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "held_out_every": held_out_every,
            "max_per_class": max_per_class,
        },
    }
