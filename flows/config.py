"""The one YAML config of an adapt run, validated by pydantic (an unknown key is an error naming it).

Presets ``demo`` (the embedded demo on the tiny model, for a CPU), ``cpu-bench``
(protocol aerial-v1 on 2 cores) and ``gpu`` (aerial-v1 with bigger budgets on a CUDA GPU) are
starting points; a config file names one with ``preset:`` and overrides any field.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aerosynth.data.errors import InputError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class DataSettings(Strict):
    """Where the tiles come from (see ``aerosynth data prepare``)."""

    preset: Literal["demo", "aerial-v1", "aerial-v1-minsk", "custom"] = "demo"
    aerial_root: Path | None = None
    demo_scenes: int = Field(4, ge=2)
    demo_size: int = Field(384, ge=128)
    source: Path | None = None
    target: Path | None = None
    source_gsd: float | None = Field(None, gt=0)
    target_gsd: float | None = Field(None, gt=0)
    val_groups: list[str] = []
    test_groups: list[str] = []
    train_groups: list[str] = []
    exclude_groups: list[str] = []
    bands: list[int] | None = None
    # vehicle classes of multi-class custom labels (YOLO ids / COCO category ids, or names from data.yaml or
    # the COCO categories); None (default): class 0 only, other ids refused (as `aerosynth data prepare
    # --classes`); an empty list, or an id or name no domain has, is refused
    classes: list[int | str] | None = Field(None, min_length=1)
    gsd: float = Field(0.125, gt=0)
    tile_size: int = Field(128, ge=32)
    # a tile of a target without boxes that no flag covers (flags.json/.csv/.geojson in the target folder):
    # refused (naming it), flagged empty, or left out (as `aerosynth data prepare --unflagged`), or `derived`:
    # flagged by the source-only detector as with `flags: none` (an analyst who flagged a share of the tiles);
    # no such tile is held out
    unflagged: Literal["error", "empty", "skip", "derived"] = "error"
    # the share of target-train flags held out of every training and labelling step (split tiles/target-holdout,
    # by group where target-train has several, else by tile with a fixed seed), on which each detector is scored
    # against the flags; None: flows.adapt_tiles.DEFAULT_FLAGS_HOLDOUT for a target without boxes, none with boxes
    flags_holdout: float | None = Field(None, ge=0, lt=1)
    # where the target's flags come from: `given` (flag files, the flagging page, or boxes), or `none` (the
    # source-free setting): the source-only detector's best box per tile, at the threshold that keeps
    # `flag_precision` of the flagged source-val tiles right (annotation.tile_flags); no flag file is read
    flags: Literal["given", "none"] = "given"
    flag_precision: float = Field(0.9, gt=0, le=1)
    # the share of target-train tiles whose given flags are used (an analyst who flagged that many: a seeded
    # draw); the others are left out (`flag_budget_rest: skip`) or flagged by the source-only detector as with
    # `flags: none` (`derived`; with `unflagged: derived` they are derived too)
    flag_budget: float = Field(1.0, gt=0, le=1)
    flag_budget_rest: Literal["skip", "derived"] = "skip"


class StageSettings(Strict):
    """One fine-tuning stage (0, A, B or C); ``steps: 0`` skips it."""

    steps: int = Field(100, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    # None: the stage's own default (generation.training's stage configs; why: benchmarks/README.md)
    learning_rate: float | None = Field(None, gt=0)
    # None: stages A and C train the UNet, stage B learns its tokens only (why: benchmarks/README.md)
    train_unet: bool | None = None
    token_learning_rate: float = Field(5e-3, gt=0)
    lora_rank: int = Field(0, ge=0)
    ema_decay: float | None = None
    min_snr_gamma: float | None = 5.0
    checkpoint_every: int = Field(50, ge=1)
    max_tiles_per_split: int | None = Field(None, ge=1)
    # box-supervised attention on labelled source tiles, conditioning dropout, text training (stage A)
    lambda_box: float = Field(1.0, ge=0)
    box_loss: Literal["l1", "bce"] = "l1"
    box_max_timestep: float = Field(1.0, gt=0, le=1)
    lambda_empty: float = Field(0.0, ge=0)  # stage A: cars attention off tiles flagged empty (flags only)
    timestep_sampling: Literal["uniform", "high"] = "high"
    # new models only (stage A from a preset): what the UNet predicts, and a schedule ending in pure noise
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    zero_terminal_snr: bool = True
    lambda_present: float = Field(0.0, ge=0)  # flagged tiles without boxes: strongest cars attention pulled up
    cond_dropout: float = Field(0.1, ge=0, lt=1)
    train_text: Literal["none", "embeddings", "encoder"] = "embeddings"


class SamplingSettings(Strict):
    """How synthetic images are sampled from the LDM.

    ``steps`` denoising steps of ``scheduler``; ``guidance_scale`` classifier-free guidance,
    ``guidance_rescale`` (0: off) its rescaling; ``batch_size`` images per UNet batch and ``shard_size``
    images per shard (the unit a resumed run skips). Fewer steps make a quicker, rougher set (the CPU presets
    use fewer); lower ``batch_size`` when memory runs short.
    """

    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(4.0, ge=1.0)
    guidance_rescale: float = Field(0.0, ge=0, le=1)
    scheduler: Literal["ddim", "dpm", "euler", "pndm"] = "ddim"
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(32, ge=1)


class SetCounts(Strict):
    """How many synthetic images of each set are generated: source-style tiles with cars, target-style
    tiles with cars, target-style tiles without. More images give the synthetic variants more to
    train on at a proportional synthesis cost."""

    source_cars: int = Field(32, ge=1)
    target_cars: int = Field(32, ge=1)
    target_empty: int = Field(16, ge=0)


class TranslationSettings(Strict):
    """Source-train tiles translated to the target style (noised to ``strength`` of the schedule and
    denoised with the target prompt), their boxes kept: variant ``translation+source``. ``max_tiles``
    (all by default) caps the tiles translated, for a quicker run; ``enabled: false`` skips the set."""

    enabled: bool = True
    strength: float = Field(0.5, gt=0, le=1)
    # the heat-map score a translated source box needs to be kept; 0 (default) keeps every box: raise it only
    # with an LDM whose maps are known to be good on the target (figures: benchmarks/README.md)
    keep_threshold: float = Field(0.0, ge=0, le=1)
    max_tiles: int | None = Field(None, ge=1)


class GenerationSettings(Strict):
    """The latent diffusion model and what it synthesises.

    ``model`` is a preset built from config; ``pretrained_dir`` a local Stable Diffusion 1.x folder
    to start stage A from (``image_size``: its training side; tiles are resized);
    ``init_model`` an aerosynth model folder to continue from (e.g. one fine-tuned on several GPUs
    with ``aerosynth.generation.train_cli``). ``enabled: false`` runs without an LDM: no synthetic sets and no
    heat-map labels; the real target tiles are labelled by F_S and their weak flags only.
    """

    enabled: bool = True
    model: Literal["tiny", "cpu", "sd15"] = "tiny"
    pretrained_dir: Path | None = None
    image_size: int | None = Field(None, ge=64)
    init_model: Path | None = None
    autoencoder_dir: Path | None = None
    stage0: StageSettings = StageSettings(steps=0)
    stage_a: StageSettings = StageSettings()
    stage_b: StageSettings = StageSettings()
    stage_c: StageSettings = StageSettings()
    sampling: SamplingSettings = SamplingSettings()
    counts: SetCounts = SetCounts()
    translation: TranslationSettings = TranslationSettings()


class ThresholdSettings(Strict):
    """The direct method (heat map -> boxes); fields of ``aerosynth.annotation.heatmap_boxes.HeatmapBoxConfig``."""

    enabled: bool = True
    options: dict[str, Any] = {}


class RelaySettings(Strict):
    """The AGenDA relay; fields of ``aerosynth.annotation.relay.RelayConfig``."""

    enabled: bool = True
    source_epochs: int = Field(10, ge=1)
    heatmap_epochs: int = Field(10, ge=1)
    patience: int = Field(5, ge=1)
    batch: int = Field(16, ge=1)
    augment: bool = True
    reuse_source_only: bool = True


#: A noise level of one UNet pass over a real tile, as a fraction of the training schedule.
NoiseFraction = Annotated[float, Field(gt=0, le=1)]


class RealTargetSettings(Strict):
    """The real target-train tiles labelled without target boxes (``aerosynth.annotation.real_target``).

    Each method labels the tiles and becomes a variant ``real-<method>+source`` trained with real source
    tiles. Tiles flagged empty get no box; a proposer's threshold is its F1-optimal confidence on real
    source-val. Why each default: benchmarks/README.md, "Where the defaults come from".

    ``methods`` (default ``[self-training, heatmap]``): ``self-training``: F_S (the source-only detector)
    proposes boxes; ``heatmap``: the LDM's "cars" map of the real tile (one UNet pass at a noise level), read
    by the readout with the best AP50 on real source-val unless ``heatmap_options`` fixes one (needs the LDM,
    ``generation.enabled``); ``fused``: both proposers' boxes fused tile by tile by weighted boxes fusion
    (boxes overlapping at IoU >= ``fusion_iou`` are one vehicle; a box only one proposer
    found keeps half its confidence). Without an LDM only ``self-training`` runs.

    ``heatmap_models`` (default ``chosen``): the model (each trained LDM stage: A, B, C) and the noise level
    (a list in ``noise_fraction``) are chosen on real source-val; ``last`` reads the
    last stage's model only (the noise level still chosen): fewer maps to compute on a slow machine.

    ``threshold_on`` (default ``flagged``): each proposer's threshold is chosen on the source-val tiles that
    hold a vehicle, the condition under which a target tile keeps proposals (its flag says "vehicle");
    ``all`` uses every source-val tile (when the source-val tiles with vehicles are too few to choose on).

    ``rounds``: self-training rounds. From round 2 the adapted detector of the round before
    (``relabel_with``) relabels each method's tiles (flags applied, threshold chosen again on source-val) and a variant
    ``real-<method>-r<k>+source`` is fine-tuned from F_S on those labels. The rounds stop early when a
    round's labels agree with the previous round's at box F1 >= ``stop_agreement`` (the
    labels have stopped changing, no target label read). Each round costs one more detector per method and
    seed: lower it for a quick run, raise it when the labels still change at the last round.

    ``relabel_with`` (default ``own-seed``): which detectors of the round before relabel. ``own-seed``: each
    seed's detector relabels for that seed alone (``annotation/<set>-r<k>/seed<s>/``; with one seed, the first
    seed's set as ``first-seed`` writes it), so the spread over seeds includes the labelling; ``first-seed``:
    the first seed's detector labels for every seed (as the runs before the scoreboard did); ``all-seeds``
    fuses every seed's detections tile by tile (weighted boxes fusion at ``fusion_iou``; a box k of n
    detectors found keeps k/n of its mean confidence), thresholded on source-val like one detector's
    (its figures: benchmarks/README.md).

    ``mask_uncertain`` (default ``null``, none): a fraction, e.g. 0.5: the proposals of a flagged tile that
    the threshold dropped but that reach this fraction of it are painted over with the tile's mean colour
    (ignore regions), so the detector is taught neither "car" nor "background" where the proposer was
    unsure.

    ``flagged_without_box``: what a tile flagged "vehicle" gets when none of its proposals reaches the
    threshold. ``best-box`` (default): its best proposal, forced by the flag. ``image-level``: no box; the
    tile is listed in the labels' ``image_level.json`` and the detector learns it through an image-level
    loss (at least one anchor scores "vehicle"; none of the tile is taught "background";
    :mod:`aerosynth.detection.image_level`; figures against ``best-box``: benchmarks/README.md).
    """

    enabled: bool = True
    methods: list[Literal["self-training", "heatmap", "fused"]] = ["self-training", "heatmap"]
    fusion_iou: float = Field(0.55, gt=0, le=1)
    mask_uncertain: float | None = Field(None, gt=0, lt=1)
    flagged_without_box: Literal["best-box", "image-level"] = "best-box"
    noise_fraction: NoiseFraction | Annotated[list[NoiseFraction], Field(min_length=1)] = [0.1, 0.3, 0.5]
    heatmap_models: Literal["chosen", "last"] = "chosen"
    heatmap_options: dict[str, Any] = {}

    threshold_on: Literal["all", "flagged"] = "flagged"
    rounds: int = Field(3, ge=1)
    stop_agreement: float = Field(0.95, gt=0, le=1)
    relabel_with: Literal["first-seed", "all-seeds", "own-seed"] = "own-seed"

    def noise_levels(self) -> list[float]:
        """The candidate noise levels, as a list."""
        return [self.noise_fraction] if isinstance(self.noise_fraction, float) else list(self.noise_fraction)


class CopyPasteSettings(Strict):
    """The copy-paste baseline (``aerosynth.annotation.copy_paste``): source vehicle crops pasted onto the
    target-train tiles flagged empty, colours pulled toward the tile's mean; no LDM. Variant ``copy-paste+source``.

    ``harmonise_strength`` > 0 (with an LDM): the composites are also noised to that fraction of the schedule
    and denoised with the target prompt (source-guided translation of the composites, boxes kept from the
    paste): an LDM-made set on real target backgrounds, variant ``copy-paste-harmonised+source``.

    ``blend_margin_px`` (not null, with ``harmonise_strength`` > 0): the harmonised composites again, their
    harmonised pixels kept only within that many pixels of each pasted box (edges blurred by
    ``blend_feather_px``), the real tile elsewhere: variant ``copy-paste-blended+source``. The denoising
    pass smooths the background of a whole tile; this keeps its real texture.
    """

    enabled: bool = False
    harmonise_strength: float = Field(0.0, ge=0, le=1)
    blend_margin_px: float | None = Field(2.0, ge=0)
    blend_feather_px: float = Field(1.5, ge=0)
    min_per_tile: int = Field(1, ge=1)
    max_per_tile: int = Field(4, ge=1)
    colour_pull: float = Field(0.2, ge=0, le=1)
    max_tiles: int | None = Field(None, ge=1)


class AnnotationSettings(Strict):
    threshold: ThresholdSettings = ThresholdSettings()
    copy_paste: CopyPasteSettings = CopyPasteSettings()
    relay: RelaySettings = RelaySettings()
    real_target: RealTargetSettings = RealTargetSettings()


class FinetuneSettings(Strict):
    """Fine-tuning of the seed's source-only detector (the paired design): one budget for every variant.

    Defaults are the paired benchmark's (aerial-v1 items 9-10): ``epochs`` of ``images`` images (half real
    source, half the variant's target data) at ``lr0``, no warm-up, mosaic off in the last epoch.
    """

    epochs: int = Field(3, ge=1)
    images: int = Field(1280, ge=1)  # required: without it each variant's budget would be its dataset's size
    lr0: float = Field(0.002, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)
    close_mosaic: int = Field(1, ge=0)


class MixBudget(Strict):
    """A mix with a training budget of its own (``detection.mixes``): each set's share of ``images``.

    E.g. ``{shares: {real-heatmap-r3: 0.3333, copy-paste-blended: 0.3333}, images: 1920}`` adds the
    synthetic set on top of the ``finetune.images`` of the real labels and source tiles instead of resharing them;
    named ``<set>@<percent>+...+source-<images>img``.
    """

    shares: dict[str, float] = Field(min_length=1)
    images: int = Field(ge=1)


class DetectionSettings(Strict):
    """The final detectors: source-only, each adapted variant, the continued control and the oracle, per seed.

    ``model``: what F_S starts from: an ultralytics model yaml (default ``yolov8n.yaml``: random weights) or a
    local ``.pt`` such as the COCO-pretrained ``yolov8n-coco.pt`` that ``tools/tflite_to_ultralytics.py``
    writes (nothing is downloaded): ultralytics transfers every layer but the three class-logit convolutions,
    new for ``vehicle``. The relay's detectors start from it too. Example: ``benchmarks/configs/pretrained_minsk.yaml``
    (how the ``finetune`` defaults were chosen, and both starts: benchmarks/README.md).
    ``design: paired`` (default): the source-only detector F_S of each seed is trained first (``epochs``,
    ``batch``, ``recipe``, ``checkpoint``, ``max_train_images``); every other variant of that seed, the
    oracle and the ``continued`` control (the same fine-tuning on source tiles only) are fine-tuned from
    it for one shared budget (``finetune``), with ``mix_source_fraction`` real source tiles. ``design:
    independent`` trains every variant from scratch with the source-only settings (the older design).
    ``seeds`` are used for every variant (``adapted_seeds`` narrows the adapted ones). ``threads`` is the
    torch threads of each detector, in every runner, so a run on Dask gives the bytes of a sequential one.
    ``mixes``: extra variants whose target data is several of the run's labelled sets at once, e.g.
    ``[[real-heatmap-r3, copy-paste-harmonised]]`` (each an equal share of the target half; a mix whose sets
    the run did not build is skipped), named ``<set>+<set>+source``; or a mapping of each set to its share
    of all training images, real source tiles the rest, e.g. ``{real-heatmap-r3: 0.5, copy-paste-blended:
    0.25}`` (the labelled real tiles keep the whole target half, the synthetic set takes half the source
    share), named ``<set>@50+<set>@25+source``; or ``{shares: {...}, images: N}`` (:class:`MixBudget`), the
    same shares of a budget of its own, named ``<set>@<percent>+...+source-<N>img``.
    ``recommend`` lists variants in the order the run recommends them: the first one the run built becomes
    ``WORK/detector.pt`` (source-only when none was), so no target label enters the choice. The default: the
    deepest relabelling round first (the stop rule ends the rounds when the labels stop changing), within a
    round heat-map labels, then fused, then F_S's; without real-tile labels, the copy-paste sets (blended,
    harmonised, plain). It may list variants a run does not build; a name no run could build (a typo) is
    refused, as is a mix naming a set this config's enabled methods do not build. Change it to prefer another
    kind of labels, or a mix, for your target (the figures behind the default: benchmarks/README.md).
    ``reference_from``: the work folder of an earlier run whose source-only detectors are reused when
    they were trained with these settings on the same source tiles (their key matches).
    """

    model: str = "yolov8n.yaml"
    design: Literal["paired", "independent"] = "paired"
    epochs: int = Field(10, ge=1)
    patience: int = Field(5, ge=1)
    batch: int = Field(16, ge=1)
    imgsz: int = Field(128, ge=32)
    seeds: list[int] = Field([0], min_length=1)
    adapted_seeds: list[int] | None = None
    max_train_images: int | None = Field(None, ge=1)
    mix_source_fraction: float = Field(0.5, gt=0, lt=1)
    oracle: bool = True
    # the full oracle's images over all its epochs, as a multiple of the handed-over recipe's whole budget
    # (flows.adapt_detection.oracle_budget); benchmarks/scoreboard.py checks whether doubling it still moves
    # the oracle (its check and figures: benchmarks/README.md)
    oracle_budget: float = Field(1.0, ge=1)
    oracle_paired: bool = False
    continued: bool = True
    # the detectors a comparison needs beyond the one handed over (continued control, other labelled sets and
    # methods, every seed); None: true for a target with boxes, false for one with flags only
    comparisons: bool | None = None
    mixes: list[
        Annotated[list[str], Field(min_length=2)] | Annotated[dict[str, float], Field(min_length=1)] | MixBudget
    ] = []
    augment: bool = True
    recipe: Literal["aerosynth", "reference"] = "aerosynth"
    checkpoint: Literal["last", "best"] = "last"
    finetune: FinetuneSettings = FinetuneSettings()
    threads: int = Field(1, ge=1)
    recommend: list[str] = [
        "real-heatmap-r4+source",
        "real-fused-r4+source",
        "real-self-training-r4+source",
        "real-heatmap-r3+source",
        "real-fused-r3+source",
        "real-self-training-r3+source",
        "real-heatmap-r2+source",
        "real-fused-r2+source",
        "real-self-training-r2+source",
        "real-heatmap+source",
        "real-fused+source",
        "real-self-training+source",
        "copy-paste-blended+source",
        "copy-paste-harmonised+source",
        "copy-paste+source",
    ]
    reference_from: Path | None = None

    @field_validator("mixes", mode="before")
    @classmethod
    def _budget_mixes_name_both_keys(cls, mixes: Any) -> Any:
        for mix in mixes if isinstance(mixes, list) else []:
            if isinstance(mix, dict) and {"shares", "images"} & set(mix) and set(mix) != {"shares", "images"}:
                form = "{shares: {set: share, ...}, images: N}"
                raise ValueError(f"a mix with a budget of its own is {form}, got keys {sorted(mix)}")
        return mixes

    @field_validator("mixes")
    @classmethod
    def _shares_leave_room_for_source(cls, mixes: list) -> list:
        for mix in mixes:
            mix = mix.shares if isinstance(mix, MixBudget) else mix
            if isinstance(mix, dict) and not (all(v > 0 for v in mix.values()) and sum(mix.values()) < 1):
                raise ValueError(f"a mix's shares must be positive and sum below 1 (source tiles take the rest): {mix}")
        return mixes


class AdaptConfig(Strict):
    """A whole adapt run."""

    preset: str | None = None
    name: str = "adapt"
    work_dir: Path = Path("runs/adapt")
    seed: int = 0
    device: str = "cpu"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # processes: independent tasks in `dask_workers` local processes (Prefect's process pool); dask: a Dask
    # LocalCluster of that many single-threaded workers, or the cluster at dask_address
    runner: Literal["sequential", "processes", "dask"] = "sequential"
    dask_address: str | None = None
    dask_workers: int = Field(2, ge=1)
    torch_threads: int | None = Field(None, ge=1)
    data: DataSettings = DataSettings()
    generation: GenerationSettings = GenerationSettings()
    annotation: AnnotationSettings = AnnotationSettings()
    detection: DetectionSettings = DetectionSettings()


def _tiny_stage(steps: int, **kw: Any) -> dict:
    return {"steps": steps, "batch_size": 8, "checkpoint_every": 20, "learning_rate": 5e-4, **kw}


PRESETS: dict[str, dict[str, Any]] = {
    # The main job: the embedded demo on the tiny LDM (its wall time: README.md), small scenes per domain;
    # the detector budget goes to three variants: F_S (source-only), then, at once in two worker processes,
    # the real target tiles labelled by F_S with their weak flags and the oracle, each fine-tuned from F_S
    # (half source).
    "demo": {
        "name": "demo",
        "work_dir": "runs/demo",
        "torch_threads": 1,
        "runner": "processes",
        "dask_workers": 2,
        "data": {"preset": "demo", "demo_scenes": 78, "demo_size": 256},
        "generation": {
            "model": "tiny",
            "stage0": _tiny_stage(20, learning_rate=2e-3),
            "stage_a": _tiny_stage(20),
            "stage_b": _tiny_stage(10),
            "stage_c": _tiny_stage(10),
            "sampling": {"steps": 10, "guidance_scale": 3.0, "batch_size": 8, "shard_size": 16},
            "counts": {"source_cars": 16, "target_cars": 16, "target_empty": 8},
            "translation": {"enabled": False},
        },
        "annotation": {
            "relay": {"enabled": False},
            "threshold": {"enabled": False},
            # one round, F_S's labels: the demo stays short (its figures: benchmarks/results/demo.json)
            "real_target": {"methods": ["self-training"], "rounds": 1, "threshold_on": "all"},
        },
        "detection": {
            "epochs": 12,
            "patience": 12,
            "batch": 8,
            "seeds": [0],
            "augment": False,
            "max_train_images": 208,
            "finetune": {"epochs": 7, "images": 208},
            "continued": False,
        },
    },
    # The smallest run that exercises every stage: `aerosynth demo --quick`, the tests.
    "smoke": {
        "name": "smoke",
        "work_dir": "runs/smoke",
        "data": {"preset": "demo", "demo_scenes": 2, "demo_size": 256},
        "generation": {
            "model": "tiny",
            "stage0": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "learning_rate": 2e-3},
            "stage_a": {"steps": 3, "batch_size": 4, "checkpoint_every": 2, "learning_rate": 5e-4},
            "stage_b": {"steps": 3, "batch_size": 4, "checkpoint_every": 2, "learning_rate": 5e-4},
            "stage_c": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "learning_rate": 5e-4},
            "sampling": {"steps": 3, "batch_size": 4, "shard_size": 4},
            "counts": {"source_cars": 4, "target_cars": 4, "target_empty": 2},
        },
        "annotation": {
            "relay": {"source_epochs": 1, "heatmap_epochs": 1, "patience": 1, "augment": False},
            "copy_paste": {"enabled": True},
            "real_target": {"rounds": 2},
        },
        "detection": {
            "epochs": 1,
            "patience": 1,
            "seeds": [0],
            "augment": False,
            "finetune": {"epochs": 1, "images": 32},
        },
    },
    # Protocol aerial-v1 on this 2-core machine (benchmarks/run_aerial_v1.py), TAEF2 autoencoder.
    # aerial-v1 Madison -> Munich (KIT) on 2 CPU cores: the LDM recipe of box_ldm.py's stageA-v, real-tile and
    # synthetic variants, detectors in the paired design (aerial-v1 items 9-10) on three worker processes (the
    # three F_S seeds at once; plain processes rather than Dask workers, for the reason in
    # benchmarks/results/detector_workers.json)
    "cpu-bench": {
        "name": "aerial-v1-cpu",
        "work_dir": "benchmarks/work/aerial-v1-cpu",
        "runner": "processes",
        "dask_workers": 3,
        "data": {"preset": "aerial-v1"},
        "generation": {
            "model": "cpu",
            "autoencoder_dir": "../shared/weights/taef2",
            "stage0": {"steps": 0},
            # the box_ldm.py stageA-v recipe (v-prediction, zero terminal SNR, high-noise timesteps: defaults)
            "stage_a": {"steps": 1800, "batch_size": 8, "learning_rate": 2e-4, "checkpoint_every": 50},
            "stage_b": {"steps": 150, "batch_size": 8, "checkpoint_every": 50},  # tokens only
            "stage_c": {"steps": 100, "batch_size": 8, "learning_rate": 1e-5, "checkpoint_every": 50},
            "sampling": {"steps": 10, "guidance_scale": 4.0, "batch_size": 16, "shard_size": 64},
            "counts": {"source_cars": 128, "target_cars": 256, "target_empty": 64},
            "translation": {"enabled": True, "strength": 0.5, "max_tiles": 512},
        },
        # off: the relay trains two more detectors from scratch per run (benchmarks/README.md)
        "annotation": {"relay": {"enabled": False}},
        "detection": {
            # F_S: the reference recipe (every source-train tile each epoch, final weights); every other
            # variant fine-tunes from it with the `finetune` defaults
            "epochs": 8,
            "patience": 100,
            "batch": 32,
            "recipe": "reference",
            "checkpoint": "last",
            "seeds": [0, 1, 2],
        },
    },
    # the same on Madison -> Minsk (protocol item 10)
    "cpu-bench-minsk": {
        "name": "aerial-v1-minsk-cpu",
        "work_dir": "benchmarks/work/aerial-v1-minsk-cpu",
        "data": {"preset": "aerial-v1-minsk"},
    },
    # aerial-v1 on a CUDA GPU: larger budgets everywhere.
    "gpu": {
        "name": "aerial-v1-gpu",
        "work_dir": "runs/aerial-v1-gpu",
        "device": "0",
        "mixed_precision": "fp16",
        "data": {"preset": "aerial-v1"},
        "generation": {
            "model": "cpu",
            "autoencoder_dir": "../shared/weights/taef2",
            "stage0": {"steps": 0},
            "stage_a": {"steps": 5000, "batch_size": 64, "learning_rate": 2e-4, "checkpoint_every": 500},
            "stage_b": {"steps": 2000, "batch_size": 64, "checkpoint_every": 500},
            "stage_c": {"steps": 2000, "batch_size": 64, "checkpoint_every": 500},
            "sampling": {"steps": 50, "guidance_scale": 5.0, "batch_size": 64, "shard_size": 256},
            "counts": {"source_cars": 2000, "target_cars": 4000, "target_empty": 1000},
        },
        "annotation": {"relay": {"source_epochs": 50, "heatmap_epochs": 50, "patience": 10}},
        "detection": {"epochs": 50, "patience": 10, "seeds": [0, 1, 2]},
    },
}


#: The labelled sets a run can build besides the real tiles' (``real-<method>``, ``real-<method>-r<k>``).
SET_NAMES = ("relay", "threshold", "translation", "copy-paste", "copy-paste-harmonised", "copy-paste-blended")
#: The methods that label the real target tiles (``annotation.real_target.methods``).
REAL_METHODS = ("self-training", "heatmap", "fused")
#: The variants that are not a labelled set: the baseline, the control and the oracle.
PLAIN_VARIANTS = ("source-only", "continued", "oracle", "oracle-paired")
_REAL_SET = re.compile(r"real-(self-training|heatmap|fused)(?:-r(\d+))?")
_MIX_PART = re.compile(r"(?P<set>.+?)(?:@(?P<percent>\d+))?")
_BUDGET = re.compile(r"(?P<rest>.+)-(?P<images>\d+)img")
#: What a variant name can be, for messages.
VARIANT_FORMS = (
    "source-only, continued, oracle; <set>+source; mixes <set>+<set>+source, <set>@<percent>+...+source, "
    "<set>@<percent>+...+source-<N>img; a set is one of " + ", ".join(SET_NAMES) + ", real-<method> or "
    "real-<method>-r<k> (k >= 2) with <method> one of " + ", ".join(REAL_METHODS)
)


def is_set_name(name: str) -> bool:
    """Whether some config could build a labelled set of this name (``real-heatmap-r3``, ``copy-paste``, ...)."""
    real = _REAL_SET.fullmatch(name)
    return name in SET_NAMES or (real is not None and (real.group(2) is None or int(real.group(2)) >= 2))


def is_variant_name(name: str) -> bool:
    """Whether some config could build a detector variant of this name (forms: :data:`VARIANT_FORMS`)."""
    if name in PLAIN_VARIANTS:
        return True
    budget = _BUDGET.fullmatch(name)
    rest = budget.group("rest") if budget else name
    if not rest.endswith("+source"):
        return False
    parts = [_MIX_PART.fullmatch(p) for p in rest.removesuffix("+source").split("+")]
    if not parts or not all(m is not None and is_set_name(m.group("set")) for m in parts):
        return False
    shared = {m.group("percent") is not None for m in parts if m is not None}
    # shares (each set's percentage of the training images), or one set or an equal-share mix (no budget)
    return shared == {True} or (shared == {False} and budget is None)


def missing_for(config: AdaptConfig, name: str) -> str | None:
    """What ``config`` lacks to build the labelled set ``name`` (``None``: its enabled methods build it)."""
    g, a = config.generation, config.annotation
    real = _REAL_SET.fullmatch(name)
    needs: list[tuple[bool, str]] = []
    if real is not None:
        method, k = real.group(1), int(real.group(2) or 1)
        needs = [
            (a.real_target.enabled, "annotation.real_target.enabled"),
            (method in a.real_target.methods, f"{method} in annotation.real_target.methods"),
            (method == "self-training" or g.enabled, "generation.enabled"),
            (a.real_target.rounds >= k, f"annotation.real_target.rounds >= {k}"),
        ]
    elif name in ("relay", "threshold", "translation"):
        on = {"relay": a.relay.enabled, "threshold": a.threshold.enabled, "translation": g.translation.enabled}[name]
        where = "generation.translation" if name == "translation" else f"annotation.{name}"
        needs = [(g.enabled, "generation.enabled"), (on, f"{where}.enabled")]
    elif name.startswith("copy-paste"):
        needs = [(a.copy_paste.enabled, "annotation.copy_paste.enabled")]
        if name != "copy-paste":
            needs += [
                (g.enabled, "generation.enabled"),
                (a.copy_paste.harmonise_strength > 0, "annotation.copy_paste.harmonise_strength > 0"),
            ]
        if name == "copy-paste-blended":
            needs.append((a.copy_paste.blend_margin_px is not None, "annotation.copy_paste.blend_margin_px"))
    lacking = [what for ok, what in needs if not ok]
    return ", ".join(lacking) if lacking else None


def buildable_sets(config: AdaptConfig) -> list[str]:
    """The labelled sets the enabled methods of ``config`` build (rounds included), in the order a run makes them."""
    rounds = [f"real-{m}-r{k}" for k in range(2, config.annotation.real_target.rounds + 1) for m in REAL_METHODS]
    names = [*SET_NAMES, *(f"real-{m}" for m in REAL_METHODS), *rounds]
    return [n for n in names if missing_for(config, n) is None]


def check_names(config: AdaptConfig, where: str = "config") -> None:
    """Refuse ``detection.recommend`` entries no config could build and mixes of sets this config does not build.

    ``recommend`` may list variants a given run does not build (the run takes the first it built); a name no
    run can build (a typo) is refused. A mix must name sets that the enabled methods of this config build.

    Raises:
        InputError: naming the entry, what is wrong and what exists.
    """
    import difflib

    for i, name in enumerate(config.detection.recommend):
        if not is_variant_name(name):
            candidates = [*PLAIN_VARIANTS, *(f"{n}+source" for n in SET_NAMES)]
            candidates += [f"real-{m}{r}+source" for m in REAL_METHODS for r in ("", "-r2", "-r3", "-r4")]
            close = difflib.get_close_matches(name, candidates, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InputError(
                f"{where}: config.detection.recommend[{i}]",
                f"{name!r} is not a variant any run can build ({hint}variants: {VARIANT_FORMS})",
            )
    built = buildable_sets(config)
    for i, spec in enumerate(config.detection.mixes):
        names = spec.shares if isinstance(spec, MixBudget) else spec
        for name in names:
            if name in built:
                continue
            lacking = missing_for(config, name) if is_set_name(name) else None
            why = f"this config does not build it (needs {lacking})" if lacking else "no method builds a set so named"
            raise InputError(
                f"{where}: config.detection.mixes[{i}]",
                f"{name!r}: {why}; the sets this config builds: {', '.join(built) or 'none'}",
            )


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _field_path(loc: tuple) -> str:
    return "config." + ".".join(str(p) for p in loc) if loc else "config"


#: Presets written as changes to another preset.
PRESET_BASES: dict[str, str] = {"cpu-bench-minsk": "cpu-bench"}


def preset_document(name: str) -> dict[str, Any]:
    """A preset's whole document (a preset listed in :data:`PRESET_BASES` merged over its base)."""
    base = PRESET_BASES.get(name)
    return _merge(preset_document(base), PRESETS[name]) if base else copy.deepcopy(PRESETS[name])


