"""Ctrl-C stops a run in order, workers die with their run, and one run holds a work folder at a time."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from aerosynth.data.errors import InputError
from aerosynth.flows.run_lock import LOCK_NAME, clear_work_folder, read_holder, work_lock
from aerosynth.flows.server_cleanup import EPHEMERAL_MARK, OWNER_PID, OWNER_START, run_processes
from tests.conftest import TINY_ADAPT

REPO = Path(__file__).resolve().parents[1]

#: tiles, then straight to the source-only detector, which trains long enough to be interrupted
LONG_DETECTOR = copy.deepcopy(TINY_ADAPT)
LONG_DETECTOR["generation"]["enabled"] = False
LONG_DETECTOR["detection"].update({"epochs": 40, "patience": 100, "oracle": False})


def _env(tmp_path: Path, api_url: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", OWNER_PID, OWNER_START)}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _adapt(config: Path, work: Path, env: dict, *extra: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "aerosynth.flows.cli", "adapt", "--config", str(config), "--work-dir", str(work)]
    return subprocess.Popen([*cmd, *extra], env=env, cwd=REPO, **popen)


def _workers(owner: int) -> list[psutil.Process]:
    """The run's processes other than its temporary Prefect server (the next command stops that one)."""
    out = []
    for proc in run_processes(owner):
        try:
            if proc.environ().get(EPHEMERAL_MARK) != "1":
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _wait_for_detector(run: subprocess.Popen, work: Path, timeout: float = 240) -> None:
    """Until the source-only detector has trained for a moment in a worker process of ``run``."""
    seed = work / "detectors" / "source-only" / "seed0"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if run.poll() is not None:
            pytest.fail(f"run ended (status {run.returncode}) before its detector trained")
        if seed.is_dir() and any("spawn_main" in " ".join(p.cmdline()) for p in _workers(run.pid) if p.is_running()):
            time.sleep(2)
            return
        time.sleep(0.2)
    pytest.fail("the detector did not start in time")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _still_running(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """Those of ``procs`` still running after up to ``seconds`` seconds."""
    end = time.monotonic() + seconds
    left = [p for p in procs if _alive(p)]
    while left and time.monotonic() < end:
        time.sleep(0.2)
        left = [p for p in left if _alive(p)]
    return left


def _kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except (psutil.Error, OSError):
            pass


# ------------------------------------------------------------------------ Ctrl-C
@pytest.mark.slow
def test_ctrl_c_stops_the_run_with_130_and_leaves_no_process(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(LONG_DETECTOR))
    work = tmp_path / "run"
    # its own process group, as a terminal runs a command; no PREFECT_API_URL: a temporary server, as for a user
    run = _adapt(config, work, _env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_detector(run, work)
        marked = run_processes(run.pid)
        servers = [p for p in marked if p.environ().get(EPHEMERAL_MARK) == "1"]
        assert servers and all(os.getsid(s.pid) == s.pid for s in servers)  # out of the terminal's group
        sent = time.monotonic()
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        _, err = run.communicate(timeout=15)
        assert run.returncode == 130, err.decode()[-2000:]
        assert time.monotonic() - sent < 15
        text = err.decode()
        assert "Traceback" not in text
        assert [line for line in text.splitlines() if line.startswith("interrupted: ")]
        assert _still_running(marked, 3) == []  # workers, resource tracker and the server: stopped on the way out
        assert run_processes(run.pid) == []
        assert (work / "tiles" / "stage_done.json").is_file()  # finished stages are kept for a rerun
        assert not (work / "detectors" / "source-only" / "seed0" / "stage_done.json").exists()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
        _kill_all(run_processes(run.pid))


def test_second_ctrl_c_exits_at_once():
    script = (
        "import time, sys\n"
        "from aerosynth.flows.cli import _catch_interrupts\n"
        "_catch_interrupts()\n"
        "try:\n"
        "    print('ready', flush=True); time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopping', flush=True); time.sleep(60)\n"  # a slow orderly stop
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "stopping"  # the first one: KeyboardInterrupt, handled
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 130
        assert time.monotonic() - sent < 5
        assert proc.stderr.read().strip() == "interrupted again: exiting now (finished stages are kept)"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------ workers die with their run
def test_pool_worker_ignores_ctrl_c_and_dies_with_its_parent(tmp_path):
    script = (
        "import os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import multiprocessing as mp\n"
        "from aerosynth.flows.scale import guard_worker\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'), initializer=guard_worker,\n"
        "                               initargs=(os.getpid(),))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    time.sleep(60)\n"
    )
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], cwd=REPO, stdout=subprocess.PIPE)
    worker = None
    try:
        worker = psutil.Process(int(parent.stdout.readline()))
        worker.send_signal(signal.SIGINT)  # a terminal's Ctrl-C: ignored, the run stops it in order
        time.sleep(0.5)
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        psutil.wait_procs([worker], timeout=5)
        assert not worker.is_running()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if worker is not None:
            _kill_all([worker])


def test_parent_watch_ends_an_orphan_where_prctl_is_missing():
    # the fallback of guard_worker: a thread polling the parent pid (here the only guard of the grandchild)
    child_code = (
        "import os; parent = os.getppid()\n"
        "from aerosynth.flows.scale import _watch_parent\n"
        "print('watching', flush=True); _watch_parent(parent, 0.1)\n"
    )
    script = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert parent.stdout.readline().strip() == "watching"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        psutil.wait_procs([child], timeout=5)
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None:
            _kill_all([child])


def _worker_guards() -> tuple[bool, int | None, int]:
    """In a worker: (Ctrl-C ignored, parent-death signal, parent pid).

    The parent-death signal is a setting of the thread that armed it (the worker's main thread, which lives
    as long as the worker); it is None here when the task runs on another thread (Dask's executor threads).
    """
    import ctypes

    sig = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    on_main = threading.current_thread() is threading.main_thread()
    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN, sig.value if on_main else None, os.getppid()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.parametrize("kind", ["sequential", "dask"])
def test_runner_workers_are_guarded(prefect_harness, kind):
    from prefect import flow, task

    from aerosynth.flows.scale import task_runner

    probe = task(_worker_guards)

    @flow(task_runner=task_runner(kind, workers=1))
    def guarded() -> tuple[bool, int | None, int]:
        return probe.submit().result()

    ignored, death_signal, parent = guarded()
    assert ignored  # set by guard_worker in the worker's main thread (Dask: through the preload)
    assert death_signal == (signal.SIGKILL if kind == "sequential" else None)
    assert parent == os.getpid()


# ------------------------------------------------------------------------ one run per work folder
def test_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    work = tmp_path / "run"
    with work_lock(work, command="aerosynth adapt --preset smoke"):
        holder = read_holder(work)
        assert holder["pid"] == os.getpid() and holder["command"] == "aerosynth adapt --preset smoke"
        with work_lock(work):  # the same thread again (the CLI, then run_adapt): no conflict
            pass
        refused: list[BaseException] = []

        def second() -> None:
            try:
                with work_lock(work):
                    pass
            except InputError as exc:
                refused.append(exc)

        t = threading.Thread(target=second)
        t.start()
        t.join()
        assert len(refused) == 1
        message = str(refused[0])
        assert "\n" not in message and str(os.getpid()) in message
        assert "aerosynth adapt --preset smoke" in message and holder["started"] in message
    with work_lock(work):  # released: free again
        pass


def test_lock_waits_for_the_holder_when_asked(tmp_path):
    work = tmp_path / "run"
    order: list[str] = []
    held = threading.Event()

    def first() -> None:
        with work_lock(work):
            held.set()
            time.sleep(1.0)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait(10)
    with work_lock(work, wait=True):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]


