"""The ``adapt`` flow: tiles -> LDM stages 0/A/B/C -> synthesis -> annotation -> detectors -> report.

Thin orchestration only: every step calls one stage's public function, inside
:func:`aerosynth.flows.stage_cache.run_stage`, so a rerun skips what is finished and a config change
reruns only what depends on it. Each step is a Prefect task with a retry. The steps live by stage in
``adapt_tiles``, ``adapt_generation``, ``adapt_annotation``, ``adapt_detection`` and ``adapt_report``
(shared helpers in ``adapt_common``); this module is the flow, the list of its steps.

Work folder of a run::

    WORK/
      config.yaml                 the validated config
      tiles/                      data.prepare output (manifest.json)
      ldm/stage0|A|B|C/           generation.training outputs (model/, checkpoints/, losses.csv)
      synthetic/<set>/            generation.sampling sets (source_cars, target_cars, target_empty, translation)
      annotation/relay|threshold/ annotation exports (YOLO, COCO, GeoJSON, preview, summary)
      detectors/<variant>/seed<k>/  detection.training outputs + predictions on target-test + metrics.json
                                  (paired design: source-only first, every other variant fine-tuned from it)
      detector.pt, detector.json  the recommended detector (detection.recommend) and its provenance
      report/                     report.md, report.json, PNGs
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from aerosynth.data.atomic import atomic_write_text
from aerosynth.data.errors import InputError
from aerosynth.flows.adapt_annotation import SKIPPED_FILE, annotate, label_real_target, relabel_round
from aerosynth.flows.adapt_common import ORACLE, SOURCE_ONLY, split_domains
from aerosynth.flows.adapt_detection import (
    Variant,
    deliver_detector,
    mixed_variant,
    train_and_evaluate,
    variant_kind,
    variants,
)
from aerosynth.flows.adapt_generation import synthesise, train_ldm
from aerosynth.flows.adapt_report import (
    _publish_artifacts,
    synthetic_diagnostics,
    write_run_report,
    write_synthetic_samples,
)
from aerosynth.flows.adapt_tiles import derive_flags, needs_flag_step, plan_run, prepare_tiles
from aerosynth.flows.config import AdaptConfig, MixBudget, build_config, dump_config
from aerosynth.flows.run_lock import work_lock
from aerosynth.flows.scale import shared_api, task_runner

__all__ = [
    "ORACLE",
    "SKIPPED_FILE",
    "SOURCE_ONLY",
    "Variant",
    "adapt_flow",
    "annotate",
    "annotate_task",
    "label_real_target",
    "prepare_tiles",
    "prepare_tiles_task",
    "report_task",
    "resolve",
    "submit_detectors",
    "run_adapt",
    "split_domains",
    "synthesise",
    "synthetic_diagnostics",
    "train_and_evaluate",
    "train_and_evaluate_task",
    "train_ldm",
    "train_ldm_task",
    "variants",
    "write_run_report",
    "write_synthetic_samples",
]


# ------------------------------------------------------------------------ prefect
_task = task(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
prepare_tiles_task = _task(prepare_tiles)
train_ldm_task = _task(train_ldm)
annotate_task = _task(annotate)
train_and_evaluate_task = _task(train_and_evaluate)
report_task = _task(write_run_report)
deliver_task = _task(deliver_detector)
relabel_task = _task(relabel_round)
derive_flags_task = _task(derive_flags)


def submit_detectors(
    cfg: AdaptConfig, work: Path, tiles: Path, variant: Variant, seeds: list[int], base: dict[int, Path] | None = None
) -> list:
    """One detector task per seed on the flow's task runner (a fine-tuned variant starts from ``base[seed]``)."""
    return [
        train_and_evaluate_task.submit(cfg, work, tiles, variant, s, base.get(s) if variant.finetune and base else None)
        for s in seeds
    ]


def resolve(futures: list) -> list[Path]:
    """Wait for submitted detector tasks; the first failure is raised."""
    return [Path(f.result()) for f in futures]


