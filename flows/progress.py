"""Terminal output a person follows: one line per stage; third-party output in ``WORK/logs/<stage>.log``.

Two sides, joined by one file of events, ``WORK/logs/progress.jsonl`` (one JSON object a line):

* **Stages** (in the flow's process or in a worker process: the process-pool, Dask and sequential runners
  all train detectors in workers) run inside :func:`stage`. It appends the stage's start, its progress
  (:func:`advance`: epoch or step, and a figure such as the loss) and its end (its headline figure, e.g.
  ``AP50 0.336``, and its time) to the events file, and sends what the process writes to stdout and stderr
  meanwhile to ``WORK/logs/<stage>.log``: ultralytics' model summary, argument dump and progress bars,
  Prefect's task-run logs, pycocotools' prints, library warnings. The redirection is at the level of file
  descriptors 1 and 2, so output of C code and of logging handlers bound to ``sys.stdout`` at import goes
  there too. A process runs one stage at a time (the runners are configured so).
* **The command** (``demo``, ``adapt``, ``retrain``, ``request``, ``detect``) runs its flow inside
  :func:`terminal_output`. Its own third-party output (Prefect's flow-run logs, its temporary server's
  notices) goes to ``WORK/logs/flow.log``; a thread reads the events file and draws the stages: rich
  progress bars updated in place in a terminal, finished stages printed above them; when the output is a
  file or a pipe, one end line per stage, and one start line for a stage still running after
  :data:`START_LINE_AFTER` seconds (no bar redraws). Warnings that aerosynth's own code logs (its
  ``aerosynth.*`` loggers, or Prefect's run logger called from aerosynth) reach the terminal as one
  ``warning:`` line each.

Worker processes find the log folder in the environment they inherit (:data:`LOG_DIR_ENV`); where it is
not set (a stage function called from Python, a remote Dask worker) :func:`stage` reports and redirects
nothing. With ``verbose`` nothing is redirected: third-party output shows on the terminal as it used to,
between plain stage lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

#: The log folder of the current command; set by :func:`terminal_output`, inherited by worker processes.
LOG_DIR_ENV = "AEROSYNTH_LOG_DIR"
#: ``1`` while a command runs with ``--verbose``: stages leave stdout and stderr alone.
VERBOSE_ENV = "AEROSYNTH_VERBOSE"
EVENTS_FILE = "progress.jsonl"
FLOW_LOG = "flow.log"
#: Seconds after which a stage still running gets its start line when the output is not a terminal.
START_LINE_AFTER = 30.0
#: Least seconds between two progress events of a stage (the last step is always sent).
ADVANCE_EVERY = 0.5
#: Width the stage names are padded to in the plain lines.
NAME_WIDTH = 44

#: aerosynth's stage folders: a warning logged from a file in them (through Prefect's run logger too) is the user's.
_PACKAGE_DIRS = tuple(
    str(Path(__file__).resolve().parents[1] / d) + os.sep
    for d in ("data", "generation", "annotation", "detection", "flows")
)


def log_name(stage_name: str) -> str:
    """The log file name of a stage: ``detectors/source-only/seed0`` -> ``detectors-source-only-seed0.log``."""
    return re.sub(r"[^A-Za-z0-9._+@-]+", "-", stage_name).strip("-") + ".log"


def log_dir() -> Path | None:
    """The log folder of the command this process works for, if any."""
    folder = os.environ.get(LOG_DIR_ENV)
    return Path(folder) if folder else None


def _verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


# ------------------------------------------------------------------------ producer side
@dataclass
class StageRun:
    """One running stage of this process: the stage sets ``headline`` (and ``cached`` when it was skipped)."""

    name: str
    log: Path | None
    started: float = field(default_factory=time.monotonic)
    headline: str | None = None
    cached: bool = False
    last_advance: float = 0.0


_CURRENT: contextvars.ContextVar[StageRun | None] = contextvars.ContextVar("aerosynth_stage", default=None)


def current_stage() -> StageRun | None:
    """The stage this thread is running, if any."""
    return _CURRENT.get()


def _emit(kind: str, name: str | None, **fields) -> None:
    """Append one event to the events file (one ``write`` of one line with ``O_APPEND``: whole lines only)."""
    folder = log_dir()
    if folder is None:
        return
    doc = {"event": kind, "stage": name, "t": time.time(), "pid": os.getpid(), **fields}
    line = (json.dumps(doc, default=str) + "\n").encode()
    try:
        fd = os.open(folder / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:  # the terminal line is a convenience, never a failure
        pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def _redirected(target_fd: int) -> Iterator[None]:
    """Point file descriptors 1 and 2 at ``target_fd`` while the block runs (no-op where they are closed)."""
    _flush_std()
    saved: list[tuple[int, int]] = []
    try:
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
    except OSError:
        for _, copy in saved:
            os.close(copy)
        saved = []
    for fd, _ in saved:
        os.dup2(target_fd, fd)
    try:
        yield
    finally:
        _flush_std()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


class _WarningForwarder(logging.Handler):
    """Sends the warnings aerosynth's own code logs to the events file (the command prints them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if not is_aerosynth_record(record):
            return
        try:
            message = record.getMessage().strip().splitlines()[0]
        except Exception:  # a record whose arguments do not format: logging reports it elsewhere
            return
        stage_run = current_stage()
        _emit("warning", stage_run.name if stage_run else None, message=message)


