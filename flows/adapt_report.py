"""Adapt steps ``diagnostics/`` and ``report/``: synthetic-set diagnostics, the report, its Prefect artifacts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.errors import InputError
from aerosynth.flows.adapt_annotation import SKIPPED_FILE
from aerosynth.flows.adapt_common import ORACLE, SOURCE_ONLY, _logger, _val_split, split_domains
from aerosynth.flows.config import AdaptConfig
from aerosynth.flows.stage_cache import STAGE_RECORD, run_stage


def write_run_report(
    config: AdaptConfig, work: Path, tiles: Path, runs: dict[str, list[Path]], started: float | None = None
) -> Path:
    """Write the run's report, ``WORK/report/report.md`` (returned) and ``report.json``.

    AP50 on target-test where the target has boxes, flag-level figures on ``target-holdout`` where the run
    held flags out, the rounds' label agreement, the wall time (``started``: the run's start, epoch seconds)
    and what a run without ``detection.comparisons`` did not train.
    """
    from aerosynth.data.detections import Detections
    from aerosynth.data.prepare import HOLDOUT_SPLIT
    from aerosynth.data.tileset import open_evaluation_split, open_split
    from aerosynth.detection.evaluation import EvaluationResult
    from aerosynth.detection.report import write_report
    from aerosynth.flows.adapt_detection import HOLDOUT_PREDICTIONS
    from aerosynth.flows.adapt_tiles import target_has_boxes

    metrics = {name: [json.loads((p / "metrics.json").read_text()) for p in paths] for name, paths in runs.items()}
    boxes = target_has_boxes(tiles)
    flag_part = ("figures", "flag_scores")
    results = (
        {
            name: [EvaluationResult.from_dict({k: v for k, v in m.items() if k not in flag_part}) for m in ms]
            for name, ms in metrics.items()
        }
        if boxes
        else {}
    )
    flag_scores = {
        name: [m["flag_scores"] for m in ms] for name, ms in metrics.items() if all("flag_scores" in m for m in ms)
    }
    test = open_evaluation_split(tiles, "target-test") if boxes else None
    holdout = open_split(tiles / HOLDOUT_SPLIT) if flag_scores else None

    def first_seed_predictions(split, file: str) -> dict[str, list]:
        out = {}
        for name, paths in runs.items():
            doc = json.loads((paths[0] / file).read_text())
            out[name] = [Detections.from_coco(doc[t.tile_id]) for t in split]
        return out

    predictions = first_seed_predictions(test, "predictions.json") if test is not None else None
    holdout_predictions = first_seed_predictions(holdout, HOLDOUT_PREDICTIONS) if holdout is not None else None
    agreement = {  # one label set per round, or one per seed and round (relabel_with: own-seed)
        p.parent.relative_to(work / "annotation").as_posix().replace("/", " "): json.loads(p.read_text())
        for p in sorted(
            [*(work / "annotation").glob("*/agreement.json"), *(work / "annotation").glob("*/seed*/agreement.json")]
        )
    }
    stages = [json.loads(p.read_text()).get("seconds") for p in work.rglob(STAGE_RECORD)]
    wall_time = {
        "run_s": None if started is None else round(time.time() - started, 1),
        "stages_s": round(sum(x for x in stages if isinstance(x, (int, float))), 1),
    }
    manifests = [work / "config.yaml", tiles / "manifest.json"] + sorted(
        (work / "annotation").glob("*/dataset/manifest.json")
    )
    title = f"aerosynth {config.name}: {split_domains(tiles)[0]} -> {split_domains(tiles)[1]}"
    handed_over = handed_over_doc(work)
    report = write_report(
        work / "report",
        results,
        SOURCE_ONLY,
        ORACLE,
        seeds={name: [int(p.name.removeprefix("seed")) for p in paths] for name, paths in runs.items()},
        unscored=[n for n, ms in metrics.items() if all(m.get("figures") == "none" for m in ms)],
        split=test,
        predictions=predictions,
        manifests=manifests,
        title=title,
        diagnostics=(
            synthetic_diagnostics(config, work, tiles, runs[SOURCE_ONLY][0])
            if runs.get(SOURCE_ONLY) and config.generation.enabled
            else None
        ),
        handed_over=handed_over,
        how_chosen=how_chosen_lines(config, handed_over, results or flag_scores) if handed_over else (),
        flag_scores=flag_scores,
        holdout=holdout,
        holdout_predictions=holdout_predictions,
        agreement=agreement,
        wall_time=wall_time,
        not_run=not_run_lines(config, boxes),
    )
    extra = {n: work / "annotation" / n / "dataset" for n in ("copy-paste-harmonised", "copy-paste-blended")}
    samples = write_synthetic_samples(
        work / "synthetic",
        report.parent / "synthetic_samples.png",
        extra={n: d for n, d in extra.items() if (d / "heatmaps").is_dir()} or None,
    )
    if samples is not None:
        atomic_write_text(
            report,
            report.read_text() + "\n## Synthetic images\n\nFirst images of each synthetic set, each above its heat map "
            "(R cars, G [v1], B 255 - background); translation images carry the boxes kept from their "
            "source tile, the harmonised copy-paste composites (whole tile, or blended: real background outside "
            "the boxes) the boxes of their pasted vehicles."
            "\n\n![synthetic samples](synthetic_samples.png)\n",
        )
    skipped = work / "annotation" / SKIPPED_FILE
    lines = [f"- `{k}`: {v}" for k, v in sorted(json.loads(skipped.read_text()).items())] if skipped.is_file() else []
    if lines:
        atomic_write_text(report, report.read_text() + "\n## Variants not run\n\n" + "\n".join(lines) + "\n")
    return report


def not_run_lines(config: AdaptConfig, boxes: bool) -> list[str]:
    """What a run without ``detection.comparisons`` left out (none when it ran the comparisons)."""
    d = config.detection
    if d.comparisons if d.comparisons is not None else boxes:
        return []
    lines = [
        f"`detection.comparisons` is {'unset' if d.comparisons is None else 'false'}"
        f"{' and the target has no boxes' if not boxes else ''}: the run trained seed {d.seeds[0]} of the detector "
        "it hands over, its labelled sets and rounds, and source-only. The continued control, the other labelling "
        "methods, copy-paste sets, translation, mixes and further seeds are not trained; set "
        "`detection.comparisons: true` to train them (a rerun keeps every finished stage)."
    ]
    if not boxes:
        lines += ["", "No oracle: it trains on target boxes, and this target has none."]
    return lines


def handed_over_doc(work: Path) -> dict | None:
    """The detector the run hands over (``WORK/detector.json``) as the report takes it, or ``None`` when none."""
    path = work / "detector.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return {
        "variant": doc["variant"],
        "seed": doc["seed"],
        "kind": doc.get("kind"),
        "path": str(work / "detector.pt"),
        "ap50": doc.get("target_test_ap50"),
    }


def how_chosen_lines(config: AdaptConfig, handed_over: dict, results: dict[str, list]) -> list[str]:
    """The report's section on the choice: the rule, then ``detection.recommend`` one variant a line, built or not.

    Args:
        config: the run's config (its ``detection.recommend`` and ``detection.seeds``).
        handed_over: :func:`handed_over_doc`.
        results: the evaluation results of each variant the run built, one per seed; without target boxes,
            their flag-level figures (``tile_ap``) instead.
    """
    from aerosynth.detection.report import Stat

    def figure(r) -> float | None:
        return r.ap50 if hasattr(r, "ap50") else r.get("tile_ap")

    label = "AP50" if any(hasattr(r, "ap50") for rs in results.values() for r in rs) else "tile-level AP"

    order = config.detection.recommend
    name = handed_over["variant"]
    if name in order:
        rule = (
            f"`detector.pt` is the first variant of `detection.recommend` that this run built, seed "
            f"{handed_over['seed']} (the first of `detection.seeds`). The order is fixed before the run and no "
            "target label enters the choice; why this order: benchmarks/README.md."
        )
    else:
        rule = (
            f"No variant of `detection.recommend` was built, so `detector.pt` is `{name}`, seed {handed_over['seed']}."
        )
    lines = [rule, "", f"`detection.recommend`, in order ({label}: mean over seeds, measured after the choice):", ""]
    for i, variant in enumerate(order, 1):
        if variant not in results:
            lines.append(f"{i}. `{variant}`: not built")
            continue
        ap = Stat.of([figure(r) for r in results[variant]]).fmt()
        lines.append(f"{i}. `{variant}`: {'**handed over**' if variant == name else 'built'}, {label} {ap}")
    others = [v for v in results if v not in order]
    if others:
        lines += ["", "Also built, outside the order: " + ", ".join(f"`{v}`" for v in others) + "."]
    return lines


def write_synthetic_samples(
    synthetic: Path, out_png: Path, per_set: int = 8, extra: dict[str, Path] | None = None
) -> Path | None:
    """A grid: for each synthetic set, a row of its first images and a row of their heat maps.

    ``extra``: more sets in the same format by name (the LDM-harmonised copy-paste composites).
    """
    import cv2
    import numpy as np

    from aerosynth.data.detections import Detections
    from aerosynth.data.imageio import read_rgb, write_png

    rows = []
    folders = {n: synthetic / n for n in ("source_cars", "target_cars", "target_empty", "translation")}
    for name, folder in {**folders, **(extra or {})}.items():
        images = sorted((folder / "images").glob("*.png"))[:per_set]
        if not images:
            continue
        tops, bottoms = [], []
        for p in images:
            rgb = read_rgb(p).copy()
            label = folder / "labels" / f"{p.stem}.txt"
            if label.is_file():
                h, w = rgb.shape[:2]
                for x1, y1, x2, y2 in Detections.from_yolo(label.read_text(), w, h).xyxy.astype(int):
                    cv2.rectangle(rgb, (x1, y1), (x2, y2), (255, 0, 0), 1)
            tops.append(rgb)
            bottoms.append(read_rgb(folder / "heatmaps" / p.name))
        while len(tops) < per_set:
            tops.append(np.zeros_like(tops[0]))
            bottoms.append(np.zeros_like(tops[0]))
        band = np.full((18, tops[0].shape[1] * per_set, 3), 255, np.uint8)
        cv2.putText(band, name, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        rows += [band, np.concatenate(tops, 1), np.concatenate(bottoms, 1)]
    if not rows:
        return None
    return write_png(out_png, np.concatenate(rows, 0), palette=True)


def synthetic_diagnostics(config: AdaptConfig, work: Path, tiles: Path, source_only: Path) -> dict:
    """Label-free checks of each synthetic set, for the report (stage ``diagnostics/``; nothing is chosen with them).

    * two-sample accuracy (:mod:`aerosynth.detection.two_sample`): real tiles of the set's domain and kind
      (weak flags: with or without vehicles) against the set's images; 0.5 = indistinguishable;
    * heat-map agreement (:mod:`aerosynth.annotation.agreement`), sets with vehicles: AP50 of the boxes of the
      default heat-map rule (not the run's threshold options, so runs compare) taking F_S's detections
      (``source_only``'s detector, at its F1-optimal confidence on real source-val) as the truth.
    """
    from aerosynth.annotation.agreement import heatmap_agreement, truth_threshold
    from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig
    from aerosynth.annotation.synthetic_set import open_synthetic_set
    from aerosynth.data.tileset import open_split
    from aerosynth.detection.prediction import predict
    from aerosynth.detection.two_sample import two_sample_accuracy

    names = ("source_cars", "target_cars", "target_empty", "translation")
    folders = {n: work / "synthetic" / n for n in names if (work / "synthetic" / n / "stage_done.json").is_file()}
    settings = {"seed": config.seed, "imgsz": config.detection.imgsz}

    def build(out: Path) -> None:
        weights = source_only / "train" / "detector.pt"

        def detect(paths: list[Path]) -> list:
            return predict(weights, paths, conf=0.001, imgsz=config.detection.imgsz, device=config.device)

        val = open_split(_val_split(tiles))
        tau = truth_threshold(
            detect([val.image_path(t.tile_id) for t in val]),
            [val.labels(t.tile_id) for t in val],
            [val.ignore_regions(t.tile_id) for t in val],
        )
        hcfg = HeatmapBoxConfig()  # the default rule (as map-quality's): comparable across runs
        source, target = open_split(tiles / "source-train"), open_split(tiles / "target-train")
        real = {"source_cars": (source, True), "target_cars": (target, True), "target_empty": (target, False)}
        doc: dict[str, Any] = {"truth_threshold": tau, "sets": {}}
        for name, folder in folders.items():
            sset = open_synthetic_set(folder)
            split, flag = real.get(name, (target, True))
            entry: dict[str, Any] = {
                "images": len(sset),
                "real": f"{split.name} ({'with' if flag else 'without'} vehicles)",
                "notes": [],
            }
            images = [sset.image_path(n) for n in sset.names]
            try:
                real_images = [split.image_path(t.tile_id) for t in split if t.has_vehicle == flag]
                entry["two_sample"] = two_sample_accuracy(real_images, images, seed=config.seed)
            except InputError as exc:
                entry["two_sample"] = None
                entry["notes"].append(f"two-sample test not run: {exc}")
            entry["agreement"] = heatmap_agreement(folder, detect(images), hcfg, tau) if sset.with_vehicles else None
            doc["sets"][name] = entry
        atomic_write_json(out / "diagnostics.json", doc)

    out, _ = run_stage(
        "diagnostics", work / "diagnostics", settings, {"source_only": source_only, **folders}, build, _logger()
    )
    return json.loads((out / "diagnostics.json").read_text())


def _publish_artifacts(report_md: Path) -> None:
    """Markdown report and AP50 table as Prefect artifacts (no-op outside a flow run)."""
    try:
        from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

        create_markdown_artifact(report_md.read_text(), key="adapt-report", description="aerosynth adapt report")
        rows = json.loads((report_md.parent / "report.json").read_text()).get("variants", [])
        table = [
            {
                "variant": r["variant"],
                "role": r["role"],
                "AP50": r["ap50"]["mean"],
                "std": r["ap50"]["std"],
                "gap closure": (r.get("gap_closure") or {}).get("ratio_of_means"),
                "gap closure 95 %": (r.get("gap_closure") or {}).get("ci95"),
            }
            for r in rows
        ]
        create_table_artifact(table, key="adapt-ap50", description="AP50 on target-test")
        for png in ("pr_curves.png", "predictions_grid.png"):
            if (report_md.parent / png).is_file():
                create_image_artifact(
                    (report_md.parent / png).resolve().as_uri(),
                    key=f"adapt-{png[:-4].replace('_', '-')}",
                    description=f"{png} of the adapt report",
                )
    except Exception as exc:  # artifacts are a convenience, never a failure
        _logger().warning("could not publish artifacts: %s", exc)
