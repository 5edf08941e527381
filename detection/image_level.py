"""An image-level loss for training images that hold a vehicle whose box is not known.

A target tile flagged "vehicle" where no proposal reached the labelling threshold can be written without a
box and marked image-level (``annotation.real_target``, ``image_level.json`` of the dataset). Trained as an
ordinary image it would teach the detector that the whole tile is background, against its flag. Here:

* its anchors are left out of the classification loss (nothing there is taught "background");
* a multiple-instance term asks that at least one anchor scores as a vehicle: ``-log max_a p_a`` over the
  anchors ``a`` of the image (``softplus(-max logit)``), averaged over the batch and weighted by
  ultralytics' ``cls`` gain (``weight`` 1 by default).

Images with boxes and images without a flag are trained exactly as ultralytics does. The images are known by
their file stem in the YOLO view (``batch["im_file"]``). A mosaic carries only its first tile's name, so the
trainer switches mosaic off for the whole run, whatever the recipe asks: each training image is one tile.

The loss is installed on the training model only, after the EMA copy is made, so the saved weights are plain
ultralytics weights that load without aerosynth.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
import torch.nn.functional as F

from aerosynth.data.errors import InputError


class MaskedBCE(torch.nn.Module):
    """``BCEWithLogitsLoss(reduction="none")`` whose per-image results are multiplied by ``image_weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.image_weight: torch.Tensor | None = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.image_weight is None or loss.dim() != 3:
            return loss
        return loss * self.image_weight.to(loss.dtype).view(-1, 1, 1)


def image_level_term(scores: torch.Tensor, image_level: torch.Tensor) -> torch.Tensor:
    """``sum over image-level images of -log(max anchor probability)``.

    Args:
        scores: class logits, ``(batch, classes, anchors)`` as ultralytics' Detect head returns them.
        image_level: ``(batch,)`` booleans.
    """
    if not bool(image_level.any()):
        return scores.sum() * 0.0
    best = scores[image_level].flatten(1).max(dim=1).values  # the most confident anchor of any class
    return F.softplus(-best).sum()


def image_level_mask(files: Collection[str], stems: Collection[str], device: torch.device) -> torch.Tensor:
    """``(batch,)`` booleans: which of a batch's image files are image-level (by file stem)."""
    return torch.tensor([Path(f).stem in stems for f in files], dtype=torch.bool, device=device)


def image_level_loss_class(base: type) -> type:
    """A subclass of ultralytics' detection loss ``base`` with the image-level treatment (module docstring)."""

    class ImageLevelDetectionLoss(base):  # type: ignore[misc, valid-type]
        def __init__(self, model: torch.nn.Module, stems: Collection[str], weight: float = 1.0) -> None:
            super().__init__(model)
            self.bce = MaskedBCE()
            self.stems = frozenset(stems)
            self.weight = float(weight)

        def loss(self, preds: dict, batch: dict) -> tuple[torch.Tensor, dict]:
            scores = preds["scores"]
            mask = image_level_mask(batch.get("im_file", ()), self.stems, scores.device)
            if mask.numel() != scores.shape[0]:  # no file names (validation): ultralytics' loss unchanged
                mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
            self.bce.image_weight = (~mask).float()
            try:
                total, items = super().loss(preds, batch)
            finally:
                self.bce.image_weight = None
            term = image_level_term(scores, mask) * self.weight * self.hyp.cls
            # ultralytics returns the loss times the batch size: the term is a sum over the batch already
            total = torch.cat([total[:1], total[1:2] + term, total[2:]])
            per_image = term.detach() / max(scores.shape[0], 1)
            if isinstance(items, dict):
                name = self.loss_names[1]
                items = {**items, name: items[name] + per_image}
            return total, items

    return ImageLevelDetectionLoss


def image_level_trainer(stems: Collection[str], weight: float = 1.0) -> type:
    """An ultralytics ``DetectionTrainer`` whose training model uses the image-level loss for ``stems``."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.loss import v8DetectionLoss

    loss_class = image_level_loss_class(v8DetectionLoss)

    class ImageLevelTrainer(DetectionTrainer):
        def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            # a mosaic carries only its first tile's name: the term would land on the wrong tiles
            self.args.mosaic = 0.0

        def _setup_train(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = super()._setup_train(*args, **kwargs)
            model = self.model.module if hasattr(self.model, "module") else self.model
            if getattr(model.model[-1], "one2one_cv2", None) is not None:
                raise InputError("model", "the image-level loss needs a YOLOv8-style head (not an end-to-end one)")
            model.criterion = loss_class(model, stems, weight)
            return out

    return ImageLevelTrainer
