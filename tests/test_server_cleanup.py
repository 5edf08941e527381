"""Temporary Prefect servers and workers left by killed aerosynth runs are stopped by the next aerosynth command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from aerosynth.flows.server_cleanup import (
    EPHEMERAL_MARK,
    OWNER_PID,
    OWNER_START,
    orphan_workers,
    stop_orphan_servers,
    stop_orphans,
)

REPO = Path(__file__).resolve().parents[1]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
#: what a process-pool or Dask worker's command line looks like (multiprocessing's spawn start method)
WORKER = [sys.executable, "-c", "from multiprocessing.spawn import spawn_main; import time; time.sleep(120)"]


def _spawn(extra_env: dict, cmd: list[str] = SLEEPER) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (OWNER_PID, OWNER_START, EPHEMERAL_MARK)}
    return subprocess.Popen(cmd, env={**env, **extra_env})


def test_only_servers_of_dead_aerosynth_processes_are_stopped():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_start = repr(psutil.Process(gone.pid).create_time())
    gone.wait()
    me = repr(psutil.Process().create_time())
    orphan = _spawn({EPHEMERAL_MARK: "1", OWNER_PID: str(gone.pid), OWNER_START: gone_start})
    owned = _spawn({EPHEMERAL_MARK: "1", OWNER_PID: str(os.getpid()), OWNER_START: me})
    unmarked = _spawn({EPHEMERAL_MARK: "1"})  # e.g. started by another program: never touched
    not_a_server = _spawn({OWNER_PID: str(gone.pid), OWNER_START: gone_start})
    procs = [orphan, owned, unmarked, not_a_server]
    try:
        time.sleep(0.3)  # environments are readable once the interpreters run
        # (machine-wide: another killed run's orphan servers, e.g. of a test on the other xdist worker, go too)
        stopped = stop_orphan_servers()
        assert orphan.pid in stopped and not {owned.pid, unmarked.pid, not_a_server.pid} & set(stopped)
        assert orphan.wait(timeout=10) is not None
        assert all(p.poll() is None for p in (owned, unmarked, not_a_server))
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_only_workers_of_dead_aerosynth_processes_are_stopped():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_start = repr(psutil.Process(gone.pid).create_time())
    gone.wait()
    me = repr(psutil.Process().create_time())
    dead_mark = {OWNER_PID: str(gone.pid), OWNER_START: gone_start}
    orphan = _spawn(dead_mark, WORKER)
    server = _spawn({EPHEMERAL_MARK: "1", **dead_mark})
    owned = _spawn({OWNER_PID: str(os.getpid()), OWNER_START: me}, WORKER)
    unmarked = _spawn({}, WORKER)  # another program's pool: never touched
    not_a_worker = _spawn(dead_mark)  # e.g. a tool a run started: not ours to stop
    procs = [orphan, server, owned, unmarked, not_a_worker]
    try:
        time.sleep(0.3)
        # (machine-wide: another killed run's orphans may be listed and stopped too)
        found = [p.pid for p in orphan_workers()]
        assert orphan.pid in found and not {server.pid, owned.pid, unmarked.pid, not_a_worker.pid} & set(found)
        stopped = stop_orphans()
        assert {orphan.pid, server.pid} <= set(stopped)
        assert not {owned.pid, unmarked.pid, not_a_worker.pid} & set(stopped)
        assert orphan.wait(timeout=10) is not None and server.wait(timeout=10) is not None
        assert all(p.poll() is None for p in (owned, unmarked, not_a_worker))
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _temporary_server(parent: psutil.Process) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_killed_run_leaves_a_server_that_the_next_command_stops(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", OWNER_PID, OWNER_START)}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "aerosynth.flows.cli", "demo", "--quick", "--work-dir", str(tmp_path / "run")]
    run = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(run.pid)
    server = None
    end = time.monotonic() + 240
    while server is None and time.monotonic() < end and run.poll() is None:
        server = _temporary_server(parent)
        time.sleep(0.2)
    try:
        assert server is not None, "the run started no temporary Prefect server"
        run.send_signal(signal.SIGKILL)
        run.wait()
        # the orphan this fixes, checked at once: any aerosynth command that starts now stops it (with -n 2, one of
        # the other xdist worker's commands may be the one)
        assert server.is_running()
        out = subprocess.run(
            [sys.executable, "-m", "aerosynth.flows.cli", "--help"], env=env, cwd=REPO, capture_output=True
        )
        assert out.returncode == 0
        psutil.wait_procs([server], timeout=10)
        assert not server.is_running()
    finally:
        if run.poll() is None:
            run.kill()
        if server is not None and server.is_running():
            server.kill()
