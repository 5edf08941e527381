"""Named dataset presets: the benchmark protocol aerial-v1 (two targets) and the embedded demo."""

from __future__ import annotations

from pathlib import Path

from aerosynth.data.domains import yolo_folder_domain
from aerosynth.data.errors import InputError
from aerosynth.data.prepare import PrepareSpec, SplitSpec

#: Protocol aerial-v1 (``shared/benchmarks/aerial-v1.md``): fixed scale per domain to 0.125 m/px.
AERIAL_V1_SCALES = {"madison_drone": 0.384, "kit_munich_aerial": 1.0, "minsk_drone": 0.48}
AERIAL_V1_EXPECTED_TILES = {"source-train": 5320, "source-val": 252, "target-train": 1375, "target-test": 400}
#: Protocol item 10, the second target (Minsk); the source splits are the same as KIT's.
AERIAL_V1_MINSK_EXPECTED_TILES = {"source-train": 5320, "source-val": 252, "target-train": 728, "target-test": 644}
#: Target groups of each aerial-v1 target: (target-train, target-test). Minsk's ``photos`` is in neither.
AERIAL_V1_TARGETS = {
    "kit_munich_aerial": (["MOS155-179", "MunichStreet02"], ["MOS74-93"]),
    "minsk_drone": (["DJI_0005"], ["DJI-00760", "DJI_0762", "DJI_0013"]),
}
#: YOLO class ids of the aerial domains that are vehicles: car and large vehicle, folded into ``vehicle``.
AERIAL_V1_CLASSES = frozenset({0, 1})
#: Preset name -> target domain.
AERIAL_V1_PRESETS = {"aerial-v1": "kit_munich_aerial", "aerial-v1-minsk": "minsk_drone"}


def aerial_v1(aerial_root: str | Path, target: str = "kit_munich_aerial") -> PrepareSpec:
    """Protocol aerial-v1 on ``shared/data/aerial``: Madison (source) -> Munich or Minsk (target).

    Args:
        aerial_root: the folder holding the domain folders.
        target: ``kit_munich_aerial`` (preset ``aerial-v1``) or ``minsk_drone`` (``aerial-v1-minsk``).
    """
    if target not in AERIAL_V1_TARGETS:
        raise InputError("target", f"unknown aerial-v1 target {target!r} ({', '.join(AERIAL_V1_TARGETS)})")
    root = Path(aerial_root)
    for name in ("madison_drone", target):
        if not (root / name).is_dir():
            raise InputError(root / name, "aerial-v1 domain folder not found")
    # class 0 = car, 1 = large vehicle (truck, bus): both are vehicles, chosen here rather than assumed
    madison = yolo_folder_domain(root / "madison_drone", "madison_drone", classes=AERIAL_V1_CLASSES)
    domain = yolo_folder_domain(root / target, target, classes=AERIAL_V1_CLASSES)
    s, t = AERIAL_V1_SCALES["madison_drone"], AERIAL_V1_SCALES[target]
    train_groups, test_groups = AERIAL_V1_TARGETS[target]
    return PrepareSpec(
        preset="aerial-v1" if target == "kit_munich_aerial" else "aerial-v1-minsk",
        target_gsd=0.125,
        tile_size=128,
        splits=[
            SplitSpec("source-train", madison, exclude_groups=["Drone1_clip9"], mode="cover", scale=s),
            SplitSpec("source-val", madison, groups=["Drone1_clip9"], mode="cover", scale=s),
            SplitSpec("target-train", domain, groups=list(train_groups), mode="grid", weak=True, scale=t),
            SplitSpec("target-test", domain, groups=list(test_groups), mode="grid", weak=True, scale=t),
        ],
    )


def default_aerial_root() -> Path:
    """``../shared/data/aerial`` next to the checkout, or ``$AEROSYNTH_SHARED/data/aerial``."""
    import os

    shared = os.environ.get("AEROSYNTH_SHARED")
    if shared:
        return Path(shared) / "data" / "aerial"
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "aerial"
