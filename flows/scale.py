"""Scale-out: synthesis shards as Prefect tasks, mapped over the flow's task runner.

With the default runner the shards run one after another in this process. With
``runner: dask`` they run on a Dask cluster through prefect-dask: a ``LocalCluster`` of
``dask_workers`` single-threaded worker processes by default, or an existing scheduler at
``dask_address`` (``tcp://host:8786``) whose workers see the same work folder (a shared
filesystem) and have aerosynth installed. Every shard writes its own files and manifest
atomically, so shards can finish in any order, on any worker, and give the same bytes.

Workers and the temporary Prefect server follow their run: every worker process (process pool or local
Dask worker) ignores the terminal's Ctrl-C and dies with the process that started it
(:func:`guard_worker`); the temporary server runs in its own session, out of the terminal's reach, so that
a Ctrl-C lets the flow record its end, stop its workers (:class:`WorkerPoolTaskRunner`) and then the
server, in that order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ProcessPoolTaskRunner

_API_SERVER: list = []
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
log = logging.getLogger("aerosynth.flows")


# ------------------------------------------------------------------------ workers
def _parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent ends; False where ``prctl`` is missing."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, every: float = 0.5) -> None:
    """End this process once it is no longer ``parent``'s child (the parent died: init adopted it)."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def guard_worker(parent: int | None = None) -> None:
    """Initializer of a worker process: deaf to the terminal's Ctrl-C, and dead when its parent dies.

    A Ctrl-C in a terminal signals the whole process group; the worker ignores it and is stopped by the
    run that started it, after the run has recorded its end. When that run dies without stopping it
    (SIGKILL, a crash), the worker ends too: Linux's parent-death signal where ``prctl`` exists, else a
    thread that polls the parent pid. The kernel sends that signal when the *thread* that started the
    worker ends; the process pool starts its workers from Prefect's resolver threads and Dask from a watch
    thread per worker, both of which live as long as the workers.

    Args:
        parent: pid of the process that started this one (default: the current parent).
    """
    parent = os.getppid() if parent is None else parent
    with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent,), name="aerosynth-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def dask_setup(worker: Any) -> None:
    """Dask preload hook (this module is a preload of local Dask workers): :func:`guard_worker`."""
    guard_worker()


def stop_processes(pids: list[int], grace: float = 3.0) -> list[int]:
    """Terminate the processes ``pids`` and their children, kill those alive after ``grace`` seconds.

    Returns:
        The pids that were still running and were signalled.
    """
    import psutil

    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs += [*proc.children(recursive=True), proc]
        except psutil.Error:
            continue
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)
    return [p.pid for p in procs]


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker, if not yet running, without its "leaked semaphore" warning.

    A worker stopped by a signal leaves its semaphores to the tracker, which removes them and says so on
    stderr when the run ends: after a Ctrl-C or a kill that is expected, not a fault to report. The
    tracker takes its warning filters from this process's ``-W`` options when it starts.
    """
    from multiprocessing import resource_tracker

    rule = "ignore::UserWarning:multiprocessing.resource_tracker"
    sys.warnoptions.append(rule)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(rule)


class WorkerPoolTaskRunner(ProcessPoolTaskRunner):
    """Prefect's process pool, whose workers run :func:`guard_worker` and are stopped when a run is interrupted.

    Prefect's pool waits for running tasks when its flow ends; after a Ctrl-C (``KeyboardInterrupt``) or
    any other exit that is not an ``Exception`` this runner terminates its workers first, so that the run
    ends at once. After an ordinary failure the other running tasks still finish (their stages are kept).
    """

    def __init__(self, max_workers: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("initializer", guard_worker)
        kwargs.setdefault("initargs", (os.getpid(),))
        super().__init__(max_workers=max_workers, **kwargs)

    def worker_pids(self) -> list[int]:
        """Pids of the pool's live worker processes."""
        processes = getattr(self._executor, "_processes", None) or {}
        return [p.pid for p in list(processes.values()) if p.pid is not None and p.is_alive()]

    def __enter__(self) -> WorkerPoolTaskRunner:
        _quiet_resource_tracker()
        return super().__enter__()

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception) and self._executor is not None:
            stopped = stop_processes(self.worker_pids())
            if stopped:
                log.info("stopped %d worker process(es) of the interrupted run", len(stopped))
        super().__exit__(exc_type, exc_value, traceback)


