"""Adapt steps ``ldm/`` and ``synthetic/``: LDM stages 0/A/B/C (or an imported model), then the synthetic sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

from aerosynth.data.errors import InputError
from aerosynth.flows import progress
from aerosynth.flows.adapt_common import _key_path, _logger, _repo_relative, _step_logger, split_domains
from aerosynth.flows.config import AdaptConfig
from aerosynth.flows.scale import map_shards
from aerosynth.flows.stage_cache import clear_stale_stage, run_stage, stage_is_current


def train_ldm(config: AdaptConfig, work: Path, tiles: Path) -> Path:
    """Stages 0 (when no pretrained autoencoder), A, B, C; returns the last model folder."""
    from aerosynth.generation.training import Stage0Config, StageAConfig, StageBConfig, StageCConfig, train_stage

    g = config.generation
    splits = [tiles / "source-train", tiles / "target-train"]
    autoencoder = _repo_relative(g.autoencoder_dir)
    upstream: dict[str, Path] = {"tiles": tiles}
    common = {"preset": g.model, "seed": config.seed, "progress": False}
    # where it runs is not part of a stage's key: a run may resume on another device
    runtime = {"device": config.device, "mixed_precision": config.mixed_precision}

    def settings(s) -> dict:
        # an unset learning rate leaves the stage's own default (StageXConfig)
        return {k: v for k, v in s.model_dump().items() if not (k == "learning_rate" and v is None)}

    if g.stage0.steps > 0 and autoencoder is None and g.pretrained_dir is None:
        cfg0 = Stage0Config(**common, **settings(g.stage0), **runtime)
        out0, _ = run_stage(
            "ldm/stage0",
            work / "ldm" / "stage0",
            {"stage": "0", **settings(g.stage0), **common},
            upstream,
            lambda out: train_stage("0", cfg0, splits, out, on_step=_on_step("stage 0", cfg0.steps)),
            _logger(),
            headline=loss_headline,
        )
        autoencoder = out0 / "autoencoder"
        upstream["stage0"] = out0
    previous: Path | None = _repo_relative(g.init_model)
    pretrained = _repo_relative(g.pretrained_dir)
    trained_here = False
    for stage, s, cls in (
        ("A", g.stage_a, StageAConfig),
        ("B", g.stage_b, StageBConfig),
        ("C", g.stage_c, StageCConfig),
    ):
        if s.steps == 0:
            continue
        # a Stable Diffusion folder starts the first stage when there is no aerosynth model to continue
        start = {"pretrained_dir": pretrained, "image_size": g.image_size} if previous is None and pretrained else {}
        cfg = cls(
            **common,
            **settings(s),
            **runtime,
            **start,
            init_model=previous,
            autoencoder_dir=autoencoder if previous is None else None,
        )
        # the key names the autoencoder as the config does (not the machine's absolute path)
        ae_key = (
            str(g.autoencoder_dir)
            if autoencoder is not None and g.autoencoder_dir is not None
            else _key_path(autoencoder, work)
        )
        key = {"stage": stage, **settings(s), **common, "init": _key_path(previous, work), "autoencoder": ae_key}
        if start:
            key["pretrained"] = str(g.pretrained_dir)
        out, _ = run_stage(
            f"ldm/stage{stage}",
            work / "ldm" / f"stage{stage}",
            key,
            upstream,
            lambda out, cfg=cfg, stage=stage: train_stage(
                stage, cfg, splits, out, on_step=_on_step(f"stage {stage}", cfg.steps)
            ),
            _logger(),
            headline=loss_headline,
        )
        previous = out / "model"
        upstream = {"tiles": tiles, f"stage{stage}": out}
        trained_here = True
    if previous is None:
        raise InputError("config.generation", "every stage has steps: 0 and no init_model is given")
    if not trained_here:
        # no stage ran here: the given model becomes a stage of this run, keyed on its content
        previous = _import_model(work, previous)
    return previous


def _on_step(name: str, total: int):
    """An ``on_step`` callback: the step logged (:func:`_step_logger`) and shown on the stage's terminal line."""
    log_step = _step_logger(name, total)

    def on_step(step: int, losses: dict) -> None:
        log_step(step, losses)
        loss = losses.get("loss")
        progress.advance(step, total, f"loss {loss:.3f}" if isinstance(loss, float) else None, unit="step")

    return on_step


