"""The report of a run: how far each adapted detector closes the gap to the oracle.

:func:`write_report` writes into one folder::

    report.md              AP50 table (source-only, adapted variants, oracle) with gap closure,
                           AP50:95, P/R/F1 at the F1-optimal threshold, the figures, the manifests
    report.json            the same numbers (and PR curves) for machines
    pr_curves.png          PR curves at IoU 0.5, one per variant (first seed)
    predictions_grid.png   target-test tiles: truth in red, predictions in green, one column per variant
    predictions_holdout_grid.png  held-out flagged tiles (``flag_scores``): flagged "vehicle" framed in red

Without target boxes (``variants`` empty, ``flag_scores`` given) the report has no AP50, no oracle and no PR
curves: its first line gives the handed-over detector's tile-level AP on held-out flagged tiles against
source-only's, and its table the flag-level figures of :mod:`aerosynth.detection.flag_scores`. With boxes
and ``flag_scores``, both tables.

Gap closure of an adapted variant is :func:`aerosynth.detection.closure.gap_closure`, the one definition:
``(mean AP50_adapted - mean AP50_source) / (mean AP50_oracle - mean AP50_source)`` over the seeds the three
share, with its paired bootstrap 95 % interval from two seeds on. It is always measured against the oracle
(the variant named ``oracle``); the capped oracle ``oracle-paired`` (one fine-tune's budget), when a run has
it, is a row of its own with role ``oracle-paired`` and no closure. The other figures are mean +- sample
standard deviation (ddof 1) over a variant's seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from aerosynth.data.atomic import atomic_output_path, atomic_write_json, atomic_write_text
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import write_png
from aerosynth.data.tileset import LabelledTileSplit, WeakTileSplit
from aerosynth.detection.closure import GapClosure, gap_closure
from aerosynth.detection.evaluation import EvaluationResult

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PR_PNG = "pr_curves.png"
GRID_PNG = "predictions_grid.png"
HOLDOUT_GRID_PNG = "predictions_holdout_grid.png"
#: Suffix of the capped oracle's name (``oracle-paired``): listed beside the oracle, never the closure's reference.
PAIRED_ORACLE_SUFFIX = "-paired"


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (0 for one value) and count."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
        if v.size == 0:
            return cls(float("nan"), float("nan"), 0)
        return cls(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def to_dict(self) -> dict:
        return {"mean": None if self.n == 0 else self.mean, "std": None if self.n == 0 else self.std, "n": self.n}


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _order(names: Sequence[str], source_only: str, last: Sequence[str] = ()) -> list[str]:
    """Source-only first, the other names in their order, then ``last`` (in its order)."""
    middle = [n for n in names if n != source_only and n not in last]
    return [n for n in [source_only] if n in names] + middle + [n for n in last if n in names]


def _role(name: str, source_only: str, oracle: str) -> str:
    if name == source_only:
        return "source-only"
    if name == oracle:
        return "oracle"
    return "oracle-paired" if name == oracle + PAIRED_ORACLE_SUFFIX else "adapted"


def _ap50_by_seed(
    variants: Mapping[str, Sequence[EvaluationResult]], seeds: Mapping[str, Sequence[int | str]] | None
) -> dict[str, dict[str, float]]:
    """Per variant, AP50 by seed name: ``seeds[name]`` where given, else the results' positions (``"0"``, ...)."""
    out = {}
    for name, res in variants.items():
        names = [str(s) for s in (seeds or {}).get(name, range(len(res)))]
        if len(names) != len(res) or len(set(names)) != len(names):
            raise InputError(f"seeds[{name}]", f"{len(names)} seed names (distinct?) for {len(res)} results")
        out[name] = {s: r.ap50 for s, r in zip(names, res, strict=True)}
    return out