def self_training_rounds(
    cfg: AdaptConfig, work: Path, tiles: Path, first: str, runs: dict[str, list[Path]], base: dict, seeds: list[int]
) -> tuple[dict[str, list[Path]], dict[str, Path]]:
    """Rounds 2.. of the real-tile variant ``first``: relabel with the last round's detector, fine-tune again.

    Each round's labels come from the first seed's detector of the round before, or every seed's fused
    (``relabel_with: all-seeds``; flags applied, threshold on source-val); every seed fine-tunes from its
    own F_S on them. With ``own-seed`` each seed's detector labels for that seed alone
    (:func:`own_seed_rounds`). Stops after
    ``annotation.real_target.rounds`` or when the labels stop changing (``stop_agreement``). Returns the
    rounds' detectors by variant and their labelled sets by name.
    """
    if cfg.annotation.real_target.relabel_with == "own-seed" and len(seeds) > 1:  # one seed: the first's labels
        return own_seed_rounds(cfg, work, tiles, first, runs, base, seeds)
    out: dict[str, list[Path]] = {}
    labelled: dict[str, Path] = {}
    every_seed = cfg.annotation.real_target.relabel_with == "all-seeds"

    def proposer(detectors: list[Path]) -> Path | list[Path]:
        return detectors if every_seed else detectors[0]

    previous, detector = first.removesuffix("+source"), proposer(runs[first])
    for k in range(2, cfg.annotation.real_target.rounds + 1):
        name, dataset = relabel_task(cfg, work, tiles, previous, detector, k)
        if dataset is None:
            break
        labelled[name] = dataset
        variant = next(v for v in variants(cfg, tiles, {name: dataset}, {}) if v.name == f"{name}+source")
        out[variant.name] = resolve(submit_detectors(cfg, work, tiles, variant, seeds, base))
        previous, detector = name, proposer(out[variant.name])
    return out, labelled


def own_seed_rounds(
    cfg: AdaptConfig, work: Path, tiles: Path, first: str, runs: dict[str, list[Path]], base: dict, seeds: list[int]
) -> tuple[dict[str, list[Path]], dict[str, Path]]:
    """Rounds 2.. with ``relabel_with: own-seed``: each seed's detector of the round before relabels for that seed.

    Seed ``k``'s round-``r`` labels (``annotation/<set>-r<r>/seed<k>``) come from its own round ``r - 1``
    detector, so the spread over seeds includes the labelling. The rounds stop when every seed's labels agree
    with its previous ones at ``stop_agreement``. The labelled set returned under each name (for ``mixes``)
    is the first seed's.
    """
    out: dict[str, list[Path]] = {}
    labelled: dict[str, Path] = {}
    r = cfg.annotation.real_target
    previous = first.removesuffix("+source")
    chain = {s: (work / "annotation" / previous, det) for s, det in zip(seeds, runs[first], strict=True)}
    for k in range(2, r.rounds + 1):
        made = {
            s: relabel_task(cfg, work, tiles, previous, det, k, seed=s, previous_dir=prev, stop=False)
            for s, (prev, det) in chain.items()
        }
        agreement = [json.loads((d.parent / "agreement.json").read_text())["f1"] for _, d in made.values()]
        if min(agreement) >= r.stop_agreement:
            break
        name = next(iter(made.values()))[0]
        futures = []
        for s, (_, dataset) in made.items():
            variant = next(v for v in variants(cfg, tiles, {name: dataset}, {}) if v.name == f"{name}+source")
            futures += submit_detectors(cfg, work, tiles, variant, [s], base)
        out[f"{name}+source"] = resolve(futures)
        labelled[name] = made[seeds[0]][1]
        chain = {s: (made[s][1].parent, det) for s, det in zip(seeds, out[f"{name}+source"], strict=True)}
        previous = name
    return out, labelled


#: Steps after which ``until`` may stop the adapt flow (each one's output is kept; a later run resumes).
UNTIL_STEPS = ("tiles", "ldm", "synthetic", "annotation")


def check_until(until: str | None, name: str = "until") -> None:
    """Refuse a step the adapt flow cannot stop after (``name``: the option as the user gave it)."""
    if until is not None and until not in UNTIL_STEPS:
        raise InputError(name, f"unknown step {until!r} (one of {', '.join(UNTIL_STEPS)})")


