"""Adapt step ``annotation/``: synthetic sets labelled (relay, threshold) and real target tiles labelled."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aerosynth.data.atomic import atomic_write_json
from aerosynth.data.errors import InputError
from aerosynth.flows.adapt_common import _logger, _val_split
from aerosynth.flows.config import AdaptConfig, RealTargetSettings
from aerosynth.flows.stage_cache import run_stage

if TYPE_CHECKING:  # the annotation stage is imported where it is used (its imports are heavy)
    from aerosynth.annotation.real_target import RealTargetConfig


def annotate(
    config: AdaptConfig,
    work: Path,
    tiles: Path,
    sets: dict[str, Path],
    source_only: Path | None = None,
    model: Path | None = None,
) -> dict[str, Path]:
    """Label the synthetic target sets and the real target-train tiles.

    The relay and self-training reuse the source-only detector as F_S when given; the heat-map labels of
    real tiles come from ``model`` (the LDM).
    """
    a = config.annotation
    targets = [sets[k] for k in ("target_cars", "target_empty") if k in sets]
    upstream = {k: v for k, v in sets.items() if k != "translation"}
    out: dict[str, Path] = {}
    if a.relay.enabled and "source_cars" in sets:  # no synthetic sets without an LDM
        from aerosynth.annotation.relay import RelayConfig, run_relay

        rcfg = RelayConfig(
            model=config.detection.model,
            imgsz=config.detection.imgsz,
            seed=config.seed,
            device=config.device,
            **a.relay.model_dump(exclude={"enabled", "reuse_source_only"}),
        )
        fs = source_only / "train" / "detector.pt" if (source_only is not None and a.relay.reuse_source_only) else None
        relay_upstream = {**upstream, "tiles": tiles, **({"source_only": source_only} if fs else {})}
        try:
            stage_dir, _ = run_stage(
                "annotation/relay",
                work / "annotation" / "relay",
                {**rcfg.to_dict(), "reuse_source_only": fs is not None},
                relay_upstream,
                lambda o: run_relay(
                    tiles / "source-train", _val_split(tiles), sets["source_cars"], targets, o, rcfg, source_detector=fs
                ),
                _logger(),
                headline=labels_headline,
            )
            out["relay"] = stage_dir / "dataset"
            _record_skipped(work, "relay", None)
        except InputError as exc:  # e.g. F_S finds no vehicle in the synthetic source images
            _logger().warning("relay skipped: %s", exc)
            _record_skipped(work, "relay", str(exc))
    if a.threshold.enabled and targets:
        from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig, annotate_direct

        hcfg = HeatmapBoxConfig(**a.threshold.options)
        stage_dir, _ = run_stage(
            "annotation/threshold",
            work / "annotation" / "threshold",
            a.threshold.options,
            {k: v for k, v in upstream.items() if k != "source_cars"},
            lambda o: annotate_direct(targets, o / "dataset", hcfg),
            _logger(),
            headline=labels_headline,
        )
        out["threshold"] = stage_dir / "dataset"
    if a.copy_paste.enabled:
        try:
            out["copy-paste"] = copy_paste(config, work, tiles)
            _record_skipped(work, "copy-paste", None)
        except InputError as exc:  # e.g. no target tile flagged empty to paste onto
            _logger().warning("copy-paste skipped: %s", exc)
            _record_skipped(work, "copy-paste", str(exc))
        if "copy-paste" in out and model is not None and a.copy_paste.harmonise_strength > 0:
            out["copy-paste-harmonised"] = harmonise_copy_paste(config, work, tiles, out["copy-paste"], model)
            if a.copy_paste.blend_margin_px is not None:
                out["copy-paste-blended"] = blend_copy_paste(
                    config, work, out["copy-paste"], out["copy-paste-harmonised"]
                )
    if a.real_target.enabled:
        out.update(label_real_target(config, work, tiles, source_only, model))
    return out


def copy_paste(config: AdaptConfig, work: Path, tiles: Path) -> Path:
    """The copy-paste baseline set (``annotation/copy-paste/dataset``): source vehicles on empty target tiles."""
    from aerosynth.annotation.copy_paste import CopyPasteConfig, copy_paste_set

    cpc = CopyPasteConfig(
        **config.annotation.copy_paste.model_dump(exclude={"enabled", "harmonise_strength", *BLEND_FIELDS}),
        seed=config.seed,
    )
    stage_dir, _ = run_stage(
        "annotation/copy-paste",
        work / "annotation" / "copy-paste",
        cpc.to_dict(),
        {"tiles": tiles},
        lambda o: copy_paste_set(tiles / "source-train", tiles / "target-train", o / "dataset", cpc),
        _logger(),
        headline=labels_headline,
    )
    return stage_dir / "dataset"


def harmonise_copy_paste(config: AdaptConfig, work: Path, tiles: Path, dataset: Path, model: Path) -> Path:
    """The copy-paste composites translated by the LDM at ``copy_paste.harmonise_strength``, boxes kept.

    Every composite is encoded, noised to that fraction of the schedule and denoised with the target
    prompt (:func:`aerosynth.generation.sampling.translate_split` with ``keep_threshold`` 0: the boxes are
    the pasted ones, known without any map or target label). Written to
    ``annotation/copy-paste-harmonised/dataset`` with the heat maps of the translation.
    """
    from aerosynth.flows.adapt_common import split_domains
    from aerosynth.flows.adapt_generation import translation_config
    from aerosynth.generation.sampling import translate_split

    cp = config.annotation.copy_paste
    _, target = split_domains(tiles)
    tcfg = translation_config(config, model, cp.harmonise_strength, keep_threshold=0.0)
    key = {"set": "copy-paste-harmonised", "strength": cp.harmonise_strength, **config.generation.sampling.model_dump()}
    stage_dir, _ = run_stage(
        "annotation/copy-paste-harmonised",
        work / "annotation" / "copy-paste-harmonised",
        key,
        {"copy_paste": dataset.parent, "model": model.parent},
        lambda o: translate_split(model, dataset, o / "dataset", target, base_seed=config.seed, config=tcfg),
        _logger(),
    )
    return stage_dir / "dataset"


BLEND_FIELDS = ("blend_margin_px", "blend_feather_px")


def blend_copy_paste(config: AdaptConfig, work: Path, composites: Path, harmonised: Path) -> Path:
    """The harmonised composites with the real background kept outside the pasted boxes
    (``annotation/copy-paste-blended/dataset``, :func:`aerosynth.annotation.copy_paste.blend_set`)."""
    from aerosynth.annotation.copy_paste import blend_set

    cp = config.annotation.copy_paste
    stage_dir, _ = run_stage(
        "annotation/copy-paste-blended",
        work / "annotation" / "copy-paste-blended",
        {"margin_px": cp.blend_margin_px, "feather_px": cp.blend_feather_px},
        {"copy_paste": composites.parent, "harmonised": harmonised.parent},
        lambda o: blend_set(composites, harmonised, o / "dataset", cp.blend_margin_px or 0.0, cp.blend_feather_px),
        _logger(),
    )
    return stage_dir / "dataset"


def labels_headline(stage_dir: Path) -> str:
    """A labelling step's headline for its terminal line: boxes and images of its dataset (``summary.json``)."""
    summary = json.loads((stage_dir / "dataset" / "summary.json").read_text())
    images = summary.get("images", summary.get("tiles"))
    return f"{summary['boxes']} boxes" + ("" if images is None else f" on {images} images")


