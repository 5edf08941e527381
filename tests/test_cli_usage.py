"""A mistyped command line is a usage error: click's usage message, exit status 2, no traceback.

Every command and group the app registers is found by walking the click group typer builds, so a new
command is covered without editing this file. Each case fails while parsing the command line, before any
command body runs, so the whole file takes a few seconds.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import typer.main

from aerosynth.flows.cli import app, main


def _walk(cmd, path: tuple[str, ...] = ()):
    yield path, cmd
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        yield from _walk(sub, (*path, name))


ROOT = typer.main.get_command(app)
ALL = list(_walk(ROOT))  # (), ("adapt",), ..., ("data",), ("data", "demo"), ("data", "prepare"), ...
GROUPS = [(p, c) for p, c in ALL if getattr(c, "commands", None) is not None]
COMMANDS = [(p, c) for p, c in ALL if getattr(c, "commands", None) is None]


def _id(path: tuple[str, ...]) -> str:
    return " ".join(path) or "aerosynth"


def _options(cmd) -> list:
    return [p for p in cmd.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]


def _required(cmd) -> list:
    return [p for p in cmd.params if p.required]


def _takes_value(param) -> bool:
    return not getattr(param, "is_flag", False) and not getattr(param, "count", False)


def _number_type(cmd, name: str) -> type | None:
    """int or float when the command's parameter ``name`` is one (optional or not), else None."""
    hints = typing.get_type_hints(inspect.unwrap(cmd.callback))
    hint = hints.get(name)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if hint in (int, float) else None


def _dummy_args(params) -> list[str]:
    """A value for each given parameter (options by their first flag, arguments bare)."""
    args: list[str] = []
    for p in params:
        if p.param_type_name == "argument":
            args.append("x")
        elif _takes_value(p):
            args += [p.opts[0], "1"]
        else:
            args.append(p.opts[0])
    return args


def _run(capsys, args: list[str]) -> tuple[int, str]:
    try:
        rc = main(args)
    except BaseException as exc:  # the point is that nothing escapes
        out = capsys.readouterr()
        pytest.fail(f"aerosynth {' '.join(args)} raised {type(exc).__module__}.{type(exc).__name__}: {exc}\n{out}")
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text, text
    return rc, text


def _assert_usage_error(rc: int, text: str, path: tuple[str, ...], needle: str) -> None:
    assert rc == 2, text
    assert "Usage:" in text and " ".join(("aerosynth", *path)) in text, text
    assert "Error:" in text and needle in text, text


def test_every_command_is_found():
    names = {_id(p) for p, _ in ALL}
    assert {"aerosynth", "data", "data prepare", "data demo", "demo", "adapt", "request", "serve"} <= names
    assert len(COMMANDS) >= 13


@pytest.mark.parametrize(("path", "cmd"), ALL, ids=[_id(p) for p, _ in ALL])
def test_unknown_option_is_a_usage_error(path, cmd, capsys):
    rc, text = _run(capsys, [*path, "--bogus-option"])
    _assert_usage_error(rc, text, path, "--bogus-option")


@pytest.mark.parametrize(("path", "cmd"), GROUPS, ids=[_id(p) for p, _ in GROUPS])
def test_unknown_command_is_a_usage_error(path, cmd, capsys):
    rc, text = _run(capsys, [*path, "no-such-command"])
    _assert_usage_error(rc, text, path, "no-such-command")


@pytest.mark.parametrize(("path", "cmd"), GROUPS, ids=[_id(p) for p, _ in GROUPS])
def test_group_without_a_command_prints_its_help(path, cmd, capsys):
    rc, text = _run(capsys, list(path))
    assert rc == 2, text
    assert "Usage:" in text and "Commands" in text, text


WITH_REQUIRED = [(p, c) for p, c in COMMANDS if _required(c)]


@pytest.mark.parametrize(("path", "cmd"), WITH_REQUIRED, ids=[_id(p) for p, _ in WITH_REQUIRED])
def test_no_required_option_is_a_usage_error(path, cmd, capsys):
    rc, text = _run(capsys, list(path))
    _assert_usage_error(rc, text, path, "Missing")


DROP_ONE = [(p, c, r) for p, c in WITH_REQUIRED for r in _required(c)]


@pytest.mark.parametrize(
    ("path", "cmd", "missing"), DROP_ONE, ids=[f"{_id(p)} without {r.name}" for p, _, r in DROP_ONE]
)
def test_each_missing_required_option_is_named(path, cmd, missing, capsys):
    given = [p for p in _required(cmd) if p is not missing]
    rc, text = _run(capsys, [*path, *_dummy_args(given)])
    _assert_usage_error(rc, text, path, "Missing")
    names = {missing.name, missing.name.replace("_", "-"), *missing.opts}
    assert any(n in text for n in names), text


NUMBERS = [(p, c, o) for p, c in COMMANDS for o in _options(c) if _takes_value(o) and _number_type(c, o.name)]


@pytest.mark.parametrize(("path", "cmd", "option"), NUMBERS, ids=[f"{_id(p)} {o.opts[0]}" for p, _, o in NUMBERS])
def test_non_number_to_a_number_option_is_a_usage_error(path, cmd, option, capsys):
    rc, text = _run(capsys, [*path, option.opts[0], "not-a-number"])
    _assert_usage_error(rc, text, path, f"Invalid value for '{option.opts[0]}'")


def test_number_options_are_found():
    found = {(_id(p), o.opts[0]) for p, _, o in NUMBERS}
    assert {("request", "--count"), ("data prepare", "--tile-size"), ("detect", "--conf")} <= found


VALUED = [(p, c, next(o for o in _options(c) if _takes_value(o))) for p, c in COMMANDS]


@pytest.mark.parametrize(("path", "cmd", "option"), VALUED, ids=[f"{_id(p)} {o.opts[0]}" for p, _, o in VALUED])
def test_option_without_its_value_is_a_usage_error(path, cmd, option, capsys):
    rc, text = _run(capsys, [*path, option.opts[0]])
    # click raises this one from its parser without a context, so it prints the error line alone
    assert rc == 2, text
    assert f"Error: Option '{option.opts[0]}' requires an argument" in text, text


def test_help_still_exits_0(capsys):
    rc, text = _run(capsys, ["request", "--help"])
    assert rc == 0 and "Usage:" in text and "--count" in text, text


def _console_script() -> str | None:
    here = Path(sys.executable).parent / "aerosynth"
    return str(here) if here.is_file() else shutil.which("aerosynth")


def test_console_script_prints_usage_and_exits_2(tmp_path):
    script = _console_script()
    if script is None:
        pytest.skip("the aerosynth console script is not installed (pip install -e .)")
    env = {**os.environ, "AEROSYNTH_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [script, "demo", "--bogus"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    assert "Usage: aerosynth demo" in out.stderr and "No such option: --bogus" in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran
