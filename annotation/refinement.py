"""AGenDA's label refinement: a small CNN decides the boxes the relay detector is unsure of.

The relay detector F_A gives candidate boxes with confidences on the synthetic target
images. With two thresholds ``lambda_low <= lambda_high``:

- a box at or above ``lambda_high`` is a positive and is kept (``kept``);
- the top-1 box of every image generated *with* vehicles is a positive and is kept too
  (the prompt asked for vehicles, so the best candidate is taken to be one);
- a box below ``lambda_low`` is a negative and is dropped, and so is every box of an image
  generated *without* vehicles (those images get no box; their boxes are negatives too);
- the boxes in between are decided by a CNN trained on crops of the positives and
  negatives: accepted boxes are ``refined``, the others dropped.

Crops are the box enlarged by ``context`` around its centre, cut from the RGB image and/or
the heat-map stack, resized to ``crop_size`` squared (6 channels for ``rgb+heatmap``).
The CNN's epoch is chosen on a held-out part of those (synthetic) crops, never on target
labels. Everything is seeded; on CPU the same inputs give the same decisions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from aerosynth.annotation.export import AnnotatedImage
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb

CHANNEL_MODES = ("rgb", "heatmap", "rgb+heatmap")


@dataclass
class RefinementConfig:
    """Options of the refinement step.

    Attributes:
        crop_size: side of the square crops fed to the CNN.
        context: crops cover the box enlarged by this factor around its centre.
        channels: ``rgb``, ``heatmap`` or ``rgb+heatmap``.
        epochs: most training epochs (the best on the held-out crops is kept).
        batch_size: crops per step.
        learning_rate: Adam learning rate.
        val_fraction: share of the crops held out to pick the epoch.
        max_negatives_per_positive: negatives are subsampled (seeded) to at most this ratio.
        accept_probability: CNN probability at which an uncertain box is accepted.
        top1_positive: the top-1 box of each image generated with vehicles is a positive.
        empty_images_as_negatives: boxes on images generated without vehicles are negatives.
        seed: seed of the split, the subsampling, the initialisation and the batches.
        threads: torch CPU threads while training.
    """

    crop_size: int = 32
    context: float = 1.5
    channels: str = "rgb+heatmap"
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    val_fraction: float = 0.2
    max_negatives_per_positive: float = 3.0
    accept_probability: float = 0.5
    top1_positive: bool = True
    empty_images_as_negatives: bool = True
    seed: int = 0
    threads: int = 1

    def validate(self) -> RefinementConfig:
        checks = [
            ("crop_size", self.crop_size >= 8, ">= 8"),
            ("context", self.context >= 1.0, ">= 1"),
            ("channels", self.channels in CHANNEL_MODES, f"one of {CHANNEL_MODES}"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)"),
            ("max_negatives_per_positive", self.max_negatives_per_positive > 0, "> 0"),
            ("accept_probability", 0.0 < self.accept_probability < 1.0, "in (0, 1)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"RefinementConfig.{name}", f"got {getattr(self, name)!r}, expected {expected}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    """One synthetic target image with the relay detector's candidate boxes."""

    name: str
    image_path: Path
    heatmap_path: Path | None
    detections: Detections
    with_vehicles: bool
    set_name: str = ""


def extract_crops(
    rgb: np.ndarray | None, heat: np.ndarray | None, boxes: Detections, config: RefinementConfig
) -> np.ndarray:
    """``(N, C, S, S)`` float32 crops in ``[0, 1]`` around each box (see the module docstring)."""
    planes = []
    if config.channels in ("rgb", "rgb+heatmap"):
        if rgb is None:
            raise InputError("refinement", "channels need the RGB image")
        planes.append(rgb)
    if config.channels in ("heatmap", "rgb+heatmap"):
        if heat is None:
            raise InputError("refinement", "channels need the heat map (set has no heatmaps/)")
        planes.append(heat)
    stack = np.concatenate(planes, axis=2).astype(np.float32) / 255.0
    h, w = stack.shape[:2]
    s = config.crop_size
    out = np.zeros((len(boxes), stack.shape[2], s, s), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes.xyxy):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half_w = max((x2 - x1) * config.context / 2, 1.0)
        half_h = max((y2 - y1) * config.context / 2, 1.0)
        c0, c1 = int(np.clip(np.floor(cx - half_w), 0, w - 1)), int(np.clip(np.ceil(cx + half_w), 1, w))
        r0, r1 = int(np.clip(np.floor(cy - half_h), 0, h - 1)), int(np.clip(np.ceil(cy + half_h), 1, h))
        patch = stack[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)]
        resized = cv2.resize(patch, (s, s), interpolation=cv2.INTER_LINEAR)
        if resized.ndim == 2:
            resized = resized[:, :, None]
        out[i] = resized.transpose(2, 0, 1)
    return out


def _build_cnn(in_channels: int):
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 1),
    )