def relabel_round(
    config: AdaptConfig,
    work: Path,
    tiles: Path,
    previous: str,
    detector: Path | Sequence[Path],
    round_index: int,
    seed: int | None = None,
    previous_dir: Path | None = None,
    stop: bool = True,
) -> tuple[str, Path | None]:
    """One self-training round: the previous round's adapted detector (or detectors, fused) relabels target-train.

    Args:
        previous: the previous round's labelled set (``real-heatmap``, ``real-self-training-r2``, ...).
        detector: the stage folder of the previous round's adapted detector (first seed), or the stage
            folders of every seed's (``relabel_with: all-seeds``: their boxes fused tile by tile).
        round_index: this round's number (2, 3, ...).
        seed: the seed whose detector relabels (``relabel_with: own-seed``): the labels go to
            ``annotation/<name>/seed<k>`` and the key names the seed; ``None``: one set for every seed.
        previous_dir: the previous round's stage folder (default ``annotation/<previous>``); a seed's own
            round-2 labels follow the shared round-1 set, its round-3 labels its own round-2 set.
        stop: apply the stop rule here; ``False`` returns the folder whatever the agreement (the caller
            decides from ``agreement.json``, as ``own-seed`` does over every seed).

    Returns:
        ``(name, dataset)``: ``real-<method>-r<k>`` and its labelled folder, or ``None`` for the folder when
        the labels agree with the previous round's at box F1 >= ``stop_agreement`` (no new round is trained;
        the agreement is in ``annotation/<name>/agreement.json``). Target boxes are never read.
    """
    from aerosynth.annotation.metrics import label_agreement

    r = config.annotation.real_target
    name = f"{re.sub(r'-r[0-9]+$', '', previous)}-r{round_index}"
    detectors = [Path(detector)] if isinstance(detector, (str, Path)) else [Path(d) for d in detector]
    several = len(detectors) > 1  # every seed's detector, their boxes fused
    key = {"method": "self-training", "round": round_index, "relabels": previous, **_label_options(r)}
    if several:  # (one detector keeps the older key)
        key |= {"relabel_with": "all-seeds", "fusion_iou": r.fusion_iou}
    if seed is not None:
        key |= {"relabel_with": "own-seed", "seed": seed}
    previous_dir = previous_dir if previous_dir is not None else work / "annotation" / previous
    folder = work / "annotation" / name / (f"seed{seed}" if seed is not None else "")
    weights = [d / "train" / "detector.pt" for d in detectors]
    proposers = {f"detector{i}": d for i, d in enumerate(detectors)} if several else {"detector": detectors[0]}

    def build(o: Path) -> None:
        label_real_split(
            "self-training",
            tiles / "target-train",
            _val_split(tiles),
            o / "dataset",
            weights if several else weights[0],
            seed=config.seed,
            device=config.device,
            provenance=key,
            threshold_on=r.threshold_on,
            flag_rule=_flag_rule(r),
            fusion_iou=r.fusion_iou,
        )
        agreement = label_agreement(o / "dataset" / "labels", previous_dir / "dataset" / "labels")
        atomic_write_json(o / "agreement.json", {"with": previous, **agreement})

    stage_dir, _ = run_stage(
        f"annotation/{name}" + (f"/seed{seed}" if seed is not None else ""),
        folder,
        key,
        {"tiles": tiles, **proposers, "previous": previous_dir},
        build,
        _logger(),
        headline=lambda o: (
            f"{labels_headline(o)}, F1 {json.loads((o / 'agreement.json').read_text())['f1']:.3f} with {previous}"
        ),
    )
    agreement = json.loads((stage_dir / "agreement.json").read_text())
    if stop and agreement["f1"] >= r.stop_agreement:
        _logger().info(
            "%s: labels agree with %s at F1 %.3f >= %.2f: rounds stop",
            name,
            previous,
            agreement["f1"],
            r.stop_agreement,
        )
        return name, None
    return name, stage_dir / "dataset"