_FORWARDER = _WarningForwarder()


def is_aerosynth_record(record: logging.LogRecord) -> bool:
    """A warning (or worse) logged by aerosynth: on an ``aerosynth`` logger, or from aerosynth's own files."""
    if record.levelno < logging.WARNING:
        return False
    name = record.name or ""
    return name == "aerosynth" or name.startswith("aerosynth.") or (record.pathname or "").startswith(_PACKAGE_DIRS)


def _forward_warnings(on: bool) -> None:
    root = logging.getLogger()
    if on and _FORWARDER not in root.handlers:
        root.addHandler(_FORWARDER)
    elif not on and _FORWARDER in root.handlers:
        root.removeHandler(_FORWARDER)


@contextlib.contextmanager
def _stage_log(path: Path | None, name: str) -> Iterator[TextIO | None]:
    """The stage's log file, with stdout and stderr sent to it while the block runs (unless verbose)."""
    if path is None or _verbose():
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", errors="replace", buffering=1) as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"\n===== {stamp}  {name}  (pid {os.getpid()}) =====\n")
        log.flush()
        _forward_warnings(True)  # in a worker process: its warnings reach the command too
        with _redirected(log.fileno()):
            yield log


@contextlib.contextmanager
def stage(name: str, total: int | None = None, unit: str = "step", redirect: bool = True) -> Iterator[StageRun]:
    """Run one stage: report its start and end, and send third-party output to its log file.

    Re-entering the stage this thread is already running (a step wrapped once more inside) yields the
    same :class:`StageRun` and reports nothing twice.

    Args:
        name: the stage name (``detectors/source-only/seed0``); its log is ``WORK/logs/<name with ->.log``.
        total: the number of epochs or steps when known (the bar's length).
        unit: what :func:`advance` counts (``epoch``, ``step``).
        redirect: send stdout and stderr to the stage's log. Off for a step that submits work to worker
            processes: a worker started meanwhile would keep this stage's log as its stdout.

    Yields:
        The running stage: set its ``headline`` (shown on its end line) before the block ends.
    """
    running = current_stage()
    if running is not None and running.name == name:
        yield running
        return
    folder = log_dir()
    run = StageRun(name, None if folder is None else folder / (log_name(name) if redirect else FLOW_LOG))
    token = _CURRENT.set(run)
    _emit("start", name, total=total, unit=unit, log=run.log)
    status, error = "failed", None
    try:
        with _stage_log(run.log if redirect else None, name) as log:
            try:
                yield run
            except BaseException:
                if log is not None:
                    log.write(traceback.format_exc())
                    log.flush()
                raise
        status = "cached" if run.cached else "done"
    except BaseException as exc:
        error = type(exc).__name__
        if not isinstance(exc, Exception):  # Ctrl-C, a worker told to stop
            status = "interrupted"
        raise
    finally:
        _CURRENT.reset(token)
        _emit(
            "end",
            name,
            status=status,
            headline=run.headline,
            seconds=round(time.monotonic() - run.started, 1),
            log=run.log,
            error=error,
        )


