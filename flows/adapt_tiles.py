"""Adapt step ``tiles/``: the config's domains resampled, tiled and split (:mod:`aerosynth.data.prepare`)."""

from __future__ import annotations

from pathlib import Path

from aerosynth.data.errors import InputError
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
            )
        prepare_dataset(spec, out, overwrite=True)

    out, _ = run_stage(
        "tiles", work / "tiles", {**d.model_dump(mode="json"), "seed": config.seed}, {}, build, _logger()
    )
    return out