#: A real-tile stage's proposals on source-val and target-train (before threshold and flags).
PROPOSALS_FILE = "proposals.npz"


def label_real_target(
    config: AdaptConfig, work: Path, tiles: Path, source_only: Path | None, model: Path | None
) -> dict[str, Path]:
    """The real target-train tiles labelled from weak flags and F_S's or the LDM's proposals.

    Returns ``{"real-<method>": labelled folder}``; a method whose proposer is missing is skipped.
    """
    from aerosynth.flows.adapt_generation import stage_models

    r = config.annotation.real_target
    out: dict[str, Path] = {}
    # fused reads the readout the heat-map labels chose, so it comes after them
    detector = source_only / "train" / "detector.pt" if source_only is not None else None
    for method in sorted(r.methods, key=lambda m: m == "fused"):
        if method == "self-training":
            if detector is None:
                continue
            proposer: Path | list[Path] = detector
            upstream: dict[str, Path] = {"tiles": tiles, "source_only": source_only}  # type: ignore[dict-item]
            key: dict = {"method": method}
        else:
            if model is None or (method == "fused" and detector is None):
                continue
            # the candidate models: every trained stage (chosen on source-val), or the last one
            proposer = stage_models(config, work, model) if r.heatmap_models == "chosen" else [model]
            # each model's stage folder (model/ inside it)
            upstream = {"tiles": tiles, **{f"model{i}": m.parent for i, m in enumerate(proposer)}}
            key = {
                "method": method,
                "noise_fraction": r.noise_levels(),
                "heatmap_models": r.heatmap_models,
                "heatmap_options": r.heatmap_options,
            }
            if not r.heatmap_options:
                key["readout"] = "chosen on source-val"
        readout = None
        if method == "fused":
            key["fusion_iou"] = r.fusion_iou
            upstream["source_only"] = source_only  # type: ignore[assignment]
            if "real-heatmap" in out:  # the heat-map labels' choice of model, noise level and readout
                upstream["real-heatmap"] = out["real-heatmap"].parent
                proposer, readout = _heatmap_choice(out["real-heatmap"], proposer)
        key.update(_label_options(r))
        # the proposals of the stages current in this run, which fused reads back instead of recomputing
        reuse = {
            kind: out[name].parent / PROPOSALS_FILE
            for kind, name in (("detector", "real-self-training"), ("heatmap", "real-heatmap"))
            if name in out
        }

        def build(
            o: Path,
            method: str = method,
            proposer: Path | list[Path] = proposer,
            key: dict = key,
            readout: tuple | None = readout,
            reuse: dict = reuse,
        ) -> None:
            label_real_split(
                method,
                tiles / "target-train",
                _val_split(tiles),
                o / "dataset",
                proposer,
                readout[0] if readout else r.noise_levels(),
                r.heatmap_options,
                seed=config.seed,
                device=config.device,
                provenance=key,
                threshold_on=r.threshold_on,
                detector=detector,
                readout=readout[1] if readout else None,
                fusion_iou=r.fusion_iou,
                flag_rule=_flag_rule(r),
                proposals=None if method == "fused" else o / PROPOSALS_FILE,
                reuse=reuse if method == "fused" else None,
            )

        stage_dir, _ = run_stage(
            f"annotation/real-{method}",
            work / "annotation" / f"real-{method}",
            key,
            upstream,
            build,
            _logger(),
            headline=labels_headline,
        )
        out[f"real-{method}"] = stage_dir / "dataset"
    return out


