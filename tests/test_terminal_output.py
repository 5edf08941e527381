"""What a person sees: one line per stage, third-party output in ``WORK/logs/`` (issue #35 item 1)."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aerosynth.flows import progress

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ the pieces, in process
def _events(logs: Path) -> list[dict]:
    return [json.loads(line) for line in (logs / progress.EVENTS_FILE).read_text().splitlines()]


def test_log_names_are_flat_file_names():
    assert progress.log_name("detectors/source-only/seed0") == "detectors-source-only-seed0.log"
    assert progress.log_name("detectors/real-self-training+source/seed1") == (
        "detectors-real-self-training+source-seed1.log"
    )
    assert progress.log_name("request/../x y") == "request-..-x-y.log"


def test_a_stage_sends_its_output_to_its_log_and_its_figure_to_the_terminal(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    out = io.StringIO()
    with progress.terminal_output(logs, out=out):
        with progress.stage("detectors/source-only/seed0") as running:
            os.write(1, b"Ultralytics 8 model summary on fd 1\n")
            os.write(2, b"a library warning on fd 2\n")
            progress.advance(1, 2, "val mAP50 0.100", unit="epoch")
            running.headline = "AP50 0.336"
        with progress.stage("tiles") as running:
            running.cached = True
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("logs: ") and "--verbose" in lines[0]
    assert lines[1].startswith("detectors/source-only/seed0") and "✓ AP50 0.336" in lines[1]
    assert lines[1].endswith(" s")
    assert lines[2].startswith("tiles") and "finished earlier" in lines[2]
    assert len(lines) == 3  # short stages: no start line, no progress line when not a terminal
    text = (logs / "detectors-source-only-seed0.log").read_text()
    assert "Ultralytics 8 model summary on fd 1" in text and "a library warning on fd 2" in text
    kinds = [(e["event"], e["stage"]) for e in _events(logs)]
    assert kinds[:3] == [
        ("start", "detectors/source-only/seed0"),
        ("advance", "detectors/source-only/seed0"),
        ("end", "detectors/source-only/seed0"),
    ]
    assert progress.LOG_DIR_ENV not in os.environ  # the command's settings do not outlive it


def test_a_failed_stage_names_the_error_and_keeps_the_traceback_in_its_log(tmp_path):
    logs = tmp_path / "logs"
    out = io.StringIO()
    with pytest.raises(ValueError, match="broken input"):
        with progress.terminal_output(logs, out=out), progress.stage("annotation/relay"):
            raise ValueError("broken input")
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("annotation/relay") and "✗ failed (ValueError)" in line
    assert "annotation-relay.log" in line
    text = (logs / "annotation-relay.log").read_text()
    assert "Traceback" in text and "ValueError: broken input" in text


def test_only_aerosynth_warnings_reach_the_terminal(tmp_path):
    out = io.StringIO()
    with progress.terminal_output(tmp_path / "logs", out=out):
        logging.getLogger("aerosynth.flows").warning("relay skipped: %s", "no vehicle")
        logging.getLogger("ultralytics").warning("a warning of ultralytics")
        logging.getLogger("aerosynth.flows").info("stage tiles: running")
    text = out.getvalue()
    assert "warning: relay skipped: no vehicle" in text
    assert "ultralytics" not in text.split("\n", 1)[1] and "stage tiles" not in text
    root = logging.getLogger()
    assert all(not isinstance(h, progress._WarningForwarder) for h in root.handlers)


def test_a_long_stage_gets_one_start_line_when_output_is_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "START_LINE_AFTER", 0.0)
    out = io.StringIO()
    with progress.terminal_output(tmp_path / "logs", out=out):
        with progress.stage("ldm/stageA"):
            progress.advance(3, 10, "loss 0.500")
            import time

            time.sleep(0.8)  # several polls of the events file
    lines = out.getvalue().splitlines()[1:]
    assert len(lines) == 2, lines
    assert lines[0].startswith("ldm/stageA") and "running" in lines[0]
    assert "✓" in lines[1]


def test_verbose_leaves_stdout_alone(tmp_path, capfd):
    out = io.StringIO()
    with progress.terminal_output(tmp_path / "logs", verbose=True, out=out):
        with progress.stage("detectors/oracle/seed0") as running:
            os.write(1, b"Ultralytics epoch output\n")
            running.headline = "AP50 0.500"
    assert "Ultralytics epoch output" in capfd.readouterr().out
    assert not (tmp_path / "logs" / "detectors-oracle-seed0.log").exists()
    assert "✓ AP50 0.500" in out.getvalue() and "logs:" not in out.getvalue()


def _worker_stage(name: str) -> None:
    with progress.stage(name) as running:
        print("ultralytics in a worker", flush=True)
        logging.getLogger("aerosynth.flows").warning("a warning from a worker")
        running.headline = "AP50 0.250"


def test_a_worker_process_writes_its_own_log_and_the_command_prints_its_line(tmp_path):
    out = io.StringIO()
    logs = tmp_path / "logs"
    with progress.terminal_output(logs, out=out):
        proc = multiprocessing.get_context("spawn").Process(target=_worker_stage, args=("detectors/continued/seed0",))
        proc.start()
        proc.join(120)
    assert proc.exitcode == 0
    text = out.getvalue()
    assert "warning: a warning from a worker" in text
    assert "detectors/continued/seed0" in text and "✓ AP50 0.250" in text
    assert "ultralytics in a worker" in (logs / "detectors-continued-seed0.log").read_text()
    assert "ultralytics in a worker" not in text


# ------------------------------------------------------------------------ the command, as a person runs it
_THIRD_PARTY = ("Ultralytics", "Epoch", "summary:", "Model summary", "Task run", "Flow run", "temporary server")


def _aerosynth(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", progress.LOG_DIR_ENV)}
    env |= {"PREFECT_HOME": str(cwd / "prefect"), "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "aerosynth.flows.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # what a person sees, both streams into one pipe
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def quick_demo(readme_demo):
    """``aerosynth demo --quick`` as the README types it, its output to a pipe (conftest's ``readme_demo``)."""
    home, text = readme_demo
    return home, home / "runs" / "smoke", text


@pytest.mark.slow
def test_demo_output_to_a_pipe_fits_a_screen_and_ends_with_the_result(quick_demo):
    _, work, text = quick_demo
    lines = text.splitlines()
    assert len(lines) <= 60, text
    assert any("AP50 on target-test" in line for line in lines), text
    assert any(line.startswith("Reading:") for line in lines), text
    for needle in _THIRD_PARTY:
        assert needle not in text, (needle, text)
    # one end line per stage, with its headline
    assert any(line.startswith("detectors/source-only/seed0") and "✓ AP50 " in line for line in lines), text
    assert any(line.startswith("ldm/stageA") and "✓ loss " in line for line in lines), text
    assert "\r" not in text  # no bar redraws in a file or a pipe


@pytest.mark.slow
def test_demo_third_party_output_is_in_the_run_logs(quick_demo):
    _, work, _ = quick_demo
    logs = work / "logs"
    detector = (logs / "detectors-source-only-seed0.log").read_text()
    assert "Ultralytics" in detector and "Epoch" in detector
    assert "Flow run" in (logs / "flow.log").read_text()  # Prefect's own
    assert (logs / "ldm-stageA.log").is_file() and (logs / "tiles.log").is_file()


@pytest.mark.slow
def test_verbose_shows_the_detector_output_again(quick_demo):
    home, work, _ = quick_demo
    shutil.rmtree(work / "detectors" / "oracle" / "seed0")  # one detector to train again; the rest is cached
    run = _aerosynth(["demo", "--quick", "--work-dir", str(work), "--verbose"], home)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "Ultralytics" in run.stdout and "Epoch" in run.stdout
    lines = run.stdout.splitlines()
    assert any(line.startswith("detectors/oracle/seed0") and "✓ AP50 " in line for line in lines), run.stdout
    assert any(line.startswith("tiles") and "finished earlier" in line for line in lines), run.stdout
    assert any(line.startswith("Reading:") for line in lines), run.stdout