def test_lock_of_a_killed_run_is_taken_over_and_fresh_keeps_it(tmp_path):
    work = tmp_path / "run"
    script = (
        "import sys, time\n"
        "from aerosynth.flows.run_lock import work_lock\n"
        "with work_lock(sys.argv[1]):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(work)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"pid {holder.pid}"):
            with work_lock(work):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        (work / "tiles").mkdir()
        (work / "config.yaml").write_text("x")
        with work_lock(work):  # the kernel released the dead run's lock
            assert read_holder(work)["pid"] == os.getpid()
            clear_work_folder(work)
            assert [p.name for p in work.iterdir()] == [LOCK_NAME]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_retrain_refuses_a_registry_in_use_and_never_makes_one(tmp_path):
    from aerosynth.flows.retrain import run_retrain

    with work_lock(tmp_path / "missing", create=False):  # nothing to lock, nothing made
        pass
    assert not (tmp_path / "missing").exists()
    registry = tmp_path / "registry"
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with work_lock(registry, command="aerosynth retrain --registry registry"):
            held.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        held.wait(10)
        with pytest.raises(InputError, match="aerosynth retrain --registry registry"):
            run_retrain(registry, tmp_path / "watch", dict(TINY_ADAPT))
    finally:
        done.set()
        t.join()


@pytest.mark.slow
def test_second_run_on_a_folder_is_refused_and_a_killed_run_leaves_no_worker(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(LONG_DETECTOR))
    work = tmp_path / "run"
    env = _env(tmp_path, str(PREFECT_API_URL.value()))
    first = _adapt(config, work, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_detector(first, work)
        second = _adapt(config, work, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err[-2000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and f"pid {first.pid}" in lines[0], err
        assert first.poll() is None  # the first run goes on

        first.send_signal(signal.SIGKILL)  # while its detector trains in a worker
        first.wait()
        assert _still_running(_workers(first.pid), 5) == []

        third = _adapt(config, work, env, "--until", "tiles", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = third.communicate(timeout=180)
        assert third.returncode == 0, err.decode()[-2000:]  # the dead run's folder is taken over
        assert read_holder(work)["pid"] == third.pid
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        _kill_all(run_processes(first.pid))