def _label_options(r: RealTargetSettings) -> dict:
    """The labelling options that enter a real-tile stage's key when they differ from the first settings
    (so stages made before an option existed stay current)."""
    out: dict = {}
    if r.threshold_on != "all":
        out["threshold_on"] = r.threshold_on
    if r.mask_uncertain is not None:
        out["mask_uncertain"] = r.mask_uncertain
    if r.flagged_without_box != "best-box":
        out["flagged_without_box"] = r.flagged_without_box
    return out


def _flag_rule(r: RealTargetSettings) -> RealTargetConfig:
    """The :class:`~aerosynth.annotation.real_target.RealTargetConfig` of the run's real-tile settings."""
    from aerosynth.annotation.real_target import RealTargetConfig

    return RealTargetConfig(mask_uncertain=r.mask_uncertain, image_level=r.flagged_without_box == "image-level")


def _heatmap_choice(labelled: Path, models: list[Path]) -> tuple[list[Path], tuple[float, dict]]:
    """The model, noise level and readout the heat-map labels in ``labelled`` were made with (its summary)."""
    prov = json.loads((labelled / "summary.json").read_text())["provenance"]
    stage = Path(prov["chosen"]["model"]).parent.name  # e.g. stageA
    chosen = [m for m in models if m.parent.name == stage] or models
    return chosen, (float(prov["chosen"]["noise_fraction"]), prov["source_val_at_threshold"]["readout"])