def loss_headline(out: Path) -> str | None:
    """An LDM stage's headline: the loss of its last step (``losses.csv``)."""
    import csv

    with open(out / "losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return f"loss {float(rows[-1]['loss']):.3f}" if rows else None


def set_headline(out: Path) -> str | None:
    """A synthetic set's headline: how many images it holds (``synthetic.json``)."""
    count = json.loads((out / "synthetic.json").read_text()).get("count")
    return None if count is None else f"{count} images"


def stage_models(config: AdaptConfig, work: Path, last: Path) -> list[Path]:
    """The model folders of the LDM stages this config trains (A, B, C in order), ending with ``last``.

    ``last`` is what :func:`train_ldm` returned; an imported model (no stage trained here) is the only one.
    """
    g = config.generation
    trained = [
        work / "ldm" / f"stage{stage}" / "model"
        for stage, s in (("A", g.stage_a), ("B", g.stage_b), ("C", g.stage_c))
        if s.steps > 0
    ]
    return trained if trained and trained[-1] == last else [last]


def _import_model(work: Path, model: Path) -> Path:
    """Copy a model trained elsewhere (``generation.init_model``, all stage steps 0) into ``ldm/imported``."""
    import shutil

    from aerosynth.data.manifest import tree_sha256

    if not (model / "ldm.json").is_file():
        raise InputError(model, "generation.init_model is not an aerosynth model folder (no ldm.json)")
    out, _ = run_stage(
        "ldm/imported",
        work / "ldm" / "imported",
        {"stage": "imported", "model_sha256": tree_sha256(model)},
        {},
        lambda out: shutil.copytree(model, out / "model", dirs_exist_ok=True),
        _logger(),
    )
    return out / "model"


def translation_config(
    config: AdaptConfig, model: Path, strength: float, keep_threshold: float, max_tiles: int | None = None
):
    """The :class:`~aerosynth.generation.sampling.TranslationConfig` of a run: its sampling settings, the
    model's learned tokens when it has them, and the run's device."""
    from aerosynth.generation.sampling import TranslationConfig

    return TranslationConfig(
        **config.generation.sampling.model_dump(),
        use_learned_tokens=bool(json.loads((model / "ldm.json").read_text())["spec"].get("tokens_trained")),
        gsd=config.data.gsd,
        progress=False,
        strength=strength,
        keep_threshold=keep_threshold,
        max_tiles=max_tiles,
        device=config.device,
        mixed_precision=config.mixed_precision,
    )


def synthesise(config: AdaptConfig, work: Path, tiles: Path, model: Path) -> dict[str, Path]:
    """The three text-to-image sets and the source-guided translation.

    Shards are mapped over the flow's task runner first (see :mod:`aerosynth.flows.scale`: worker
    processes whatever the runner, never the flow's own process), then the stage is closed by one call
    that finds every shard done.
    """
    from aerosynth.generation.sampling import (
        SamplingConfig,
        generate_set,
        shard_ranges,
        translate_split,
    )

    g = config.generation
    source, target = split_domains(tiles)
    # the learned tokens are used when the model has them (stages B/C here, or a model trained elsewhere)
    uses_tokens = bool(json.loads((model / "ldm.json").read_text())["spec"].get("tokens_trained"))
    runtime = {"device": config.device, "mixed_precision": config.mixed_precision}
    sampling = SamplingConfig(
        **g.sampling.model_dump(), use_learned_tokens=uses_tokens, gsd=config.data.gsd, progress=False, **runtime
    )
    model_stage = model.parent
    # one worker process (sequential) takes every core; several share them, one thread each
    threads = config.torch_threads or ((os.cpu_count() or 1) if config.runner == "sequential" else 1)

    def sharded(name: str, key: dict, upstream: dict, kind: str, n_items: int, args: dict, cfg, build) -> Path:
        out_dir = work / "synthetic" / name
        # one terminal line for the shards (in worker processes) and the stage that closes them
        with progress.stage(f"synthetic/{name}", redirect=False):
            if not stage_is_current(out_dir, key, upstream):
                clear_stale_stage(out_dir)
                map_shards(kind, model, out_dir, len(shard_ranges(n_items, cfg.shard_size)), args, cfg, threads)
            out, _ = run_stage(f"synthetic/{name}", out_dir, key, upstream, build, _logger(), headline=set_headline)
        return out

    sets = {
        "source_cars": (source, g.counts.source_cars),
        "target_cars": (target, g.counts.target_cars),
        "target_empty": (target, g.counts.target_empty),
    }
    out: dict[str, Path] = {}
    for k, (name, (domain, count)) in enumerate(sets.items()):
        if count == 0:
            continue
        seed = config.seed + 100_000 * k
        key = {"set": name, "domain": domain, "count": count, "seed": seed, **g.sampling.model_dump()}
        args = {"set_name": name, "domain": domain, "count": count, "base_seed": seed}
        out[name] = sharded(
            name,
            key,
            {"model": model_stage},
            "set",
            count,
            args,
            sampling,
            lambda o, a=args: generate_set(
                model, o, a["set_name"], a["domain"], a["count"], base_seed=a["base_seed"], config=sampling
            ),
        )
    if g.translation.enabled:
        from aerosynth.data.tileset import open_split

        tcfg = translation_config(
            config, model, g.translation.strength, g.translation.keep_threshold, g.translation.max_tiles
        )
        n = len(open_split(tiles / "source-train"))
        n = min(n, g.translation.max_tiles or n)
        key = {"set": "translation", "domain": target, **g.translation.model_dump(), **g.sampling.model_dump()}
        args = {"source_split": str(tiles / "source-train"), "domain": target, "base_seed": config.seed}
        out["translation"] = sharded(
            "translation",
            key,
            {"model": model_stage, "tiles": tiles},
            "translation",
            n,
            args,
            tcfg,
            lambda o: translate_split(model, tiles / "source-train", o, target, base_seed=config.seed, config=tcfg),
        )
    return out