def advance(step: int, total: int | None = None, figure: str | None = None, unit: str | None = None) -> None:
    """Report the current stage's progress: ``step`` of ``total`` done, with a figure (``loss 0.123``).

    Sent at most every :data:`ADVANCE_EVERY` seconds (always at the last step); a no-op outside a stage.
    """
    run = current_stage()
    if run is None:
        return
    now = time.monotonic()
    if now - run.last_advance < ADVANCE_EVERY and (total is None or step < total):
        return
    run.last_advance = now
    _emit("advance", run.name, step=step, total=total, figure=figure, unit=unit)


def set_headline(text: str | None) -> None:
    """Set the headline figure of the current stage (shown on its end line); a no-op outside a stage."""
    run = current_stage()
    if run is not None and text:
        run.headline = text


# ------------------------------------------------------------------------ consumer side
def format_seconds(seconds: float) -> str:
    """``41 s``, ``3 min 12 s``, ``2 h 05 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def end_line(doc: dict) -> str:
    """The line a finished stage prints: ``detectors/source-only/seed0   ✓ AP50 0.336  41 s``."""
    name, status = doc.get("stage") or "?", doc.get("status")
    took = format_seconds(float(doc.get("seconds") or 0.0))
    headline = doc.get("headline")
    if status == "cached":
        text = "✓ " + (f"{headline}  " if headline else "") + "(finished earlier)"
    elif status == "done":
        text = "✓ " + (f"{headline}  " if headline else "") + took
    else:
        log = doc.get("log")
        where = f"  log: {_shown(Path(log))}" if log else ""
        error = f" ({doc['error']})" if doc.get("error") else ""
        text = f"✗ {status or 'failed'}{error} after {took}{where}"
    return f"{name:<{NAME_WIDTH}} {text}"


def _shown(path: Path) -> str:
    """A log path as the user would type it: relative to the current folder when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


@dataclass
class _Running:
    name: str
    started: float  # wall-clock time of the start event
    total: int | None = None
    unit: str = "step"
    step: int = 0
    figure: str | None = None
    announced: bool = False
    task: object = None