@flow(name="adapt", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def adapt_flow(config: dict, until: str | None = None) -> str:
    """The whole adapt job; ``config`` is an :class:`AdaptConfig` document. Returns the report path.

    With ``until`` (one of :data:`UNTIL_STEPS`) the flow stops after that step and returns its folder
    (``tiles``, ``ldm/stage<last>/model``, ``synthetic``, ``annotation``).
    """
    check_until(until)
    started = time.time()
    cfg = build_config(config)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "config.yaml", dump_config(cfg))
    tiles = prepare_tiles_task(cfg, work)
    if until == "tiles":
        return str(tiles)
    cfg = plan_run(cfg, tiles)  # no oracle without target boxes; without comparisons, the recipe's stages only
    d = cfg.detection
    runs: dict[str, list[Path]] = {}
    prepared = tiles  # F_S reads source tiles only: it trains on these whatever the target's flags

    def source_only() -> list[Path]:  # F_S of every seed at once (Dask workers, or one after another in process)
        return resolve(submit_detectors(cfg, work, prepared, variants(cfg, prepared, {}, {})[0], d.seeds))

    rewrite, fs_first = needs_flag_step(cfg)  # flags none, unflagged derived, or a flag budget: tiles-flagged/
    if fs_first:  # F_S first: its boxes flag the target tiles (every later step reads those)
        runs[SOURCE_ONLY] = source_only()
    if rewrite:
        tiles = derive_flags_task(cfg, work, tiles, runs[SOURCE_ONLY][0] if fs_first else None)
    if not cfg.generation.enabled:
        if until in ("ldm", "synthetic"):
            raise InputError("until", f"generation.enabled is false: this run has no {until} step")
        model, sets = None, {}
    else:
        model = train_ldm_task(cfg, work, tiles)
        if until == "ldm":
            return str(model)
        sets = synthesise(cfg, work, tiles, model)
    if until == "synthetic":
        return str(work / "synthetic")
    if SOURCE_ONLY not in runs:
        runs[SOURCE_ONLY] = source_only()
    base = dict(zip(d.seeds, runs[SOURCE_ONLY], strict=True))
    labelled = annotate_task(cfg, work, tiles, sets, runs[SOURCE_ONLY][0], model)
    if until == "annotation":
        return str(work / "annotation")
    adapted_seeds = d.adapted_seeds if d.adapted_seeds is not None else d.seeds
    futures: dict[str, list] = {}
    for variant in variants(cfg, tiles, labelled, sets)[1:]:
        seeds = d.seeds if variant.kind in ("oracle", "control") else adapted_seeds
        futures[variant.name] = submit_detectors(cfg, work, tiles, variant, seeds, base)
    runs.update({name: resolve(fs) for name, fs in futures.items()})
    built = {**labelled, **({"translation": sets["translation"]} if "translation" in sets else {})}
    for first in [n for n in futures if variant_kind(n) == "real"]:  # self-training rounds 2..
        detectors, datasets = self_training_rounds(cfg, work, tiles, first, runs, base, adapted_seeds)
        runs.update(detectors)
        built.update(datasets)
    for spec in d.mixes:  # several labelled sets at once (equal shares, or each its given share and budget)
        names, images = (spec.shares, spec.images) if isinstance(spec, MixBudget) else (spec, None)
        if all(n in built for n in names):
            shares = names if isinstance(names, dict) else None
            mix = mixed_variant(cfg, tiles, {n: built[n] for n in names}, shares, images)
            runs[mix.name] = resolve(submit_detectors(cfg, work, tiles, mix, adapted_seeds, base))
    deliver_task(cfg, work, runs)
    report = report_task(cfg, work, tiles, runs, started)
    _publish_artifacts(report)
    return str(report)


def run_adapt(config: dict | AdaptConfig, until: str | None = None, wait: bool = False) -> Path:
    """Run the adapt flow with the task runner its config names (sequential, processes or Dask); see ``adapt_flow``.

    The run holds its work folder's lock (:func:`aerosynth.flows.run_lock.work_lock`): a second run on
    the same folder is refused (``InputError``), or waits for this one with ``wait``.
    """
    cfg = config if isinstance(config, AdaptConfig) else build_config(config)
    runner = task_runner(cfg.runner, cfg.dask_address, cfg.dask_workers)
    with work_lock(cfg.work_dir, wait=wait), shared_api(cfg.runner, cfg.dask_address):
        return Path(adapt_flow.with_options(task_runner=runner)(cfg.model_dump(mode="json"), until))
