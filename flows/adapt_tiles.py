"""Adapt step ``tiles/``: the config's domains resampled, tiled and split (:mod:`aerosynth.data.prepare`).

A custom target may come without boxes, with weak flags only (``flags.json``, ``flags.csv`` or ``flags.geojson``
in its folder, :mod:`aerosynth.data.flags`); the flag files' hashes join the step's key, so flagging more
tiles rebuilds it. A share of target-train (``data.flags_holdout``; by default 0.2 without boxes, none with
them) becomes the weak split ``target-holdout`` that every detector is scored on against its flags.
:func:`plan_run` then says what the run trains: without ``detection.comparisons`` (the default without
boxes) only what the detector handed over needs.
"""

from __future__ import annotations

import re
from pathlib import Path

from aerosynth.data.errors import InputError
from aerosynth.data.flags import FLAG_FILES
from aerosynth.data.manifest import file_sha256, read_manifest
from aerosynth.flows.adapt_common import _logger, _repo_relative
from aerosynth.flows.config import AdaptConfig, buildable_sets
from aerosynth.flows.stage_cache import run_stage

#: ``data.flags_holdout`` when unset, for a target without boxes (a target with boxes holds none out).
DEFAULT_FLAGS_HOLDOUT = 0.2


def prepare_tiles(config: AdaptConfig, work: Path) -> Path:
    from aerosynth.data.prepare import prepare_dataset

    d = config.data

    def build(out: Path) -> None:
        if d.preset in ("aerial-v1", "aerial-v1-minsk"):
            from aerosynth.data.presets import AERIAL_V1_PRESETS, aerial_v1, default_aerial_root

            spec = aerial_v1(_repo_relative(d.aerial_root) or default_aerial_root(), AERIAL_V1_PRESETS[d.preset])
            spec.flags_holdout = d.flags_holdout or 0.0  # the aerial-v1 targets have boxes
        elif d.preset == "demo":
            from aerosynth.data.demo import DemoConfig, demo_spec, write_demo_data

            raw = work / "demo-raw"
            write_demo_data(
                raw, DemoConfig(scenes_per_domain=d.demo_scenes, size_px=d.demo_size, seed=config.seed), overwrite=True
            )
            spec = demo_spec(raw, d.gsd, d.tile_size)
            spec.flags_holdout = d.flags_holdout or 0.0  # the demo target has boxes
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
            if d.flags == "none":  # the source-free setting: no flag file is read
                tgt.flags = None
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
                unflagged="empty" if d.flags == "none" else d.unflagged,  # none: derive_flags writes them
            )
            holdout = d.flags_holdout
            spec.flags_holdout = holdout if holdout is not None else 0.0 if tgt.has_labels else DEFAULT_FLAGS_HOLDOUT
            if d.flags == "none":  # no flag to hold out
                spec.flags_holdout = 0.0
        prepare_dataset(spec, out, overwrite=True)

    settings = {**d.model_dump(mode="json"), "seed": config.seed}
    if d.flags_holdout is None:  # unset: the key of the runs made before the holdout existed
        settings.pop("flags_holdout")
    for field in ("flag_precision", "flag_budget", "flag_budget_rest"):  # the derived flags' step reads them
        settings.pop(field)
    if d.flags == "given":  # (the key of the runs made before derived flags existed)
        settings.pop("flags")
    flag_files = _flag_files(d.target) if d.preset == "custom" and d.flags == "given" else {}
    if flag_files:  # flagging more tiles (aerosynth flag) rebuilds the tiles
        settings["target_flags"] = flag_files
    out, _ = run_stage("tiles", work / "tiles", settings, {}, build, _logger(), headline=tiles_headline)
    return out


def needs_flag_step(config: AdaptConfig) -> tuple[bool, bool]:
    """Whether the run rewrites the target's flags (``tiles-flagged/``), and whether F_S must come first for it
    (``data.flags: none``, ``data.unflagged: derived``, or a flag budget whose other tiles are derived)."""
    d = config.data
    budget_derived = d.flag_budget < 1 and d.flag_budget_rest == "derived"
    derived = d.flags == "none" or d.unflagged == "derived" or budget_derived
    return derived or d.flag_budget < 1, derived


