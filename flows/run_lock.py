"""One run per work folder: an exclusive lock on ``WORK/.run.lock`` while a run writes there.

The lock is an ``fcntl.flock`` on that file. The kernel releases it when the holding process ends, however
it ends (SIGKILL included), so the folder of a dead run is taken over by the next run with no cleanup.
While held, the file names the holder (pid, command line, start time) for the message that refuses a
second run. The lock is re-entrant within one thread (the CLI takes it before ``--fresh`` clears the
folder, and :func:`aerosynth.flows.adapt.run_adapt` takes it again); another thread or process is
refused, or waits. Where ``fcntl`` is missing (Windows) runs are not locked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from aerosynth.data.errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: not ``.lock``: a model registry already flocks ``REGISTRY/.lock`` around each update of its files
LOCK_NAME = ".run.lock"
log = logging.getLogger("aerosynth.flows")
#: folder -> [thread ident, depth] of the locks this process holds
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


def command_line() -> str:
    """This process's command line as a user typed it (``aerosynth ...`` for the CLI)."""
    argv = list(sys.argv) or ["python"]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if Path(argv[0]).name == "aerosynth" or getattr(spec, "name", None) == "aerosynth.flows.cli":
        argv[0] = "aerosynth"
    text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def read_holder(folder: str | Path, name: str = LOCK_NAME) -> dict | None:
    """The holder a lock file names (``pid``, ``command``, ``started``), or None when it names none."""
    try:
        doc = json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "pid" in doc else None


def _describe(folder: Path, name: str = LOCK_NAME) -> str:
    holder = None
    for _ in range(20):  # the holder writes its name right after it takes the lock (over a dead run's)
        holder = read_holder(folder, name)
        if holder is not None and _alive(holder["pid"]):
            break
        holder = None
        time.sleep(0.05)
    if holder is None:
        return "another run"
    return f"the run of pid {holder['pid']} ({holder.get('command', '?')}, started {holder.get('started', '?')})"


def _alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
    except (ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _write_holder(fd: int, command: str | None) -> None:
    doc = {
        "pid": os.getpid(),
        "command": command or command_line(),
        "started": dt.datetime.now().isoformat(sep=" ", timespec="seconds"),
    }
    data = (json.dumps(doc) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


@contextlib.contextmanager
def work_lock(
    folder: str | Path,
    wait: bool = False,
    command: str | None = None,
    create: bool = True,
    name: str = LOCK_NAME,
    busy: str = "in use by {holder}; wait for it to end, or rerun with --wait to queue behind it",
    reentrant: bool = True,
) -> Iterator[Path]:
    """Hold the run lock of ``folder`` for the block; yields the lock file's path.

    Args:
        folder: the work folder (or registry) a run writes to.
        wait: wait for a running holder to finish instead of refusing.
        command: how to name this run to others (default: this process's command line).
        create: make a missing ``folder``; without, a missing folder is not locked (whoever needs it
            reports it missing).
        name: the lock file in ``folder`` (another name is another lock: ``aerosynth flag`` uses its own).
        busy: the refusal, with ``{holder}`` naming the holder.
        reentrant: a thread that holds the lock may take it again (a flow inside a command that holds it).

    Raises:
        InputError: another run holds the folder and ``wait`` is false (one line naming that run).
    """
    folder = Path(folder).absolute()
    key = f"{folder.resolve()}/{name}"
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        again = reentrant and held is not None and held[0] == me
        if again:
            held[1] += 1
    if again:
        try:
            yield folder / name
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if fcntl is None or not folder.is_dir():  # Windows; or a missing folder not to be made
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(folder, name)
            if not wait:
                raise InputError(folder, busy.format(holder=holder)) from None
            print(f"{folder}: waiting for {holder} to end", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _write_holder(fd, command)
        with _HELD_GUARD:
            _HELD[key] = [me, 1]
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
    finally:
        os.close(fd)  # releases the lock


def clear_work_folder(folder: str | Path) -> None:
    """Delete everything in ``folder`` but its lock file (``--fresh`` under the lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
