"""Shared fixtures: offline settings first, tiny generated data, the real-data location."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from aerosynth.data.offline import apply_offline_settings
from aerosynth.flows.config import PRESETS

#: One settings folder per pytest-xdist worker (``PYTEST_XDIST_WORKER``: gw0, gw1 ...), so that no two write it at once.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_CFG = Path(os.environ.get("AEROSYNTH_TEST_HOME", "/tmp/aerosynth-test-home" + (f"-{_WORKER}" if _WORKER else "")))
os.environ.setdefault("AEROSYNTH_HOME", str(_CFG))
apply_offline_settings(_CFG / "yolo_config")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AEROSYNTH_SHARED", REPO.parent / "shared"))
AERIAL = SHARED / "data" / "aerial"
TAEF2 = SHARED / "weights" / "taef2"


#: Modules that share one expensive session fixture run on one xdist worker, so that it is built once.
SHARED_FIXTURE_GROUPS = {"test_readme_commands": "readme_demo", "test_terminal_output": "readme_demo"}
#: The longest groups (full adapt runs), handed out first so that neither worker ends on one alone.
LONG_GROUPS = ("readme_demo", "test_flows", "test_kill_resume", "test_boxless_target", "test_box_supervision")


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups into the test ids
def pytest_collection_modifyitems(config, items) -> None:
    """Give every test its module as xdist group (``--dist loadgroup``): a module's fixtures are built once.

    The suite runs on two workers (``-n 2`` in pyproject.toml); modules in :data:`SHARED_FIXTURE_GROUPS` share one.
    """
    if not config.pluginmanager.hasplugin("xdist"):  # -p no:xdist (benchmarks/gpu_check.sh): one process
        return
    group = {}
    for item in items:
        group[item] = SHARED_FIXTURE_GROUPS.get(item.path.stem, item.path.stem)
        item.add_marker(pytest.mark.xdist_group(group[item]))
    rank = {name: k for k, name in enumerate(LONG_GROUPS)}
    items.sort(key=lambda item: rank.get(group[item], len(LONG_GROUPS)))  # stable: a module keeps its order


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


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory) -> Path:
    """A detector trained for one epoch on eight 64 px toy tiles (``detector.pt``, its ``detector.json`` beside it).

    Weak, but a real ultralytics checkpoint: at a low confidence it gives many boxes per window, which is
    what tests of the inference path need. One per session, shared by the tests that run a real model.
    """
    from aerosynth.detection.datasets import DatasetSpec
    from aerosynth.detection.toydata import write_toy_split
    from aerosynth.detection.training import DetectorTrainConfig, train_detector

    root = tmp_path_factory.mktemp("tiny-detector")
    split = write_toy_split(root / "source-train", 8, tile_size=64)
    config = DetectorTrainConfig(epochs=1, imgsz=64, batch=8)
    return train_detector(config, [DatasetSpec(split)], DatasetSpec(split), root / "m")


#: The smallest adapt run that still exercises every stage (the ``smoke`` preset, spelled out so
#: that tests can change single fields).
TINY_ADAPT = {"preset": "smoke", **copy.deepcopy(PRESETS["smoke"])}


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory) -> tuple[Path, str]:
    """``aerosynth data demo --out demo_rasters`` and ``aerosynth demo --quick`` as the README types them.

    The installed console script in a fresh working folder, relative paths, no Prefect server configured, both
    streams into one pipe (what a person sees when the output goes to a file). Returns the folder (its
    ``runs/smoke`` is the run) and the demo's output. Shared by the README-commands and terminal-output tests:
    one smoke run, not one per module.
    """
    import shutil
    import subprocess
    import sys

    script = Path(sys.executable).parent / "aerosynth"
    script = str(script) if script.is_file() else shutil.which("aerosynth")
    if script is None:
        pytest.skip("the aerosynth console script is not installed (pip install -e .)")
    folder = tmp_path_factory.mktemp("readme") / "work"
    folder.mkdir()
    from aerosynth.flows.progress import LOG_DIR_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_") and k != LOG_DIR_ENV}
    env |= {"PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    outputs = []
    for args in (["data", "demo", "--out", "demo_rasters"], ["demo", "--quick"]):
        proc = subprocess.run(
            [script, *args], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, f"aerosynth {' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-3000:]}"
        outputs.append(proc.stdout)
    return folder, outputs[-1]