def summarise(
    variants: Mapping[str, Sequence[EvaluationResult]],
    source_only: str = "source-only",
    oracle: str = "oracle",
    seeds: Mapping[str, Sequence[int | str]] | None = None,
) -> list[dict]:
    """One row per variant: role, AP50, AP50:95, P, R, F1 (mean/std over seeds) and gap closure.

    Rows come source-only first, the adapted variants in their order, then ``oracle-paired`` and ``oracle``.
    An adapted row's ``gap_closure`` is :func:`~aerosynth.detection.closure.gap_closure` of its AP50 against
    source-only's and ``oracle``'s over the seeds the three share (``n/a`` without both); other rows have none.

    Args:
        variants: evaluation results per variant name, one per seed.
        source_only: name of the source-only baseline in ``variants``.
        oracle: name of the oracle the closure is measured against.
        seeds: per variant, the seed of each result (same order), which pairs the seeds of the closure;
            a variant not named pairs by position (its i-th result with the others' i-th).
    """
    ap50 = _ap50_by_seed(variants, seeds)
    rows = []
    for name in _order(list(variants), source_only, [oracle + PAIRED_ORACLE_SUFFIX, oracle]):
        res = list(variants[name])
        if not res:
            raise InputError(f"variants[{name}]", "no evaluation result")
        role = _role(name, source_only, oracle)
        closure = None
        if role == "adapted":
            closure = gap_closure(ap50[name], ap50.get(source_only, {}), ap50.get(oracle, {}))
        row = {
            "variant": name,
            "role": role,
            "seeds": len(res),
            "ap50": Stat.of([r.ap50 for r in res]),
            "ap50_95": Stat.of([r.ap50_95 for r in res]),
            "precision": Stat.of([r.precision for r in res]),
            "recall": Stat.of([r.recall for r in res]),
            "f1": Stat.of([r.f1 for r in res]),
            "gap_closure": closure,
        }
        rows.append(row)
    return rows


