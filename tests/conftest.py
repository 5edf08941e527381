"""Shared fixtures: offline settings first, tiny generated data, the real-data location."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from aerosynth.data.offline import apply_offline_settings
from aerosynth.flows.config import PRESETS

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


#: The smallest adapt run that still exercises every stage (the ``smoke`` preset, spelled out so
#: that tests can change single fields).
TINY_ADAPT = {"preset": "smoke", **copy.deepcopy(PRESETS["smoke"])}
