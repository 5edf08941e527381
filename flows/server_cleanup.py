"""Stop temporary Prefect servers and worker processes left behind by aerosynth runs that were killed.

Without a ``PREFECT_API_URL``, Prefect starts a temporary server (uvicorn) as a child process and stops
it when the flow's process exits. A SIGKILL skips that, so the server runs on as an orphan. Each
aerosynth command marks its environment with its own pid and start time (inherited by the server and the
worker processes it starts), and on start stops every temporary server and every multiprocessing child
(process-pool and Dask workers, the resource tracker) whose marking aerosynth process is gone. Workers end
with their run on their own (:func:`aerosynth.flows.scale.guard_worker`); this catches those that could
not (no ``prctl``, a worker stuck in a system call). Servers and processes started any other way
(``prefect server start``, other programs) carry no mark and are never touched.
"""

from __future__ import annotations

import logging
import os

import psutil

OWNER_PID = "AEROSYNTH_OWNER_PID"
OWNER_START = "AEROSYNTH_OWNER_START"
EPHEMERAL_MARK = "PREFECT__SERVER_EPHEMERAL"
log = logging.getLogger("aerosynth.flows")


def mark_owner() -> None:
    """Mark this process's environment as the owner of any temporary server it starts."""
    os.environ[OWNER_PID] = str(os.getpid())
    os.environ[OWNER_START] = repr(psutil.Process().create_time())


def _owner_alive(pid: int, start: str) -> bool:
    try:
        return repr(psutil.Process(pid).create_time()) == start
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _marked_orphan(proc: psutil.Process) -> dict[str, str] | None:
    """The environment of ``proc`` if an aerosynth process that no longer runs marked it, else None."""
    try:
        env = proc.environ()
    except (psutil.Error, OSError):
        return None
    if OWNER_PID not in env:
        return None
    try:
        owner = int(env[OWNER_PID])
    except ValueError:
        return None
    if owner == proc.pid or _owner_alive(owner, env.get(OWNER_START, "")):
        return None
    return env


def _is_worker(proc: psutil.Process) -> bool:
    """A multiprocessing child: a process-pool or Dask worker (spawn), or multiprocessing's resource tracker."""
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False
    return "from multiprocessing." in cmdline and ("spawn_main" in cmdline or "resource_tracker" in cmdline)


def orphan_servers() -> list[psutil.Process]:
    """Temporary Prefect servers marked by an aerosynth process that no longer runs."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        env = _marked_orphan(proc)
        if env is not None and env.get(EPHEMERAL_MARK) == "1":
            found.append(proc)
    return found


def orphan_workers() -> list[psutil.Process]:
    """Worker processes (multiprocessing children) marked by an aerosynth process that no longer runs."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        env = _marked_orphan(proc)
        if env is not None and env.get(EPHEMERAL_MARK) != "1" and _is_worker(proc):
            found.append(proc)
    return found


def run_processes(owner: int) -> list[psutil.Process]:
    """Every process that carries the mark of the aerosynth process ``owner`` (its server, workers ...)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == owner:
            continue
        try:
            if proc.environ().get(OWNER_PID) == str(owner):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _stop(procs: list[psutil.Process], timeout: float) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def stop_orphan_servers(timeout: float = 5.0) -> list[int]:
    """Terminate (then kill) orphaned temporary servers; returns their pids."""
    orphans = orphan_servers()
    _stop(orphans, timeout)
    pids = [p.pid for p in orphans]
    if pids:
        log.info("stopped %d temporary Prefect server(s) left by killed runs: %s", len(pids), pids)
    return pids


def stop_orphans(timeout: float = 5.0) -> list[int]:
    """Terminate (then kill) the orphaned workers, then the orphaned temporary servers; returns their pids."""
    workers = orphan_workers()
    _stop(workers, timeout)
    if workers:
        log.info("stopped %d worker process(es) left by killed runs: %s", len(workers), [p.pid for p in workers])
    return [p.pid for p in workers] + stop_orphan_servers(timeout)