def _augment(batch, generator):
    """Random flips and quarter turns of square crops (a vehicle seen from above has no up)."""
    import torch

    k = int(torch.randint(0, 4, (1,), generator=generator))
    batch = torch.rot90(batch, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        batch = torch.flip(batch, dims=(3,))
    return batch


def _balanced_accuracy(prob: np.ndarray, label: np.ndarray, cut: float) -> float:
    pred = prob >= cut
    pos, neg = label == 1, label == 0
    tpr = float(pred[pos].mean()) if pos.any() else 0.0
    tnr = float((~pred[neg]).mean()) if neg.any() else 0.0
    return (tpr + tnr) / 2


class CropClassifier:
    """The trained refinement CNN (``predict`` returns vehicle probabilities)."""

    def __init__(self, model, config: RefinementConfig, report: dict) -> None:
        self.model = model
        self.config = config
        self.report = report

    def predict(self, crops: np.ndarray) -> np.ndarray:
        import torch

        if len(crops) == 0:
            return np.zeros(0)
        self.model.eval()
        with torch.no_grad():
            logits = self.model(torch.from_numpy(crops)).squeeze(1)
        return torch.sigmoid(logits).numpy().astype(np.float64)

    def save(self, path: str | Path) -> Path:
        """Write the weights (``state_dict``) atomically."""
        import torch

        from aerosynth.data.atomic import atomic_output_path

        with atomic_output_path(path, ".pt") as tmp:
            torch.save(self.model.state_dict(), tmp)
        return Path(path)


def train_crop_classifier(positives: np.ndarray, negatives: np.ndarray, config: RefinementConfig) -> CropClassifier:
    """Train the CNN on positive and negative crops; keep the epoch best on held-out crops.

    Raises:
        InputError: no positive or no negative crop.
    """
    import torch

    config = config.validate()
    if len(positives) == 0 or len(negatives) == 0:
        raise InputError("refinement", f"needs positives and negatives, got {len(positives)} and {len(negatives)}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        rng = np.random.default_rng(config.seed)
        x = np.concatenate([positives, negatives]).astype(np.float32)
        y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))]).astype(np.float32)
        val_idx: list[int] = []
        for cls in (1.0, 0.0):
            idx = np.flatnonzero(y == cls)
            n_val = int(round(len(idx) * config.val_fraction))
            if len(idx) - n_val >= 1 and n_val >= 1:
                val_idx += sorted(rng.choice(idx, size=n_val, replace=False).tolist())
        val_mask = np.zeros(len(y), bool)
        val_mask[val_idx] = True
        has_val = (y[val_mask] == 1).any() and (y[val_mask] == 0).any()
        train_x, train_y = (x[~val_mask], y[~val_mask]) if has_val else (x, y)
        torch.manual_seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        model = _build_cnn(x.shape[1])
        opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        n_pos, n_neg = float(train_y.sum()), float(len(train_y) - train_y.sum())
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(max(n_neg, 1.0) / max(n_pos, 1.0)))
        tx, ty = torch.from_numpy(train_x), torch.from_numpy(train_y)
        best_state, best_score, best_epoch = None, -1.0, -1
        history = []
        for epoch in range(config.epochs):
            model.train()
            order = torch.randperm(len(tx), generator=gen)
            total = 0.0
            for start in range(0, len(order), config.batch_size):
                sel = order[start : start + config.batch_size]
                if len(sel) < 2:  # batch norm needs two samples
                    continue
                batch = _augment(tx[sel], gen)
                loss = loss_fn(model(batch).squeeze(1), ty[sel])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(sel)
            entry = {"epoch": epoch + 1, "train_loss": total / max(len(order), 1)}
            if has_val:
                clf = CropClassifier(model, config, {})
                entry["val_balanced_accuracy"] = _balanced_accuracy(
                    clf.predict(x[val_mask]), y[val_mask], config.accept_probability
                )
                score = entry["val_balanced_accuracy"]
            else:
                score = float(epoch)  # no held-out crops: the last epoch
            history.append(entry)
            if score > best_score:
                best_score, best_epoch = score, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        model.eval()
        report = {
            "positives": int(len(positives)),
            "negatives": int(len(negatives)),
            "held_out": int(val_mask.sum()) if has_val else 0,
            "best_epoch": best_epoch,
            "best_val_balanced_accuracy": best_score if has_val else None,
            "history": history,
        }
        return CropClassifier(model, config, report)
    finally:
        torch.set_num_threads(old_threads)


