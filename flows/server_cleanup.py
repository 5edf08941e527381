"""Stop temporary Prefect servers left behind by aerosynth runs that were killed.

Without a ``PREFECT_API_URL``, Prefect starts a temporary server (uvicorn) as a child process and stops
it when the flow's process exits. A SIGKILL skips that, so the server runs on as an orphan. Each
aerosynth command marks its environment with its own pid and start time (inherited by the server it
starts), and on start stops every temporary server whose marking aerosynth process is gone. Servers
started any other way (``prefect server start``, other programs) carry no mark and are never touched.
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


def orphan_servers() -> list[psutil.Process]:
    """Temporary Prefect servers marked by an aerosynth process that no longer runs."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get(EPHEMERAL_MARK) != "1" or OWNER_PID not in env:
            continue
        try:
            owner = int(env[OWNER_PID])
        except ValueError:
            continue
        if owner != proc.pid and not _owner_alive(owner, env.get(OWNER_START, "")):
            found.append(proc)
    return found


def stop_orphan_servers(timeout: float = 5.0) -> list[int]:
    """Terminate (then kill) orphaned temporary servers; returns their pids."""
    orphans = orphan_servers()
    for proc in orphans:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(orphans, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    pids = [p.pid for p in orphans]
    if pids:
        log.info("stopped %d temporary Prefect server(s) left by killed runs: %s", len(pids), pids)
    return pids
