"""Scale-out: synthesis shards as Prefect tasks, mapped over the flow's task runner.

With the default runner the shards run one after another in this process. With
``runner: dask`` they run on a Dask cluster through prefect-dask: a ``LocalCluster`` of
``dask_workers`` single-threaded worker processes by default, or an existing scheduler at
``dask_address`` (``tcp://host:8786``) whose workers see the same work folder (a shared
filesystem) and have aerosynth installed. Every shard writes its own files and manifest
atomically, so shards can finish in any order, on any worker, and give the same bytes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

_API_SERVER: list = []


@contextlib.contextmanager
def shared_api(kind: str, address: str | None = None):
    """Make local Dask workers report to one Prefect API server, the flow's.

    Without ``PREFECT_API_URL``, every process that runs a task starts its own temporary Prefect server on
    the same SQLite file: each Dask worker would run one (CPU, "database is locked"). For a local cluster
    this starts one server for the whole run (unless one is configured) and hands its URL to the workers
    through the environment they inherit.
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
    if not _API_SERVER:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=120)
        _API_SERVER.append(server)
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
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=workers if kind == "processes" else 1)


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
