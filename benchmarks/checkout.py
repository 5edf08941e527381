"""Make ``aerosynth`` importable from a plain checkout (a GPU box where nothing is installed)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    """Map the package name onto the repository root when aerosynth is not installed.

    The stage folders sit top-level in the repository and install as ``aerosynth.<stage>``; without
    an install, a namespace module whose path is the repository root gives the same import names.
    """
    if "aerosynth" in sys.modules or importlib.util.find_spec("aerosynth") is not None:
        return
    module = types.ModuleType("aerosynth")
    module.__path__ = [str(REPO)]
    sys.modules["aerosynth"] = module
