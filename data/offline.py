"""Offline settings applied by the CLI, the flows and the tests before heavy imports.

Nothing in aerosynth may touch the network: ultralytics would fetch a font, albumentations
would check for updates, the Hugging Face hub would look for weights, Prefect would send
analytics. :func:`apply_offline_settings` switches all of that off.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

_DEFAULTS = {
    "YOLO_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "1",
    "MPLBACKEND": "Agg",
}


def default_config_dir() -> Path:
    """Folder for aerosynth's own tool configuration (ultralytics settings and font)."""
    root = os.environ.get("AEROSYNTH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "aerosynth")
    return Path(root) / "yolo_config"


def apply_offline_settings(config_dir: str | Path | None = None) -> Path:
    """Set the environment so that no library reaches the network.

    Must run before ``ultralytics`` is imported (it reads ``YOLO_OFFLINE`` and
    ``YOLO_CONFIG_DIR`` at import). Idempotent; variables the user already set win,
    except ``YOLO_OFFLINE`` which is always on.

    Args:
        config_dir: where ultralytics keeps its settings; a copy of matplotlib's
            DejaVuSans.ttf is placed there as ``Ultralytics/Arial.ttf`` so that no font
            is downloaded.

    Returns:
        The ultralytics config folder in use.
    """
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["YOLO_OFFLINE"] = "1"
    if "ultralytics" in sys.modules and "YOLO_CONFIG_DIR" in os.environ:
        return Path(os.environ["YOLO_CONFIG_DIR"])
    cfg = Path(config_dir or os.environ.get("YOLO_CONFIG_DIR") or default_config_dir())
    font_dir = cfg / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = font_dir / name
        if not target.exists():
            try:
                import matplotlib

                src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
                shutil.copyfile(src, target)
            except (ImportError, OSError):  # pragma: no cover - matplotlib is a dependency
                pass
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    return cfg