def build_config(doc: dict[str, Any] | None = None, where: str = "config") -> AdaptConfig:
    """Validate a config document (with an optional ``preset:`` underneath it).

    Raises:
        InputError: unknown preset, unknown key (named), wrong type or value, a variant or set name that
            nothing builds (:func:`check_names`).
    """
    doc = dict(doc or {})
    preset = doc.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"{where}: preset", f"unknown preset {preset!r} (one of {', '.join(PRESETS)})")
        doc = _merge(preset_document(preset), doc)
    try:
        config = AdaptConfig.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        problem = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise InputError(f"{where}: {_field_path(err['loc'])}", problem) from None
    check_names(config, where)
    return config


def load_config(
    path: str | Path | None = None, preset: str | None = None, overrides: dict | None = None
) -> AdaptConfig:
    """Read a YAML config file (or just a preset) and apply ``overrides``."""
    doc: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise InputError(path, "config file not found") from None
        except yaml.YAMLError as exc:
            raise InputError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InputError(path, "a config file must be a mapping of keys to values")
        doc = loaded or {}
    if preset is not None:
        doc = {**doc, "preset": preset}
    if overrides:
        doc = _merge(doc, overrides)
    return build_config(doc, where)


def dump_config(config: AdaptConfig) -> str:
    """The config as YAML (paths as strings), as written beside a run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