def derive_flags(config: AdaptConfig, work: Path, tiles: Path, source_only: Path | None) -> Path:
    """The tile folder ``tiles-flagged/`` whose target-train flags are derived, or budgeted.

    ``data.flags: none``: every flag from the first seed's source-only detector
    (:func:`aerosynth.annotation.tile_flags.derive_target_flags`, at the threshold that keeps
    ``data.flag_precision`` of the flagged source-val tiles right). ``data.unflagged: derived``: the given flags
    stay, the tiles no flag covered (the split's :data:`~aerosynth.data.flags.UNFLAGGED_FILE`) are derived.
    ``data.flag_budget`` < 1: the given flags of a seeded draw of that share of the flagged tiles stay, the others
    are left out or derived (``flag_budget_rest``; derived with ``unflagged: derived``). No target label is read;
    every later step reads this folder as it reads given flags.
    """
    from aerosynth.annotation.tile_flags import DERIVED_FLAGS_FILE, derive_target_flags
    from aerosynth.data.flags import read_unflagged, sample_tiles
    from aerosynth.data.tileset import read_tiles_file

    d = config.data
    keep = None
    key: dict = {"flags": "derived from the source-only detector", "flag_precision": d.flag_precision}
    rest = "derived"
    if d.flags == "given":
        unflagged = read_unflagged(tiles / "target-train")
        ids = [t.tile_id for t in read_tiles_file(tiles / "target-train")[1] if t.tile_id not in unflagged]
        keep = sample_tiles(ids, d.flag_budget, config.seed) if d.flag_budget < 1 else ids
        key = {"flag_budget": d.flag_budget, "rest": d.flag_budget_rest, "seed": config.seed}
        if d.unflagged == "derived":
            key["unflagged"] = "derived"  # which tiles: the tiles folder's unflagged.json, an input
        if d.unflagged != "derived" and d.flag_budget_rest == "skip":
            rest = "skip"
        else:
            key["flag_precision"] = d.flag_precision
    out, _ = run_stage(
        "tiles-flagged",
        work / "tiles-flagged",
        key,
        {"tiles": tiles, **({"source_only": source_only} if rest == "derived" and source_only else {})},
        lambda o: derive_target_flags(
            None if source_only is None else source_only / "train" / "detector.pt",
            tiles,
            o,
            d.flag_precision,
            imgsz=config.detection.imgsz,
            device=config.device,
            keep=keep,
            rest=rest,
        ),
        _logger(),
        headline=lambda o: _derived_headline(o / DERIVED_FLAGS_FILE),
    )
    return out


def _derived_headline(path: Path) -> str:
    import json

    doc = json.loads(path.read_text())
    val, train = doc["source_val"], doc["target_train"]
    text = f"{train['flagged_vehicle']} of {train['tiles']} target tiles flagged vehicle"
    if doc.get("given_kept"):
        text += f" ({doc['given_kept']} flags given)"
    if val is not None:
        text += f", threshold {val['threshold']:.2f}: source-val tile precision {val['precision']:.2f}"
    return text


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


def target_has_boxes(tiles: Path) -> bool:
    """Whether the prepared target has boxes (``manifest.json`` says ``"target_boxes": false`` when not)."""
    return (read_manifest(tiles) or {}).get("target_boxes", True) is not False


def recipe_sets(name: str) -> list[str]:
    """The labelled sets a variant is trained on (``real-heatmap-r3+source`` -> ``[real-heatmap-r3]``)."""
    rest = re.sub(r"-\d+img$", "", name)
    if not rest.endswith("+source"):
        return []
    return [part.split("@")[0] for part in rest.removesuffix("+source").split("+")]


def recipe(config: AdaptConfig, boxes: bool = True) -> str | None:
    """The detector the run hands over: the first of ``detection.recommend`` that ``config`` builds, else ``None``."""
    built = set(buildable_sets(config))
    plain = {"source-only": True, "continued": config.detection.continued, "oracle": config.detection.oracle and boxes}
    for name in config.detection.recommend:
        sets = recipe_sets(name)
        if (name in plain and plain[name]) or (sets and all(s in built for s in sets)):
            return name
    return None


def plan_run(config: AdaptConfig, tiles: Path) -> AdaptConfig:
    """The config the run trains with, given its tiles (a copy; ``config`` is left as it is).

    A target without boxes trains no oracle. With ``detection.comparisons`` (unset: true for a target with
    boxes, false without) the config is the run's. Without, the run trains what the detector handed over needs:
    the first seed, the labelled sets and rounds of :func:`recipe` (the LDM only when they need it; its
    synthetic sets stay for the label-free checks), and no continued control, other method, copy-paste set,
    translation or mix.
    """
    boxes = target_has_boxes(tiles)
    cfg = config.model_copy(deep=True)
    d, a, g = cfg.detection, cfg.annotation, cfg.generation
    d.oracle = d.oracle and boxes
    comparisons = d.comparisons if d.comparisons is not None else boxes
    if comparisons:
        return cfg
    chosen = recipe(cfg, boxes)
    needed = recipe_sets(chosen or "")
    bases = {re.sub(r"-r\d+$", "", n) for n in needed}
    rounds = [int(m.group(1)) for n in needed if (m := re.search(r"-r(\d+)$", n))]
    d.seeds, d.adapted_seeds, d.continued = d.seeds[:1], None, False
    d.mixes = [m for m in d.mixes if len(needed) > 1] if needed else []
    a.relay.enabled = a.relay.enabled and "relay" in needed
    a.threshold.enabled = a.threshold.enabled and "threshold" in needed
    a.copy_paste.enabled = a.copy_paste.enabled and any(n.startswith("copy-paste") for n in needed)
    a.real_target.methods = [m for m in a.real_target.methods if f"real-{m}" in bases]
    a.real_target.enabled = a.real_target.enabled and bool(a.real_target.methods)
    a.real_target.rounds = max([*rounds, 1]) if a.real_target.enabled else a.real_target.rounds
    g.translation.enabled = g.translation.enabled and "translation" in needed
    ldm = ("relay", "threshold", "translation", "copy-paste-harmonised", "copy-paste-blended")
    g.enabled = g.enabled and any(n in ldm or n.startswith(("real-heatmap", "real-fused")) for n in needed)
    _logger().info(
        "target %s, detection.comparisons off: training for %s only (seed %d)",
        "with boxes" if boxes else "without boxes",
        chosen or "source-only",
        d.seeds[0],
    )
    return cfg
