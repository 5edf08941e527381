"""Named dataset presets: the benchmark protocol aerial-v1 and the embedded demo."""

from __future__ import annotations

from pathlib import Path

from aerosynth.data.domains import yolo_folder_domain
from aerosynth.data.errors import InputError
from aerosynth.data.prepare import PrepareSpec, SplitSpec

#: Protocol aerial-v1 (``shared/benchmarks/aerial-v1.md``): fixed scale per domain to 0.125 m/px.
AERIAL_V1_SCALES = {"madison_drone": 0.384, "kit_munich_aerial": 1.0}
AERIAL_V1_EXPECTED_TILES = {"source-train": 5320, "source-val": 252, "target-train": 1375, "target-test": 400}


def aerial_v1(aerial_root: str | Path) -> PrepareSpec:
    """Protocol aerial-v1 on ``shared/data/aerial``: Madison (source) -> Munich (target)."""
    root = Path(aerial_root)
    for name in AERIAL_V1_SCALES:
        if not (root / name).is_dir():
            raise InputError(root / name, "aerial-v1 domain folder not found")
    madison = yolo_folder_domain(root / "madison_drone", "madison_drone")
    munich = yolo_folder_domain(root / "kit_munich_aerial", "kit_munich_aerial")
    s, t = AERIAL_V1_SCALES["madison_drone"], AERIAL_V1_SCALES["kit_munich_aerial"]
    return PrepareSpec(
        preset="aerial-v1",
        target_gsd=0.125,
        tile_size=128,
        splits=[
            SplitSpec("source-train", madison, exclude_groups=["Drone1_clip9"], mode="cover", scale=s),
            SplitSpec("source-val", madison, groups=["Drone1_clip9"], mode="cover", scale=s),
            SplitSpec("target-train", munich, groups=["MOS155-179", "MunichStreet02"], mode="grid", weak=True, scale=t),
            SplitSpec("target-test", munich, groups=["MOS74-93"], mode="grid", weak=True, scale=t),
        ],
    )


def default_aerial_root() -> Path:
    """``../shared/data/aerial`` next to the checkout, or ``$AEROSYNTH_SHARED/data/aerial``."""
    import os

    shared = os.environ.get("AEROSYNTH_SHARED")
    if shared:
        return Path(shared) / "data" / "aerial"
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "aerial"