def label_real_split(
    method: str,
    target_train: Path,
    source_val: Path,
    out: Path,
    proposer: Path | Sequence[Path],
    noise_fraction: float | Sequence[float] = 0.3,
    heatmap_options: dict | None = None,
    seed: int = 0,
    device: str = "cpu",
    provenance: dict | None = None,
    threshold_on: str = "all",
    detector: Path | None = None,
    readout: dict | None = None,
    fusion_iou: float = 0.55,
    flag_rule: RealTargetConfig | None = None,
    proposals: Path | None = None,
    reuse: dict[str, Path] | None = None,
) -> Path:
    """Label a weak target split with one proposer: F_S's detections, the LDM's heat-map boxes, or both fused.

    Args:
        method: ``self-training`` (``proposer`` is a detector ``.pt``), ``heatmap`` (model folders) or
            ``fused`` (``proposer`` the model folder, ``detector`` the detector: their boxes fused by
            :func:`aerosynth.annotation.fusion.fuse_proposers`, the fused confidence thresholded).
        target_train: the weak split to label.
        source_val: the labelled source split the proposer's threshold is chosen on.
        out: the labelled folder written (see :func:`aerosynth.annotation.real_target.label_real_tiles`).
        proposer: the detector (``self-training``; several: their boxes fused tile by tile at ``fusion_iou``),
            or one or more LDM model folders (``heatmap``, ``fused``).
        noise_fraction: noise level(s) of the single UNet pass (``heatmap``, ``fused``).
        heatmap_options: :class:`~aerosynth.annotation.heatmap_boxes.HeatmapBoxConfig` fields (``heatmap``, on
            min-max normalised maps); empty or ``None``: the readout is chosen on ``source_val``
            (:func:`aerosynth.annotation.map_quality.choose_readout`).
        seed: seed of the heat-map noise.
        device: inference device of the detector.
        provenance: recorded in ``summary.json`` beside the proposer's scores on ``source_val``.
        threshold_on: the proposer's threshold is F1-optimal on ``all`` source-val tiles or on those holding
            a vehicle (``flagged``, the condition under which a target tile keeps proposals).
        detector: F_S's weights (``fused`` only).
        readout: a :class:`~aerosynth.annotation.map_quality.MapReadout` document that fixes the heat-map
            readout (``fused`` reuses the one ``heatmap`` chose); wins over ``heatmap_options``.
        fusion_iou: IoU at which a heat-map box and a detection (``fused``), or two detectors' boxes
            (``self-training`` with several), are one vehicle.
        flag_rule: how the flags apply (:class:`~aerosynth.annotation.real_target.RealTargetConfig`: ignore
            regions, image-level tiles); ``None``: the defaults.
        proposals: where to keep the proposer's boxes on both splits (``self-training``, ``heatmap``;
            :func:`~aerosynth.data.detections.save_detection_lists`), for ``fused`` to read back.
        reuse: ``{"detector": file, "heatmap": file}`` written by those stages (``fused``): a file whose
            record matches what ``fused`` would compute (same weights, model, noise level, readout, seed and
            tiles) is read instead of running the proposer again.

    With several models or noise levels, the pair (and the readout) with the best AP50 of heat-map boxes
    on ``source_val`` labels the split (:func:`~aerosynth.annotation.map_quality.choose_map_source`); every
    pair's figure is recorded under ``map_sources``.
    """
    from aerosynth.annotation.real_target import RealTargetConfig, label_real_tiles, source_threshold
    from aerosynth.data.tileset import open_split

    train, val = open_split(target_train), open_split(source_val)
    reuse = reuse or {}
    extra: dict = {}
    if method == "self-training" and not isinstance(proposer, (str, Path)):  # several detectors, fused
        from aerosynth.annotation.fusion import fuse_proposers

        each = [_detector_proposals(Path(p), val, train, device) for p in proposer]
        val_boxes = fuse_proposers([v for v, _ in each], fusion_iou)
        train_boxes = fuse_proposers([t for _, t in each], fusion_iou)
        extra["fusion"] = {"detectors": [str(p) for p in proposer], "iou": fusion_iou, "method": "weighted boxes"}
    elif method == "self-training":
        val_boxes, train_boxes = _detector_proposals(Path(proposer), val, train, device, proposals)  # type: ignore[arg-type]
    elif method in ("heatmap", "fused"):
        stored = _stored_heatmap_proposals(reuse.get("heatmap"), proposer, noise_fraction, readout, val, train, seed)
        if method == "fused" and stored is not None:
            val_boxes, train_boxes, extra = stored
        else:
            val_boxes, train_boxes, extra = _heatmap_proposals(
                proposer, noise_fraction, heatmap_options, readout, val, train, seed, proposals
            )
        if method == "fused":
            from aerosynth.annotation.fusion import fuse_proposers

            if detector is None:
                raise InputError("detector", "fused labels need F_S's weights beside the heat maps")
            det_val, det_train = _detector_proposals(Path(detector), val, train, device, reuse=reuse.get("detector"))
            val_boxes = fuse_proposers([det_val, val_boxes], fusion_iou)
            train_boxes = fuse_proposers([det_train, train_boxes], fusion_iou)
            extra["fusion"] = {"detector": str(detector), "iou": fusion_iou, "method": "weighted boxes fusion"}
    else:
        raise InputError("method", f"unknown labelling method {method!r} (self-training, heatmap or fused)")
    threshold, scores = source_threshold(val_boxes, val, tiles=threshold_on)
    if "readout" in extra:
        scores = {**scores, "readout": extra.pop("readout")}
    return label_real_tiles(
        target_train,
        train_boxes,
        threshold,
        out,
        {"self-training": "detector"}.get(method, method),
        flag_rule or RealTargetConfig(),
        provenance={"source_val_at_threshold": scores, **(provenance or {}), **extra},
    )


