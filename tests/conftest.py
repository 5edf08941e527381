"""Shared fixtures: offline settings first, tiny generated data, the real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data.offline import apply_offline_settings

_CFG = Path(os.environ.get("AEROSYNTH_TEST_HOME", "/tmp/aerosynth-test-home"))
os.environ.setdefault("AEROSYNTH_HOME", str(_CFG))
apply_offline_settings(_CFG / "yolo_config")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AEROSYNTH_SHARED", REPO.parent / "shared"))
AERIAL = SHARED / "data" / "aerial"
TAEF2 = SHARED / "weights" / "taef2"


@pytest.fixture(scope="session")
def aerial_root() -> Path:
    """The real imagery; tests that need it skip with the reason when it is absent."""
    if not (AERIAL / "madison_drone").is_dir() or not (AERIAL / "kit_munich_aerial").is_dir():
        pytest.skip(f"real aerial data not found at {AERIAL} (set AEROSYNTH_SHARED)")
    return AERIAL


@pytest.fixture(scope="session")
def taef2_dir() -> Path:
    if not (TAEF2 / "taef2_encoder.pth").is_file():
        pytest.skip(f"pretrained TAEF2 autoencoder not found at {TAEF2}")
    return TAEF2


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (~15 s cold start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


#: The smallest adapt run that still exercises every stage (seconds per stage on a CPU).
TINY_ADAPT = {
    "preset": "demo",
    "data": {"demo_scenes": 2, "demo_size": 256},
    "generation": {
        "stage0": {"steps": 4, "batch_size": 4, "checkpoint_every": 2},
        "stage_a": {"steps": 3, "batch_size": 4, "checkpoint_every": 2},
        "stage_b": {"steps": 3, "batch_size": 4, "checkpoint_every": 2},
        "stage_c": {"steps": 2, "batch_size": 4, "checkpoint_every": 2},
        "sampling": {"steps": 3, "batch_size": 4, "shard_size": 4},
        "counts": {"source_cars": 4, "target_cars": 4, "target_empty": 2},
    },
    "annotation": {"relay": {"source_epochs": 1, "heatmap_epochs": 1, "patience": 1, "augment": False}},
    "detection": {"epochs": 1, "patience": 1, "seeds": [0], "augment": False},
}