# ------------------------------------------------------------------------ the temporary Prefect server
class _OwnSession:
    """``subprocess`` as Prefect's server module sees it, whose ``Popen`` starts a new session."""

    def __getattr__(self, name: str) -> Any:
        if name == "Popen":
            return partial(subprocess.Popen, start_new_session=True)
        return getattr(subprocess, name)


def _in_own_session(start_command):
    """Run Prefect's uvicorn start command with its ``Popen`` in a new session (out of the terminal's group)."""
    import prefect.server.api.server as prefect_server

    real = prefect_server.subprocess
    prefect_server.subprocess = _OwnSession()
    try:
        return start_command()
    finally:
        prefect_server.subprocess = real


def _start_server():
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if not server.running:
        server._run_uvicorn_command = partial(_in_own_session, server._run_uvicorn_command)
    server.start(timeout=120)
    proc = server.server_process
    if proc is not None and os.name == "posix" and os.getpgid(proc.pid) == os.getpgrp():
        log.warning("the temporary Prefect server shares this terminal's process group: a Ctrl-C stops it first")
    return server


def kill_api_server() -> None:
    """SIGKILL the temporary Prefect server of this process, if any (a second Ctrl-C: no time to stop it)."""
    for server in _API_SERVER:
        proc = getattr(server, "server_process", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()


@contextlib.contextmanager
def shared_api(kind: str, address: str | None = None):
    """Make local Dask workers report to one Prefect API server, the flow's.

    Without ``PREFECT_API_URL``, every process that runs a task starts its own temporary Prefect server on
    the same SQLite file: each Dask worker would run one (CPU, "database is locked"). For a local cluster
    this starts one server for the whole run (unless one is configured) and hands its URL to the workers
    through the environment they inherit. The server runs in its own session: a Ctrl-C in the terminal
    reaches the flow and its workers but not the server, which the flow needs to record how it ended.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if (
        kind not in ("dask", "processes", "sequential")
        or address
        or PREFECT_API_URL.value()
        or os.environ.get("PREFECT_API_URL")
    ):
        yield
        return
    if not _API_SERVER or _API_SERVER[0].server_process is None:
        _API_SERVER[:] = [_start_server()]
    url = _API_SERVER[0].api_url
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def task_runner(kind: str, address: str | None = None, workers: int = 2):
    """The Prefect task runner of a run's submitted tasks (detectors, synthesis shards).

    ``sequential``: one at a time in one worker process; ``processes``: ``workers`` worker processes;
    ``dask``: a Dask ``LocalCluster`` of ``workers`` one-thread workers, or the scheduler at ``address``.
    Submitted tasks never run in the flow's own process: a detector trained there did not repeat run to
    run on real tiles (its training shares the process with the flow's Prefect threads), while one trained
    in a worker process repeats to the digit, so every runner gives the same bytes.
    """
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        import dask

        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers: glibc then returns memory to the
        # system on nearly every free, and torch's CPU training ran 2.5x slower per detector there
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": str(2**30)})
        # preload: every worker runs this module's dask_setup (guard_worker: no Ctrl-C, dies with the run)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "preload": [__name__],
            }
        )
    return WorkerPoolTaskRunner(max_workers=workers if kind == "processes" else 1)


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def generation_shard(
    kind: str, model: str, out_dir: str, shard: int, args: dict, config: dict, torch_threads: int
) -> int:
    """Produce one shard of a synthetic set (``kind`` = ``set``) or of a translation (``translation``)."""
    import torch

    from aerosynth.generation.sampling import SamplingConfig, TranslationConfig, generate_set, translate_split

    torch.set_num_threads(torch_threads)
    if kind == "translation":
        translate_split(
            model,
            args["source_split"],
            out_dir,
            args["domain"],
            base_seed=args["base_seed"],
            config=TranslationConfig(**config),
            shards=[shard],
        )
    else:
        generate_set(
            model,
            out_dir,
            args["set_name"],
            args["domain"],
            args["count"],
            base_seed=args["base_seed"],
            config=SamplingConfig(**config),
            shards=[shard],
        )
    return shard


def map_shards(kind: str, model: Path, out_dir: Path, n_shards: int, args: dict, config, torch_threads: int) -> None:
    """Submit every shard to the current flow's task runner and wait for all of them."""
    cfg = asdict(config)
    futures = generation_shard.map(
        unmapped(kind),
        unmapped(str(model)),
        unmapped(str(out_dir)),
        list(range(n_shards)),
        unmapped(args),
        unmapped(cfg),
        unmapped(torch_threads),
    )
    wait(futures)
    for f in futures:
        f.result()  # re-raise the first failure