def _load_planes(cand: Candidate, config: RefinementConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    rgb = read_rgb(cand.image_path) if config.channels != "heatmap" else None
    heat = None
    if config.channels != "rgb":
        if cand.heatmap_path is None:
            raise InputError(cand.image_path, "refinement channels need a heat map; this image has none")
        heat = read_rgb(cand.heatmap_path)
    return rgb, heat


def partition(cand: Candidate, lambda_low: float, lambda_high: float, config: RefinementConfig) -> np.ndarray:
    """Per box: ``1`` positive (kept), ``0`` negative (dropped), ``-1`` uncertain."""
    n = len(cand.detections)
    role = np.full(n, -1, np.int64)
    if n == 0:
        return role
    if not cand.with_vehicles:
        return np.zeros(n, np.int64)
    conf = cand.detections.confidence
    role[conf >= lambda_high] = 1
    role[conf < lambda_low] = 0
    if config.top1_positive:
        role[int(np.argmax(conf))] = 1
    return role


def refine(
    candidates: Sequence[Candidate],
    lambda_low: float,
    lambda_high: float,
    config: RefinementConfig | None = None,
    checkpoint: str | Path | None = None,
) -> tuple[list[AnnotatedImage], dict]:
    """Decide every candidate box (see the module docstring).

    Args:
        candidates: the synthetic target images with F_A's boxes (with confidences).
        lambda_low: below it a box is a negative.
        lambda_high: at or above it a box is a positive.
        config: CNN and crop options.
        checkpoint: where to save the CNN's weights (``None``: not saved).

    Returns:
        The annotated images and a report (counts, thresholds, CNN training history).

    Raises:
        InputError: ``lambda_low > lambda_high`` or a bad config.
    """
    config = (config or RefinementConfig()).validate()
    if lambda_low > lambda_high:
        raise InputError("refinement", f"lambda_low {lambda_low:g} is above lambda_high {lambda_high:g}")
    roles = [partition(c, lambda_low, lambda_high, config) for c in candidates]
    pos_crops, neg_crops, uncertain_crops = [], [], []
    for cand, role in zip(candidates, roles, strict=True):
        if len(cand.detections) == 0:
            continue
        use_neg = cand.with_vehicles or config.empty_images_as_negatives
        wanted = (role == 1) | (role == -1) | ((role == 0) & use_neg)
        if not wanted.any():
            continue
        rgb, heat = _load_planes(cand, config)
        crops = extract_crops(rgb, heat, cand.detections, config)
        pos_crops.append(crops[role == 1])
        neg_crops.append(crops[(role == 0) & use_neg])
        uncertain_crops.append((cand.name, crops[role == -1]))
    channels = {"rgb": 3, "heatmap": 3, "rgb+heatmap": 6}[config.channels]
    empty = np.zeros((0, channels, config.crop_size, config.crop_size), np.float32)
    positives = np.concatenate(pos_crops) if pos_crops else empty
    negatives = np.concatenate(neg_crops) if neg_crops else empty
    n_uncertain = int(sum(len(c) for _, c in uncertain_crops))
    rng = np.random.default_rng(config.seed)
    cap = max(1, int(np.ceil(config.max_negatives_per_positive * max(len(positives), 1))))
    if len(negatives) > cap:
        negatives = negatives[np.sort(rng.choice(len(negatives), size=cap, replace=False))]
    decision_mode = "none_uncertain"
    classifier = None
    probabilities: dict[str, np.ndarray] = {}
    if n_uncertain:
        if len(positives) and len(negatives):
            classifier = train_crop_classifier(positives, negatives, config)
            decision_mode = "cnn"
            for name, crops in uncertain_crops:
                probabilities[name] = classifier.predict(crops)
            if checkpoint is not None:
                classifier.save(checkpoint)
        else:
            decision_mode = "midpoint"  # no positive or no negative to learn from
    midpoint = (lambda_low + lambda_high) / 2
    items: list[AnnotatedImage] = []
    for cand, role in zip(candidates, roles, strict=True):
        dets = cand.detections
        keep = role == 1
        status = np.array(["kept"] * len(dets), dtype=object)
        unc = np.flatnonzero(role == -1)
        if len(unc):
            if decision_mode == "cnn":
                accept = probabilities[cand.name] >= config.accept_probability
            else:
                accept = dets.confidence[unc] >= midpoint
            keep[unc[accept]] = True
            status[unc[accept]] = "refined"
        items.append(
            AnnotatedImage(
                name=cand.name,
                image_path=cand.image_path,
                heatmap_path=cand.heatmap_path,
                detections=dets[keep],
                status=[str(s) for s in status[keep]],
                set_name=cand.set_name,
                with_vehicles=cand.with_vehicles,
                dropped=int((~keep).sum()),
            )
        )
    report = {
        "lambda_low": float(lambda_low),
        "lambda_high": float(lambda_high),
        "positives": int(sum((r == 1).sum() for r in roles)),
        "negatives": int(sum((r == 0).sum() for r in roles)),
        "uncertain": n_uncertain,
        "positive_crops": int(len(positives)),
        "negative_crops": int(len(negatives)),
        "decision": decision_mode,
        "refined": int(sum(s == "refined" for it in items for s in it.status)),
        "classifier": None if classifier is None else classifier.report,
        "config": config.to_dict(),
    }
    return items, report
