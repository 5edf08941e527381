"""Kill ``aerosynth adapt`` with SIGKILL during fine-tuning and during synthesis, rerun, and get
the outputs of an uninterrupted run, with no partial file left and no worker of a killed run alive."""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from aerosynth.flows.server_cleanup import run_processes
from tests.conftest import TINY_ADAPT

pytestmark = pytest.mark.slow

KILL_CONFIG = copy.deepcopy(TINY_ADAPT)
KILL_CONFIG["generation"]["stage_a"] = {"steps": 30, "batch_size": 4, "checkpoint_every": 3}
KILL_CONFIG["generation"]["sampling"] = {"steps": 3, "batch_size": 1, "shard_size": 1}
KILL_CONFIG["generation"]["counts"] = {"source_cars": 4, "target_cars": 12, "target_empty": 2}
KILL_CONFIG["annotation"]["relay"]["enabled"] = False
KILL_CONFIG["detection"]["oracle"] = False


def _sha(p: Path, work: Path) -> str:
    data = p.read_bytes()
    if p.suffix in (".json", ".yaml", ".txt", ".geojson"):  # the run folder's own path is allowed to differ
        data = data.replace(str(work).encode(), b"WORK")
    return hashlib.sha256(data).hexdigest()


def deterministic_outputs(work: Path) -> dict[str, str]:
    """Hashes of everything a run promises to reproduce: tiles, model weights, synthetic sets,
    labelled datasets, metrics. (Ultralytics checkpoints carry dates and are left out.)"""
    keep = []
    keep += [work / "tiles" / "manifest.json"]
    keep += sorted((work / "ldm").glob("stage*/model/**/*"))
    keep += sorted((work / "synthetic").rglob("*"))
    keep += sorted((work / "annotation").glob("*/dataset/**/*"))
    keep += sorted((work / "detectors").glob("*/*/metrics.json"))
    return {str(p.relative_to(work)): _sha(p, work) for p in keep if p.is_file() and p.name != "stage_done.json"}


def partial_files(work: Path) -> list[Path]:
    return [p for p in work.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial") or ".partial" in p.name]


def _start(config: Path, work: Path, env: dict, until: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "aerosynth.flows.cli", "adapt", "--config", str(config), "--work-dir", str(work)]
    cmd += ["--until", until] if until else []
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1]
    )


def _left_behind(owner: int, seconds: float = 5.0) -> list[psutil.Process]:
    """Processes of the killed run ``owner`` (workers, resource tracker) still running after ``seconds``."""

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    end = time.monotonic() + seconds
    left = [p for p in run_processes(owner) if alive(p)]
    while left and time.monotonic() < end:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    for p in left:  # never leave them to the rest of the suite
        p.kill()
    return left


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert _left_behind(proc.pid) == []  # its workers die with it
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended (status {proc.returncode}) before the kill point")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("kill point not reached in time")


def test_sigkill_during_training_and_synthesis_then_resume(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from aerosynth.flows.adapt import run_adapt

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(KILL_CONFIG))
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONUNBUFFERED": "1"}

    work = tmp_path / "killed"
    stage_a = work / "ldm" / "stageA"
    proc = _start(config, work, env)
    _kill_when(proc, lambda: (stage_a / "checkpoints" / "last.pt").is_file())
    assert not (stage_a / "stage_done.json").exists()

    target_cars = work / "synthetic" / "target_cars"
    proc = _start(config, work, env)
    _kill_when(proc, lambda: len(list((target_cars / "shards").glob("*.json"))) >= 2 if target_cars.is_dir() else False)
    assert not (target_cars / "stage_done.json").exists()
    assert (stage_a / "stage_done.json").exists()  # the rerun finished fine-tuning from its checkpoint

    # the killed stages are fine-tuning and synthesis: the resumed run and the clean one stop after synthesis
    # (what follows reads these outputs; that a finished stage is skipped is tests/test_flows.py's)
    proc = _start(config, work, env, until="synthetic")
    assert proc.wait(timeout=600) == 0
    assert partial_files(work) == []

    clean = tmp_path / "clean"
    run_adapt({**KILL_CONFIG, "work_dir": str(clean)}, until="synthetic")
    killed, uninterrupted = deterministic_outputs(work), deterministic_outputs(clean)
    assert len(uninterrupted) > 50
    assert killed == uninterrupted