class _Display:
    """Draws the events: rich bars in a terminal (``live``), plain lines otherwise."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self.running: dict[tuple[int, str], _Running] = {}
        self._lock = threading.Lock()
        self.progress = None
        if live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                TextColumn("{task.fields[count]}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[figure]}"),
                console=Console(file=out, highlight=False),
                transient=True,
                refresh_per_second=4,
                redirect_stdout=False,  # stdout belongs to the stages' logs, not above the bars
                redirect_stderr=False,
            )
            self.progress.start()

    def print(self, line: str) -> None:
        with self._lock:
            if self.progress is not None:
                self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                self.out.write(line + "\n")
                self.out.flush()

    def handle(self, doc: dict) -> None:
        kind, name = doc.get("event"), doc.get("stage")
        key = (int(doc.get("pid") or 0), str(name))
        if kind == "warning":
            self.print(f"warning: {doc.get('message', '')}")
        elif kind == "start":
            run = _Running(str(name), float(doc.get("t") or time.time()), doc.get("total"), doc.get("unit") or "step")
            self.running[key] = run
            if self.progress is not None:
                run.task = self.progress.add_task(str(name), total=run.total, count="", figure="")
        elif kind == "advance" and key in self.running:
            run = self.running[key]
            run.step = int(doc.get("step") or 0)
            run.total = doc.get("total") or run.total
            run.unit = doc.get("unit") or run.unit
            run.figure = doc.get("figure")
            if self.progress is not None:
                count = f"{run.unit} {run.step}/{run.total}" if run.total else f"{run.unit} {run.step}"
                self.progress.update(
                    run.task, completed=run.step, total=run.total, count=count, figure=run.figure or ""
                )
        elif kind == "end":
            run = self.running.pop(key, None)
            if run is not None and self.progress is not None:
                self.progress.remove_task(run.task)
            self.print(end_line(doc))

    def tick(self, now: float) -> None:
        """Plain output: one start line for each stage running longer than :data:`START_LINE_AFTER`."""
        if self.progress is not None:
            return
        for run in self.running.values():
            if run.announced or now - run.started < START_LINE_AFTER:
                continue
            run.announced = True
            detail = ""
            if run.total and run.step:
                left = (now - run.started) / run.step * (run.total - run.step)
                detail = f" {run.unit} {run.step}/{run.total}, about {format_seconds(left)} left"
            figure = f", {run.figure}" if run.figure else ""
            self.print(f"{run.name:<{NAME_WIDTH}} … running{detail}{figure}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class _Poller:
    """Reads the events file from ``offset`` on, in a thread, and hands each event to the display."""

    def __init__(self, path: Path, offset: int, display: _Display, every: float = 0.2) -> None:
        self.path, self.offset, self.display, self.every = path, offset, display, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aerosynth-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for raw in data[: end + 1].splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict):
                self.display.handle(doc)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # drawing must never break the run
                self.read()
                self.display.tick(time.time())

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(Exception):
            self.read()


class _QuietServerNotices(logging.Filter):
    """Drops the notices Prefect logs on its top ``prefect`` logger (``Stopping temporary server ...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_QUIET = _QuietServerNotices()


def _terminal_stream() -> tuple[TextIO, bool]:
    """A stream on the command's stdout that later redirection of fd 1 does not move; and whether it was opened here."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO or pytest's capture: write to it as it is
        return sys.stdout, False
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return open(os.dup(fd), "w", encoding=encoding, errors="replace", buffering=1), True


@contextlib.contextmanager
def terminal_output(
    logs: Path, verbose: bool = False, out: TextIO | None = None, announce: bool = True
) -> Iterator[None]:
    """Run a command's flow with stage lines on the terminal and third-party output in ``logs``.

    Args:
        logs: the log folder (``WORK/logs``); made if missing. Stage logs, ``flow.log`` and the events.
        verbose: leave stdout and stderr alone (third-party output shows as before); plain stage lines.
        out: where the stage lines go (default: the command's stdout, as it is when the block starts).
        announce: start with a line that says where the logs are.
    """
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    events = logs / EVENTS_FILE
    offset = events.stat().st_size if events.is_file() else 0
    env_before = {k: os.environ.get(k) for k in (LOG_DIR_ENV, VERBOSE_ENV)}
    os.environ[LOG_DIR_ENV] = str(logs.resolve())
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        logging.getLogger("prefect").removeFilter(_QUIET)
    else:
        os.environ.pop(VERBOSE_ENV, None)
    opened = False
    if out is None:
        _flush_std()
        out, opened = _terminal_stream()
    live = not verbose and bool(getattr(out, "isatty", lambda: False)())
    display = _Display(out, live)
    poller = _Poller(events, offset, display)
    try:
        with contextlib.ExitStack() as stack:
            if announce and not verbose:
                display.print(f"logs: {_shown(logs)}/ (ultralytics, Prefect; --verbose prints them here)")
                flow_log = stack.enter_context(open(logs / FLOW_LOG, "ab"))
                stack.enter_context(_redirected(flow_log.fileno()))
                _forward_warnings(True)
                stack.callback(_forward_warnings, False)
            poller.start()
            try:
                yield
            finally:
                poller.stop()
                display.close()
    finally:
        if not verbose:  # the temporary server stops at exit, after the flow: its notice is not the user's
            prefect_logger = logging.getLogger("prefect")
            if _QUIET not in prefect_logger.filters:
                prefect_logger.addFilter(_QUIET)
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if opened:
            out.close()
