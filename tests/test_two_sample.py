"""The real-vs-synthetic two-sample test: chance on one distribution, perfect on two obviously different ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aerosynth.annotation.fake_data import draw_scene
from aerosynth.data.errors import InputError
from aerosynth.detection.two_sample import two_sample_accuracy


def _scenes(seed: int, n: int, domain: str = "madison_drone") -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [draw_scene(rng, 64, int(rng.integers(0, 4)), domain)[0] for _ in range(n)]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_same_distribution_is_near_chance_and_repeatable():
    a, b = _scenes(1, 160), _scenes(2, 160)
    result = two_sample_accuracy(a, b, seed=0, size=32, steps=120)
    assert result["per_class"] == 160 and result["held_out"] == 80 and result["train"] == 240
    assert 0.3 <= result["accuracy"] <= 0.7, result
    assert two_sample_accuracy(a, b, seed=0, size=32, steps=120) == result  # bit-identical rerun


def test_obviously_different_images_are_told_apart():
    real = _scenes(3, 64)
    fake = [255 - img for img in _scenes(4, 80)]  # inverted colours; more synthetic than real: balanced to 64
    result = two_sample_accuracy(real, fake, seed=0, size=32, steps=120)
    assert result["per_class"] == 64 and result["synthetic_available"] == 80
    assert result["accuracy"] >= 0.95, result


def test_too_few_images_or_bad_images_are_input_errors():
    with pytest.raises(InputError, match="at least 4"):
        two_sample_accuracy(_scenes(5, 3), _scenes(6, 20))
    with pytest.raises(InputError, match="uint8"):
        two_sample_accuracy([np.zeros((8, 8), np.uint8)] * 8, _scenes(6, 8))
