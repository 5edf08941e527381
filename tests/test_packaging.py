"""The distribution installs one top-level package, ``aerosynth``, whatever the repository layout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "generation", "annotation", "detection", "flows")


def test_wheel_has_one_top_level_name(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(REPO),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("aerosynth-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"aerosynth"}
    for stage in STAGES:  # every stage folder is inside it, with its modules
        assert f"aerosynth/{stage}/__init__.py" in names
    assert "aerosynth/flows/cli.py" in names and "aerosynth/data/tileset.py" in names
    assert not any(n.startswith("aerosynth/tests/") or n.startswith("aerosynth/benchmarks/") for n in names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "aerosynth = aerosynth.flows.cli:main" in entry


def test_stage_modules_import_under_the_package_name():
    out = subprocess.run(
        [sys.executable, "-c", "import aerosynth.flows.cli, aerosynth.data.tileset as t; print(t.__name__)"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "aerosynth.data.tileset"


def test_config_docs_say_what_options_do_not_what_they_measured():
    """Measured figures go to benchmarks/README.md, where they are kept current; flows/config.py points there."""
    import re

    text = (REPO / "flows" / "config.py").read_text()
    measured = re.compile(
        r"(AP50|F1|closure)\s*[=:]?\s*[01]\.\d+|\d(\.\d+)?x (slower|faster)|about [\d.]+ (s|min|minutes)\b"
        r"|\d+ of \d+ seeds|\(\d+ seeds"
        r"|[<>]=? ?0\.\d+ ?AP50|(a few|several) minutes|(faster|slower) than|minutes on"
        r"|\d+ epochs of|\d+ (small )?(scenes|tiles|images)\b"  # a dataset's counts, a budget's size
        r"|default [\d.]+\b|None: [\d.]+ for"  # a default restated beside the field that holds it
    )
    found = [m.group(0) for m in measured.finditer(text)]
    assert not found, found
