"""The ``aerosynth`` command line (typer + rich).

Every command applies the offline settings first, prints progress it can measure, and turns
bad input into one line on stderr and exit status 2; a mistyped command line (unknown option or
command, missing option, bad value) prints click's usage message and exits 2 as well. The commands
live by group in ``cli_data`` (``data prepare``/``data demo``), ``cli_run`` (the flows: demo, adapt,
request, retrain, serve) and ``cli_tools`` (single stages); this module is the app, their
registration and ``main``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

import typer
from rich.console import Console

from aerosynth.data.errors import InputError
from aerosynth.data.offline import apply_offline_settings
from aerosynth.flows.cli_data import data_demo, data_prepare
from aerosynth.flows.cli_flag import flag
from aerosynth.flows.cli_run import _demo_note, adapt, demo, request, retrain, serve
from aerosynth.flows.cli_tools import annotate, detect, evaluate, generate, map_quality, train

app = typer.Typer(
    help="aerosynth: adapt aerial vehicle detectors to unseen regions with generated data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Prepare tile datasets and the embedded demo data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)


class _CurrentStream:
    """A file that writes to whatever ``sys.stdout`` or ``sys.stderr`` is at the moment of writing."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _target(self):
        return getattr(sys, self._name, None)

    def write(self, text: str) -> int:
        target = self._target()
        return len(text) if target is None else target.write(text)

    def flush(self) -> None:
        target = self._target()
        if target is not None:
            target.flush()

    def isatty(self) -> bool:
        target = self._target()
        return target is not None and target.isatty()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._target(), name)


_STDOUT = _CurrentStream("stdout")
_STDERR = _CurrentStream("stderr")


def _unbind_log_handlers(call_streams: tuple) -> None:
    """Point log handlers bound to this call's stdout/stderr at the current streams instead.

    Libraries configure logging once per process, on first import, with handlers bound to the
    ``sys.stderr``/``sys.stdout`` of that moment (Prefect's console handler on the root logger, its
    ``ext://sys.stderr`` handlers, ultralytics' logger). When ``main`` runs in-process with redirected
    streams (pytest's capsys, typer's CliRunner), those streams are closed after the call, and every later
    log line in the process would fail on them. Prefect's own stream handlers always follow ``sys.stderr``.
    """
    outs = (call_streams[0], sys.stdout)
    errs = (call_streams[1], sys.stderr)
    loggers = [logging.getLogger(), *list(logging.Logger.manager.loggerDict.values())]
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", ())):
            if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
                continue
            stream = handler.stream
            if stream is _STDOUT or stream is _STDERR:
                continue
            if any(stream is s for s in outs):
                follow = _STDOUT
            elif any(stream is s for s in errs) or type(handler).__module__.startswith("prefect."):
                follow = _STDERR
            else:
                continue
            handler.acquire()
            try:
                handler.stream = follow  # not setStream: that flushes the old stream, which may be closed
                rich_console = getattr(handler, "console", None)  # PrefectConsoleHandler prints through rich
                if isinstance(rich_console, Console):
                    rich_console.file = follow
            finally:
                handler.release()


# the commands, in the order ``--help`` lists them
data_app.command("prepare")(data_prepare)
data_app.command("demo")(data_demo)
app.command("demo")(demo)
app.command("adapt")(adapt)
app.command("generate")(generate)
app.command("annotate")(annotate)
app.command("map-quality")(map_quality)
app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("detect")(detect)
app.command("request")(request)
app.command("retrain")(retrain)
app.command("serve")(serve)
app.command("flag")(flag)

__all__ = ["_demo_note", "app", "data_app", "main"]

#: The base of the errors typer's parser raises for a mistyped command line (``UsageError``: unknown option
#: or command, missing option, bad value; exit code 2) and of the few other errors it reports itself. Typer
#: 0.29 vendors click as ``typer._click`` (older typers use ``click``), so it is taken from typer's public
#: ``BadParameter`` rather than imported from either module.
_CLICK_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _catch_interrupts() -> Callable[[], None]:
    """The first Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` in the main thread; a second one exits at once.

    The first lets the run stop in order (flow state, workers, temporary server; finished stages are kept).
    The second kills the temporary server, writes one line and ends the process with status 130; the workers
    die with it (:func:`aerosynth.flows.scale.guard_worker`). Only from the main thread (where signal
    handlers live). Returns the function that puts the previous handler back, unless a Ctrl-C came (the
    process is then on its way out, and a second Ctrl-C must still end it at once).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    presses = [0]

    def on_sigint(signum: int, frame: object) -> None:
        presses[0] += 1
        if presses[0] == 1:
            raise KeyboardInterrupt
        scale = sys.modules.get("aerosynth.flows.scale")
        if scale is not None:
            scale.kill_api_server()
        os.write(2, b"interrupted again: exiting now (finished stages are kept)\n")
        os._exit(130)

    previous = signal.signal(signal.SIGINT, on_sigint)

    def restore() -> None:
        if presses[0] == 0 and signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous)

    return restore


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, print bad input as one line, exit non-zero (130 after Ctrl-C)."""
    restore_sigint = _catch_interrupts()
    call_streams = (sys.stdout, sys.stderr)
    try:
        apply_offline_settings()
        from aerosynth.flows.server_cleanup import mark_owner, stop_orphans

        stop_orphans()  # workers and temporary Prefect servers of earlier runs that were killed
        mark_owner()
        code = app(args=argv, prog_name="aerosynth", standalone_mode=False)
    except InputError as exc:
        console.print(f"error: {exc}", soft_wrap=True, highlight=False, markup=False, style="red")
        return 2
    except OSError as exc:  # read-only or missing output folder, disk full, existing output ...
        where = exc.filename if exc.filename else None
        text = f"{where}: {(exc.strerror or str(exc)).lower()}" if where else str(exc)
        console.print(f"error: {text}", soft_wrap=True, highlight=False, markup=False, style="red")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: finished stages are kept; rerun the same command to resume")
        return 130
    except SystemExit as exc:  # sys.exit inside a command
        return int(exc.code or 0)
    except _CLICK_ERROR as exc:  # usage errors (exit 2: usage, "Try ... --help", the error) and the like
        exc.show()
        return exc.exit_code
    except typer.Abort:
        return 1
    else:
        # without standalone mode typer returns None after a command, and the code of an Exit instead of
        # raising it: 0 after --help, 130 for a Ctrl-C inside a command (typer turns it into Exit(130))
        if code == 130:
            console.print("interrupted: finished stages are kept; rerun the same command to resume")
        return code if isinstance(code, int) else 0
    finally:
        _unbind_log_handlers(call_streams)
        restore_sigint()


if __name__ == "__main__":
    sys.exit(main())