def _splits_record(val, train) -> dict:
    """Which tiles, in which order, a stored proposal file covers."""
    ids = [t.tile_id for t in val.tiles] + ["|"] + [t.tile_id for t in train.tiles]
    return {"tiles_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def _read_matching(path: Path | None, record: dict) -> tuple[list, list, dict] | None:
    """The stored ``(val, train)`` proposals of ``path`` when its record equals ``record`` (else ``None``)."""
    from aerosynth.data.detections import load_detection_lists

    if path is None or not Path(path).is_file():
        return None
    lists, meta = load_detection_lists(path)
    if meta.get("record") != record:
        return None
    _logger().info("proposals read from %s", path)
    return lists["val"], lists["train"], meta.get("extra", {})


def _detector_proposals(
    detector: Path, val, train, device: str, store: Path | None = None, reuse: Path | None = None
) -> tuple[list, list]:
    """A detector's boxes with confidences on every tile of source-val and of target-train.

    ``store``: keep them there; ``reuse``: read them from such a file when it holds the same weights' boxes
    on the same tiles.
    """
    from aerosynth.data.detections import save_detection_lists
    from aerosynth.data.manifest import file_sha256
    from aerosynth.detection.prediction import predict_split

    if store is None and reuse is None:
        return predict_split(detector, val, device=device), predict_split(detector, train, device=device)
    record = {
        "proposer": "detector",
        "weights_sha256": file_sha256(detector),
        "device": device,
        **_splits_record(val, train),
    }
    stored = _read_matching(reuse, record)
    if stored is not None:
        return stored[0], stored[1]
    val_boxes, train_boxes = predict_split(detector, val, device=device), predict_split(detector, train, device=device)
    if store is not None:
        save_detection_lists(store, {"val": val_boxes, "train": train_boxes}, {"record": record})
    return val_boxes, train_boxes


def _heatmap_record(model_dir: Path, level: float, readout: dict, seed: int, val, train) -> dict:
    return {
        "proposer": "heatmap",
        "model": str(model_dir),
        "noise_fraction": float(level),
        "readout": readout,
        "seed": seed,
        **_splits_record(val, train),
    }


def _stored_heatmap_proposals(
    path: Path | None, proposer, noise_fraction, readout: dict | None, val, train, seed: int
) -> tuple[list, list, dict] | None:
    """Heat-map proposals of the one (model, noise level, readout) given, read from ``path`` if stored there."""
    models = [proposer] if isinstance(proposer, (str, Path)) else list(proposer)
    if path is None or readout is None or len(models) != 1 or not isinstance(noise_fraction, (int, float)):
        return None
    return _read_matching(path, _heatmap_record(Path(models[0]), noise_fraction, readout, seed, val, train))


def _heatmap_proposals(
    proposer: Path | Sequence[Path],
    noise_fraction: float | Sequence[float],
    heatmap_options: dict | None,
    readout: dict | None,
    val,
    train,
    seed: int,
    store: Path | None = None,
) -> tuple[list, list, dict]:
    """Heat-map boxes of source-val and target-train from the (model, noise level, readout) best on source-val.

    ``store``: keep the chosen pair's boxes there (what ``fused`` reads back, with that pair's record).
    """
    from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig
    from aerosynth.annotation.map_quality import MapReadout, choose_map_source, memoised
    from aerosynth.annotation.real_target import heatmap_proposals
    from aerosynth.generation.models import load_ldm
    from aerosynth.generation.real_maps import cars_map_function

    models = [Path(proposer)] if isinstance(proposer, (str, Path)) else [Path(p) for p in proposer]
    levels = [float(noise_fraction)] if isinstance(noise_fraction, (int, float)) else list(noise_fraction)
    if not models or not levels:
        raise InputError("proposer", "no model or noise level to read heat maps from")
    sources, pairs = {}, {}
    for model_dir in models:
        ldm = load_ldm(model_dir)
        cache: dict = {}  # each source-val tile encoded once per model
        for level in levels:
            name = f"{model_dir.parent.name}@{level:g}"  # e.g. stageA@0.1
            sources[name] = memoised(cars_map_function(ldm, val.info.domain, level, seed=seed, encode_cache=cache))
            pairs[name] = (ldm, model_dir, level)
    if readout:
        candidates = [MapReadout.from_dict(readout)]
    elif heatmap_options:
        candidates = [MapReadout("minmax", HeatmapBoxConfig(**heatmap_options).validate())]
    else:
        candidates = None
    name, chosen, report = choose_map_source(val, sources, candidates=candidates)
    ldm, model_dir, level = pairs[name]
    val_boxes = heatmap_proposals(val, sources[name], chosen.config, chosen.normalise)
    train_maps = cars_map_function(ldm, train.info.domain, level, seed=seed)
    train_boxes = heatmap_proposals(train, train_maps, chosen.config, chosen.normalise)
    extra = {
        "chosen": {"model": str(model_dir), "noise_fraction": level},
        "map_sources": {k: round(v["ap50"], 4) for k, v in report["sources"].items()},
        "readout": chosen.to_dict(),
    }
    if store is not None:
        from aerosynth.data.detections import save_detection_lists

        # what fused records when it reads them back: its one pair's source-val AP50
        stored_extra = {**extra, "map_sources": {name: extra["map_sources"][name]}}
        record = _heatmap_record(model_dir, level, chosen.to_dict(), seed, val, train)
        save_detection_lists(store, {"val": val_boxes, "train": train_boxes}, {"record": record, "extra": stored_extra})
    return val_boxes, train_boxes, extra


SKIPPED_FILE = "skipped.json"


def _record_skipped(work: Path, variant: str, reason: str | None) -> None:
    """Note (or, with ``reason=None``, forget) why a variant could not be built; the report lists it."""
    path = work / "annotation" / SKIPPED_FILE
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if reason is None:
        doc.pop(variant, None)
    else:
        doc[variant] = reason
    atomic_write_json(path, doc)
