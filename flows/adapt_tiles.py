"""Adapt step ``tiles/``: the config's domains resampled, tiled and split (:mod:`aerosynth.data.prepare`).

A custom target may come without boxes, with weak flags only (``flags.json``, ``flags.csv`` or ``flags.geojson``
in its folder, :mod:`aerosynth.data.flags`); the flag files' hashes join the step's key, so flagging more
tiles rebuilds it. Such a target cannot be scored: :func:`require_target_boxes` stops the flow before the
steps that evaluate on target-test.
"""

from __future__ import annotations

from pathlib import Path

from aerosynth.data.errors import InputError
from aerosynth.data.flags import FLAG_FILES
from aerosynth.data.manifest import file_sha256, read_manifest
from aerosynth.flows.adapt_common import _logger, _repo_relative
from aerosynth.flows.config import AdaptConfig
from aerosynth.flows.stage_cache import run_stage


def prepare_tiles(config: AdaptConfig, work: Path) -> Path:
    from aerosynth.data.prepare import prepare_dataset

    d = config.data

    def build(out: Path) -> None:
        if d.preset in ("aerial-v1", "aerial-v1-minsk"):
            from aerosynth.data.presets import AERIAL_V1_PRESETS, aerial_v1, default_aerial_root

            spec = aerial_v1(_repo_relative(d.aerial_root) or default_aerial_root(), AERIAL_V1_PRESETS[d.preset])
        elif d.preset == "demo":
            from aerosynth.data.demo import DemoConfig, demo_spec, write_demo_data

            raw = work / "demo-raw"
            write_demo_data(
                raw, DemoConfig(scenes_per_domain=d.demo_scenes, size_px=d.demo_size, seed=config.seed), overwrite=True
            )
            spec = demo_spec(raw, d.gsd, d.tile_size)
        else:
            from aerosynth.data.domains import open_domain
            from aerosynth.data.prepare import custom_spec

            for field in ("source", "target"):
                if getattr(d, field) is None:
                    raise InputError(f"config.data.{field}", "required when data.preset is custom")
            if not d.test_groups:
                raise InputError("config.data.test_groups", "name the target groups held out for target-test")
            src = open_domain(d.source, d.source_gsd, d.bands)
            tgt = open_domain(d.target, d.target_gsd, d.bands)
            if d.classes:
                from aerosynth.data.classes import choose_classes

                choose_classes([src, tgt], [str(c) for c in d.classes], "config.data.classes")
            spec = custom_spec(
                src,
                tgt,
                d.val_groups,
                d.test_groups,
                d.gsd,
                d.tile_size,
                train_groups=d.train_groups,
                exclude_groups=d.exclude_groups,
                unflagged=d.unflagged,
            )
        prepare_dataset(spec, out, overwrite=True)

    settings = {**d.model_dump(mode="json"), "seed": config.seed}
    flag_files = _flag_files(d.target) if d.preset == "custom" else {}
    if flag_files:  # flagging more tiles (aerosynth flag) rebuilds the tiles
        settings["target_flags"] = flag_files
    out, _ = run_stage("tiles", work / "tiles", settings, {}, build, _logger(), headline=tiles_headline)
    return out


def tiles_headline(out: Path) -> str:
    """The tiles step's headline for its terminal line: the tiles of each split."""
    splits = (read_manifest(out) or {})["splits"]
    return ", ".join(f"{name} {split['tiles']}" for name, split in splits.items()) + " tiles"


def _flag_files(target: Path | None) -> dict[str, str]:
    """sha256 of each flag file beside the target (a COCO json's folder, or the target folder)."""
    folder = _repo_relative(target)
    if folder is None:
        return {}
    folder = folder.parent if folder.is_file() else folder
    return {name: file_sha256(folder / name) for name in FLAG_FILES if (folder / name).is_file()}


def require_target_boxes(tiles: Path, step: str = "detectors") -> None:
    """Refuse to go on to ``step`` when the prepared target has no boxes (weak flags only).

    The detectors are scored on target-test and the report compares them there; a target without boxes
    would be scored as if it had no vehicle.

    Raises:
        InputError: the tiles' manifest says ``"target_boxes": false``.
    """
    manifest = read_manifest(tiles) or {}
    if manifest.get("target_boxes", True) is False:
        raise InputError(
            "config.data.target",
            f"the target has weak flags but no boxes, and the {step} step scores detectors on target-test boxes; "
            f"run with --until tiles, ldm or synthetic (tiles are in {tiles}), or give the target boxes "
            "(a labels/ folder)",
        )