# ------------------------------------------------------------------- figures
def plot_pr_curves(variants: Mapping[str, Sequence[EvaluationResult]], out_png: str | Path) -> Path:
    """PR curves at IoU 0.5 of every variant (its first seed) in one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    for name, res in variants.items():
        if not res:
            continue
        c = res[0].pr_curve
        r = np.concatenate([[0.0], c.recall]) if len(c.recall) else np.zeros(1)
        p = np.concatenate([[1.0], c.precision]) if len(c.precision) else np.ones(1)
        ax.plot(r, p, label=f"{name} (AP50 {res[0].ap50:.3f})", linewidth=1.5)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("PR curves, IoU 0.5")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_output_path(out_png, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out_png)


def _draw(img: np.ndarray, dets: Detections, colour: tuple[int, int, int], scale: int) -> None:
    for x1, y1, x2, y2 in dets.xyxy:
        p1 = (int(round(x1 * scale)), int(round(y1 * scale)))
        p2 = (int(round(x2 * scale)) - 1, int(round(y2 * scale)) - 1)
        cv2.rectangle(img, p1, p2, colour, 1)


def write_prediction_grid(
    split: LabelledTileSplit | WeakTileSplit,
    predictions: Mapping[str, Sequence[Detections]],
    out_png: str | Path,
    thresholds: Mapping[str, float] | None = None,
    tiles: int = 8,
    scale: int = 2,
) -> Path:
    """A grid of tiles (rows) by variants (columns): truth in red, predictions above threshold in green.

    Args:
        split: the split the predictions belong to (``split.tiles`` order): labelled (its boxes drawn) or
            weak (a tile flagged "vehicle" framed in red).
        predictions: per variant, one :class:`Detections` per tile.
        out_png: the PNG to write.
        thresholds: per variant the lowest confidence drawn (default 0.25).
        tiles: number of rows: tiles with vehicles first, then empty ones.
        scale: pixel zoom.
    """
    thresholds = dict(thresholds or {})
    boxes = isinstance(split, LabelledTileSplit)
    with_cars = [i for i, t in enumerate(split.tiles) if (len(split.labels(t.tile_id)) if boxes else t.has_vehicle)]
    empty = [i for i in range(len(split.tiles)) if i not in set(with_cars)]
    n_cars = min(len(with_cars), max(tiles - min(len(empty), max(tiles // 4, 1)), 0))
    rows = with_cars[:n_cars] + empty[: tiles - n_cars]
    names = list(predictions)
    for name in names:
        if len(predictions[name]) != len(split.tiles):
            raise InputError(f"predictions[{name}]", f"{len(predictions[name])} entries for {len(split.tiles)} tiles")
    size = split.info.tile_size * scale
    pad = 4
    head = 18  # a header row with the variant names (OpenCV's built-in Hershey font: nothing to fetch)
    grid = np.full((head + len(rows) * (size + pad), max(len(names), 1) * (size + pad), 3), 255, np.uint8)
    for c, name in enumerate(names):
        cv2.putText(grid, name[:24], (c * (size + pad) + 2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for r, i in enumerate(rows):
        tile = split.tiles[i]
        img = split.image(tile.tile_id)
        img = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
        truth = split.labels(tile.tile_id) if boxes else None
        for c, name in enumerate(names or [""]):
            cell = np.ascontiguousarray(img.copy())
            if truth is not None:
                _draw(cell, truth, (255, 0, 0), scale)
            elif tile.has_vehicle:
                cv2.rectangle(cell, (0, 0), (cell.shape[1] - 1, cell.shape[0] - 1), (255, 0, 0), 2)
            if name:
                _draw(cell, predictions[name][i].filter_confidence(thresholds.get(name, 0.25)), (0, 255, 0), scale)
            h, w = cell.shape[:2]
            y = head + r * (size + pad)
            grid[y : y + h, c * (size + pad) : c * (size + pad) + w] = cell
    return write_png(out_png, grid)


# ------------------------------------------------------------------- report
def write_report(
    out_dir: str | Path,
    variants: Mapping[str, Sequence[EvaluationResult]],
    source_only: str = "source-only",
    oracle: str = "oracle",
    split: LabelledTileSplit | None = None,
    predictions: Mapping[str, Sequence[Detections]] | None = None,
    manifests: Sequence[str | Path] = (),
    title: str = "aerosynth: detection on the target domain",
    grid_tiles: int = 8,
    diagnostics: Mapping | None = None,
    handed_over: Mapping | None = None,
    how_chosen: Sequence[str] = (),
    flag_scores: Mapping[str, Sequence[Mapping]] | None = None,
    holdout: WeakTileSplit | None = None,
    holdout_predictions: Mapping[str, Sequence[Detections]] | None = None,
    agreement: Mapping[str, Mapping] | None = None,
    wall_time: Mapping | None = None,
    not_run: Sequence[str] = (),
    seeds: Mapping[str, Sequence[int | str]] | None = None,
    unscored: Sequence[str] = (),
) -> Path:
    """Write ``report.md``, ``report.json`` and the figures; return the markdown path.

    With ``handed_over`` the report opens with the answer: its first line names the detector handed over
    and its AP50 against source-only (:func:`handed_over_lines`); the title follows.

    Args:
        out_dir: report folder.
        variants: evaluation results per variant name, one per seed.
        source_only: name of the source-only baseline in ``variants``.
        oracle: name of the oracle (trained on target labels) in ``variants``.
        split: the evaluated split (for the prediction grid).
        predictions: per variant, detections per tile of ``split`` (one seed) for the grid.
        manifests: config and data manifests behind the run, listed with their sha256.
        title: first heading.
        grid_tiles: rows of the prediction grid.
        diagnostics: label-free checks of the synthetic sets (see :func:`diagnostics_lines`): a table in
            ``report.md`` and the document under ``synthetic_diagnostics`` in ``report.json``.
        handed_over: the detector a run hands over: ``{"variant", "seed", "path"}`` and optionally ``"ap50"``
            (that seed's own) and ``"kind"``; ``variant`` must be one of ``variants``.
        how_chosen: markdown lines of a section "How it was chosen" below the table (none when empty).
        flag_scores: per variant, one :meth:`~aerosynth.detection.flag_scores.FlagScores.to_dict` per seed
            (``tile_ap``, ``auroc``, ``vehicles_per_tile``; ``None`` with a ``note`` where not defined), on
            ``holdout``. Without boxes (``variants`` empty) the report's figures are these.
        holdout: the held-out flagged tiles ``flag_scores`` were measured on (for their grid).
        holdout_predictions: per variant, detections per tile of ``holdout`` (one seed) for its grid.
        agreement: per self-training round, its labels' agreement with the round before (``with``, ``f1``, ...).
        wall_time: ``{"run_s", "stages_s"}``: this run's wall time and the summed time of its stages.
        not_run: markdown lines naming what the run left out (the comparisons it did not train).
        seeds: per variant, the seed of each of its results in ``variants`` (same order): the gap closure
            pairs seeds by these names; without, by position (see :func:`summarise`).
        unscored: the variants a run trained but could not score (a target without boxes whose flags were
            derived, ``data.flags: none``): the report says so and keeps the label-free checks.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flag_scores = dict(flag_scores or {})
    if not variants and not flag_scores and not unscored:
        raise InputError("variants", "no evaluation result: neither AP50 (target boxes) nor flag-level figures")
    rows = summarise(variants, source_only, oracle, seeds) if variants else []
    flag_rows = summarise_flags(flag_scores, source_only)
    if rows:
        plot_pr_curves({r["variant"]: variants[r["variant"]] for r in rows}, out_dir / PR_PNG)
    grid = holdout_grid = None
    if split is not None and predictions:
        thr = {n: variants[n][0].threshold for n in predictions if variants.get(n)}
        grid = write_prediction_grid(split, predictions, out_dir / GRID_PNG, thr, grid_tiles)
    if holdout is not None and holdout_predictions:
        thr = {n: variants[n][0].threshold for n in holdout_predictions if variants.get(n)}
        holdout_grid = write_prediction_grid(holdout, holdout_predictions, out_dir / HOLDOUT_GRID_PNG, thr, grid_tiles)
    listed = [{"path": str(Path(m)), "sha256": _sha256(Path(m))} for m in manifests]

    if handed_over is not None:
        if handed_over["variant"] not in (variants if rows else flag_scores if flag_rows else unscored):
            raise InputError("handed_over", f"{handed_over['variant']!r} is not one of the variants reported")
        evaluated = split.name if split is not None else "target-test"
        if rows:
            opening = handed_over_lines(rows, handed_over, source_only, evaluated)
        elif flag_rows:
            opening = handed_over_flag_lines(flag_rows, handed_over, source_only)
        else:
            opening = [
                f"# Handed over `{handed_over['variant']}`: not scored (no target boxes and no flags: the flags were "
                "derived by the source-only detector, data.flags none)",
                "",
                "No figure here measures the detector against the target; the label agreement and the checks below "
                "need no label. Flag some tiles (`aerosynth flag`) to score it.",
            ]
        lines = [*opening, "", f"The run: {title}.", ""]
    else:
        lines = [f"# {title}", ""]
    if wall_time:
        lines += [wall_time_line(wall_time), ""]
    if handed_over is not None or how_chosen:
        lines += ["## Results", ""]
    if rows:
        lines += ap50_lines(rows, split)
    if flag_rows:
        lines += flag_lines(flag_rows, holdout, boxes=bool(rows))
    if rows:
        lines += [f"![PR curves]({PR_PNG})", ""]
    if grid is not None:
        lines += [f"![predictions (green) and truth (red)]({GRID_PNG})", ""]
    if holdout_grid is not None:
        lines += [f"![held-out tiles: predictions (green), flagged 'vehicle' framed in red]({HOLDOUT_GRID_PNG})", ""]
    if agreement:
        lines += agreement_lines(agreement)
    if how_chosen:
        lines += ["## How it was chosen", "", *how_chosen, ""]
    if not_run:
        lines += ["## Not trained", "", *not_run, ""]
    if diagnostics:
        lines += diagnostics_lines(diagnostics)
    lines += ["## Manifests", ""]
    lines += [f"- `{m['path']}` sha256 `{m['sha256'] or 'missing'}`" for m in listed] or ["- none given"]
    md = atomic_write_text(out_dir / REPORT_MD, "\n".join(lines) + "\n")

    def row_json(r: dict) -> dict:
        out = {k: (v.to_dict() if isinstance(v, (Stat, GapClosure)) else v) for k, v in r.items()}
        out["per_seed"] = [res.to_dict() for res in variants[r["variant"]]]
        return out

    def flag_json(r: dict) -> dict:
        return {**{k: (v.to_dict() if isinstance(v, Stat) else v) for k, v in r.items()}, "per_seed": r["per_seed"]}

    atomic_write_json(
        out_dir / REPORT_JSON,
        {
            "title": title,
            "target_boxes": bool(rows),
            "split": None if split is None else {"name": split.name, "tiles": len(split), "domain": split.info.domain},
            "source_only": source_only,
            "oracle": oracle,
            "variants": [row_json(r) for r in rows],
            "flag_scores": None
            if not flag_rows
            else {
                "split": None if holdout is None else {"name": holdout.name, "tiles": len(holdout)},
                "variants": [flag_json(r) for r in flag_rows],
            },
            "label_agreement": dict(agreement) if agreement else None,
            "wall_time": dict(wall_time) if wall_time else None,
            "figures": {
                "pr_curves": PR_PNG if rows else None,
                "predictions_grid": None if grid is None else GRID_PNG,
                "predictions_holdout_grid": None if holdout_grid is None else HOLDOUT_GRID_PNG,
            },
            "manifests": listed,
            "synthetic_diagnostics": dict(diagnostics) if diagnostics else None,
            "handed_over": dict(handed_over) if handed_over is not None else None,
        },
    )
    return md


def ap50_lines(rows: Sequence[dict], split: LabelledTileSplit | None) -> list[str]:
    """The AP50 section of the report: where it was evaluated, the table of :func:`summarise`'s rows."""
    lines = []
    if split is not None:
        lines += [f"Evaluated on split `{split.name}` ({len(split)} tiles, domain `{split.info.domain}`).", ""]
    lines += [
        "AP50 and AP50:95 are COCO (pycocotools, maxDets 100, ignore regions as iscrowd); P/R/F1 at the",
        "F1-optimal confidence, IoU 0.5. Gap closure = (mean adapted - mean source-only) / (mean oracle -",
        "mean source-only) over the seeds the three share, with its paired bootstrap 95 % interval (2+ seeds).",
        "",
        "| variant | role | seeds | AP50 | AP50:95 | precision | recall | F1 | gap closure |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "" if r["gap_closure"] is None else r["gap_closure"].fmt()
        lines.append(
            f"| {r['variant']} | {r['role']} | {r['seeds']} | {r['ap50'].fmt()} | {r['ap50_95'].fmt()} | "
            f"{r['precision'].fmt()} | {r['recall'].fmt()} | {r['f1'].fmt()} | {gap} |"
        )
    return lines + [""]


def summarise_flags(flag_scores: Mapping[str, Sequence[Mapping]], source_only: str = "source-only") -> list[dict]:
    """One row per variant (source-only first): tile AP, AUROC and vehicles per tile (mean/std over seeds)."""
    rows = []
    for name in _order(list(flag_scores), source_only):
        per_seed = [dict(f) for f in flag_scores[name]]
        rows.append(
            {
                "variant": name,
                "role": "source-only" if name == source_only else "adapted",
                "seeds": len(per_seed),
                "tile_ap": Stat.of([f.get("tile_ap") for f in per_seed]),
                "auroc": Stat.of([f.get("auroc") for f in per_seed]),
                "vehicles_per_tile": Stat.of([f.get("vehicles_per_tile") for f in per_seed]),
                "tiles": per_seed[0].get("tiles") if per_seed else None,
                "flagged": per_seed[0].get("flagged") if per_seed else None,
                "notes": sorted({f["note"] for f in per_seed if f.get("note")}),
                "per_seed": per_seed,
            }
        )
    return rows


def flag_lines(rows: Sequence[dict], holdout: WeakTileSplit | None, boxes: bool) -> list[str]:
    """The flag-level section: what the figures are, on which tiles, and the table of :func:`summarise_flags`."""
    tiles, flagged = rows[0]["tiles"], rows[0]["flagged"]
    where = f"`{holdout.name}`" if holdout is not None else "the held-out tiles"
    lines = [
        "### Flag-level figures" if boxes else "### Flag-level figures (no target boxes: no AP50, no oracle)",
        "",
        f"On {tiles} held-out flagged tiles of {where} ({flagged} flagged 'vehicle'), which no training or "
        "labelling step read. A detector's tile score is its most confident box on the tile; tile AP is the "
        "average precision of that score at finding the flagged tiles, AUROC the chance that a flagged tile "
        "outscores an empty one; vehicles per tile counts boxes at confidence >= "
        f"{rows[0]['per_seed'][0].get('conf', 0.25)}.",
        "",
        "| variant | role | seeds | tile AP | AUROC | vehicles per tile |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['role']} | {r['seeds']} | {r['tile_ap'].fmt()} | {r['auroc'].fmt()} | "
            f"{r['vehicles_per_tile'].fmt(2)} |"
        )
    notes = sorted({n for r in rows for n in r["notes"]})
    return lines + [""] + ([f"- {n}" for n in notes] + [""] if notes else [])


def handed_over_flag_lines(rows: Sequence[dict], handed_over: Mapping, source_only: str = "source-only") -> list[str]:
    """The opening of a report without target boxes: the detector handed over and its tile-level AP.

    Line 1 (a heading): the variant, its tile-level AP on the held-out flagged tiles (mean over its seeds)
    against source-only's, the number of those tiles, and that the target has no boxes.

    Args:
        rows: :func:`summarise_flags`'s rows.
        handed_over: ``{"variant", "seed", "path"}``, optionally ``"kind"``.
        source_only: the baseline's variant name.
    """
    by_name = {r["variant"]: r for r in rows}
    name = handed_over["variant"]
    mine, base = by_name[name]["tile_ap"], by_name.get(source_only, {}).get("tile_ap")
    on = f"on {by_name[name]['tiles']} held-out flagged tiles (no target boxes: no AP50)"
    if name == source_only:
        first = f"# Handed over `{name}` (no adapted detector): tile-level AP {mine.fmt()} {on}"
    elif base is None or base.n == 0 or mine.n == 0:
        first = f"# Handed over `{name}`: tile-level AP {mine.fmt()} {on}"
    else:
        first = f"# Handed over `{name}`: tile-level AP {mine.mean:.3f} against source-only {base.mean:.3f} {on}"
    kind = f" ({handed_over['kind']})" if handed_over.get("kind") else ""
    return [
        first,
        "",
        f"`{handed_over['path']}` is seed {handed_over['seed']} of `{name}`{kind}.",
        f"Tile-level AP above: mean over {mine.n} seed{'s' if mine.n != 1 else ''}; AUROC "
        f"{by_name[name]['auroc'].fmt()}.",
    ]


def agreement_lines(agreement: Mapping[str, Mapping]) -> list[str]:
    """The self-training rounds' label agreement: each round's labels against the round before (box F1)."""
    lines = [
        "## Self-training rounds: label agreement",
        "",
        "Each round's labels of the real target-train tiles against the previous round's (box F1 at IoU 0.5;",
        "no target label read). The rounds stop when it reaches `stop_agreement`.",
        "",
        "| round | against | F1 |",
        "|---|---|---|",
    ]
    for name, doc in agreement.items():
        f1 = doc.get("f1")
        lines.append(f"| {name} | {doc.get('with', '')} | {'n/a' if f1 is None else f'{f1:.3f}'} |")
    return lines + [""]


def wall_time_line(wall_time: Mapping) -> str:
    """One line: the run's wall time and the summed time of its stages (earlier, resumed runs included)."""
    run, stages = wall_time.get("run_s"), wall_time.get("stages_s")
    parts = []
    if run is not None:
        parts.append(f"this run took {run / 60:.1f} min of wall time")
    if stages is not None:
        parts.append(f"its stages {stages / 60:.1f} min in all (summed from their records, earlier runs included)")
    return "Wall time: " + "; ".join(parts) + "."


def handed_over_lines(
    rows: Sequence[dict], handed_over: Mapping, source_only: str = "source-only", split_name: str = "target-test"
) -> list[str]:
    """The report's opening: the detector handed over and its AP50 against source-only, short lines.

    Line 1 (a heading): the variant, its AP50 on the evaluated split (mean over its seeds), source-only's
    and the difference, and, where its gap closure has an interval (two seeds or more shared with
    source-only and the oracle), that closure with its paired bootstrap 95 % interval; then the file and
    the seed handed over (and its own AP50), and the seed counts.

    Args:
        rows: :func:`summarise`'s rows.
        handed_over: ``{"variant", "seed", "path"}``, optionally ``"ap50"`` (the handed seed's) and ``"kind"``.
        source_only: the baseline's variant name.
        split_name: the evaluated split.
    """
    by_name = {r["variant"]: r for r in rows}
    name = handed_over["variant"]
    mine, base = by_name[name]["ap50"], by_name.get(source_only, {}).get("ap50")
    if name == source_only:
        first = f"# Handed over `{name}` (no adapted detector): AP50 {mine.fmt()} on {split_name}"
    elif base is None or base.n == 0:
        first = f"# Handed over `{name}`: AP50 {mine.fmt()} on {split_name} (no source-only to compare)"
    else:
        first = (
            f"# Handed over `{name}`: AP50 {mine.mean:.3f} against source-only {base.mean:.3f} "
            f"({mine.mean - base.mean:+.3f}) on {split_name}"
        )
    closure: GapClosure | None = by_name[name].get("gap_closure")
    quoted = closure is not None and closure.ci95 is not None
    if quoted:
        first += f", gap closure {closure.fmt()}"
    seeds = f"{mine.n} seed{'s' if mine.n != 1 else ''}"
    if base is not None and name != source_only:
        seeds += f" (source-only: {base.n})"
    ap = handed_over.get("ap50")
    own = f", its AP50 {ap:.3f}" if isinstance(ap, float) else ""
    kind = f" ({handed_over['kind']})" if handed_over.get("kind") else ""
    lines = [
        first,
        "",
        f"`{handed_over['path']}` is seed {handed_over['seed']} of `{name}`{kind}{own}.",
        f"AP50 above: mean over {seeds}.",
    ]
    if quoted:
        lines.append(
            f"Gap closure: (mean AP50 - source-only's) / (the oracle's - source-only's) over the "
            f"{len(closure.seeds)} seeds the three share, paired bootstrap 95 % interval."
        )
    return lines


def _number(entry: Mapping | None, key: str) -> str:
    value = None if entry is None else entry.get(key)
    return "n/a" if value is None else f"{value:.3f}"


def diagnostics_lines(diagnostics: Mapping) -> list[str]:
    """The markdown section of the synthetic sets' label-free checks.

    Args:
        diagnostics: ``{"sets": {name: {"images", "real", "two_sample", "agreement", "notes"}},
            "truth_threshold": float | None}``: ``two_sample`` as returned by
            :func:`aerosynth.detection.two_sample.two_sample_accuracy`, ``agreement`` as returned by
            :func:`aerosynth.annotation.agreement.heatmap_agreement` (``None`` when not measured, the
            reason in ``notes``).
    """
    tau = diagnostics.get("truth_threshold")
    lines = [
        "## Synthetic sets: label-free checks",
        "",
        "Two-sample accuracy: held-out accuracy of a small CNN telling real tiles from the set's images",
        "(0.5 = indistinguishable, 1.0 = always told apart). Heat-map agreement with F_S: AP50 of the set's",
        "heat-map boxes (default rule) taking the source-only detector's detections as the truth"
        + ("." if tau is None else f" (confidence >= {tau:.3f},"),
        *([] if tau is None else ["its F1-optimal threshold on real source-val)."]),
        "No target label is read; nothing is chosen with these numbers.",
        "",
        "| synthetic set | images | compared with | two-sample accuracy | held out | "
        "heat-map agreement with F_S (AP50) | F_S boxes |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, entry in diagnostics.get("sets", {}).items():
        ts, ag = entry.get("two_sample"), entry.get("agreement")
        held = "" if ts is None else ts["held_out"]
        fs_boxes = "" if ag is None else ag["truth_boxes"]
        lines.append(
            f"| {name} | {entry.get('images', '')} | {entry.get('real', '')} | {_number(ts, 'accuracy')} | "
            f"{held} | {_number(ag, 'ap50')} | {fs_boxes} |"
        )
        notes += [f"- `{name}`: {n}" for n in entry.get("notes", [])]
    return lines + [""] + (notes + [""] if notes else [])
